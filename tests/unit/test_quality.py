"""The quality study's arithmetic (gap, steps to the synchronous run's losses) against hand-made
runs, its variants' syntax, and one small run of the simulator per task."""
from __future__ import annotations

import math

import pytest

from ssd_allreduce.bench import quality
from ssd_allreduce.bench.quality_run import RunSpec, Variant, schedule, simulate


def run(variant: str, seed: int, losses: list[float], steps: int = 100, lr: float = 0.0) -> dict:
    """A finished run as the study records it: a loss every ``steps / len(losses)`` steps."""
    every = steps // len(losses)
    curve = [[every * (i + 1), {"val_loss": loss}] for i, loss in enumerate(losses)]
    spec = {"task": "regression", "workers": 4, "optimizer": "sgd", "shards": "shuffle", "seed": seed,
            "steps": steps, "variant": {"label": variant}, "lr": lr}
    return {"spec": spec, "curve": curve, "final": curve[-1][1], "seconds_per_step": [], "where": "simulator"}


def test_gap_and_steps_to_the_synchronous_losses():
    results = [run("sync", 0, [0.8, 0.5, 0.4, 0.3, 0.2]), run("sync", 1, [0.8, 0.6, 0.4, 0.3, 0.25]),
               run("5:5", 0, [0.9, 0.6, 0.45, 0.3, 0.21]), run("5:5", 1, [0.7, 0.5, 0.35, 0.3, 0.25])]
    rows = {r["variant"]: r for r in quality.summarise(results)}
    ssd = rows["5:5"]
    assert ssd["seeds"] == 2
    assert ssd["gap_pct"] == pytest.approx((5.0 + 0.0) / 2)
    assert (ssd["gap_min"], ssd["gap_max"]) == pytest.approx((0.0, 5.0))
    # the synchronous losses by 50 % of the budget: 0.5 and 0.6, reached at steps 60 and 40
    assert ssd["steps_to_50"] == 50
    # by 80 %: 0.3 (both), reached at 80; at 100 %: seed 0 never reaches 0.2, so no median
    assert ssd["steps_to_80"] == 80 and ssd["steps_to_100"] is None
    assert rows["sync"]["gap_pct"] == 0 and rows["sync"]["steps_to_100"] == 100
    table = quality.render(list(rows.values()))
    assert "| 5:5 | +2.5 % (+0.0..+5.0); 50/80/- |" in table


def test_a_run_whose_loss_is_not_finite_or_ten_times_synchronous_is_counted_as_diverged():
    results = [run("sync", 0, [0.5, 0.2]), run("sync", 1, [0.5, 0.3]), run("sync", 2, [0.5, 0.3]),
               run("5:5", 0, [0.6, math.nan]), run("5:5", 1, [0.6, 3.0]), run("5:5", 2, [0.6, 0.33]),
               run("2:2", 0, [0.6, 0.21]), run("2:2", 1, [0.6, 2.99]), run("2:2", 2, [0.6, 0.3])]
    rows = {r["variant"]: r for r in quality.summarise(results)}
    assert rows["5:5"]["diverged"] == 2 and rows["2:2"]["diverged"] == 0
    table = quality.render(list(rows.values()))
    assert "| 5:5 | diverged (2 of 3 seeds) |" in table
    assert "| 2:2 | +300.6 % (+0.0..+896.7); -/-/- |" in table


def test_each_peak_rate_is_a_table_against_synchronous_training_at_that_rate():
    results = [run("sync", 0, [0.5, 0.2], lr=0.1), run("5:1", 0, [0.5, 0.22], lr=0.1),
               run("sync", 0, [0.5, 0.4], lr=0.2), run("5:1", 0, [0.5, 0.3], lr=0.2)]
    rows = quality.summarise(results)
    gaps = {(r["lr"], r["variant"]): round(r["gap_pct"], 6) for r in rows}
    assert gaps == {(0.1, "sync"): 0, (0.1, "5:1"): 10.0, (0.2, "sync"): 0, (0.2, "5:1"): -25.0}
    table = quality.render(rows)
    assert table.index("**regression, sgd, shuffle shards, peak lr 0.1, simulator**") \
        < table.index("| 5:1 | +10.0 % (+10.0..+10.0); 50/50/- |") \
        < table.index("**regression, sgd, shuffle shards, peak lr 0.2, simulator**") \
        < table.index("| 5:1 | -25.0 % (-25.0..-25.0); 50/50/100 |")
    # a record older than the rate renders as it did: the task's own rate, not named
    older = [{k: v for k, v in r.items() if k != "lr"} for r in quality.summarise(results[:2])]
    assert "**regression, sgd, shuffle shards, simulator**" in quality.render(older)


def test_a_run_without_its_synchronous_seed_is_left_out():
    rows = quality.summarise([run("sync", 0, [0.5]), run("2:2", 1, [0.4])])
    assert [r["variant"] for r in rows] == ["sync"]


@pytest.mark.parametrize("text, expected", [
    ("sync", Variant("sync", sync=True)),
    ("5:5", Variant("5:5", 5, 5, "auto", 1.0, 0.0, "auto")),
    ("5:5:0.5:1", Variant("5:5:0.5:1", 5, 5, 0.5, 1.0, 0.0, 1.0)),
    ("2:1:auto:auto", Variant("2:1:auto:auto", 2, 1, "auto", 1.0, 0.0, "auto")),
    ("4:4:0.75:2:0.7/0.9", Variant("4:4:0.75:2:0.7/0.9", 4, 4, 0.75, 0.7, 0.9, 2.0)),
    ("5:1@90+am", Variant("5:1@90+am", 5, 1, "auto", 1.0, 0.0, "auto", average_moments=True, warmup_steps=90)),
])
def test_variants(text, expected):
    assert quality.parse_variant(text) == expected


def test_the_plan_runs_every_variant_and_seed_at_each_peak_rate_once():
    a = quality.build_parser().parse_args(["--tasks", "gpt", "--optimizers", "sgd", "--seeds", "2",
                                           "--lr", "0.2", "0.4", "0.2", "--variants", "5:1"])
    runs = [(s.lr, s.variant.label, s.seed) for s in quality.plan(a)]
    assert runs == [(lr, v, seed) for lr in (0.2, 0.4) for seed in (0, 1) for v in ("sync", "5:1")]
    with pytest.raises(SystemExit, match="--lr must be >= 0, got -0.1"):
        quality.main(["--lr", "-0.1"])


@pytest.mark.parametrize("text", ["5", "a:b", "5:5:beta", "5:5:0.5:1:2", "5:5@x", "5:5@1@2", "5:5@-1"])
def test_a_malformed_variant_says_the_syntax(text):
    with pytest.raises(SystemExit, match="k:d\\[:beta"):
        quality.parse_variant(text)


def test_the_schedule_ramps_then_decays_to_zero():
    lr = schedule(100)
    assert lr(0) == pytest.approx(0.2 * 0.5 * (1 + math.cos(0)))
    assert lr(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.04)))
    assert lr(50) == pytest.approx(0.5) and lr(100) == pytest.approx(0.0)


def test_k1_d0_with_sgd_is_synchronous_training():
    """SPEC: with SGD, k = 1, d = 0 equals synchronous SGD; every option at its library default."""
    def final(variant: Variant) -> float:
        spec = RunSpec("regression", 3, "sgd", "non-iid", 0, 30, 5, variant)
        return simulate(spec).final["val_loss"]
    assert final(quality.parse_variant("1:0:auto:auto")) == pytest.approx(final(quality.parse_variant("sync")),
                                                                          rel=1e-5)


def test_a_variant_s_own_warm_up_replaces_the_study_s():
    """A warm-up as long as the budget is synchronous training; the study's 5 steps are not."""
    def final(variant: str) -> float:
        return simulate(RunSpec("regression", 3, "sgd", "shuffle", 0, 30, 5, quality.parse_variant(variant))).final[
            "val_loss"]
    assert final("5:5@30") == pytest.approx(final("sync"), rel=1e-6)
    assert final("5:5") != pytest.approx(final("sync"), rel=1e-3)


@pytest.mark.parametrize("task", ["digits", "gpt"])
def test_every_task_trains(task):
    spec = RunSpec(task, 2, "adamw", "non-iid", 0, 12, 4, quality.parse_variant("2:2:auto:auto"), evals=3)
    result = simulate(spec)
    assert [step for step, _ in result.curve] == [4, 8, 12]
    first, last = result.curve[0][1]["val_loss"], result.final["val_loss"]
    assert math.isfinite(last) and last < first


def test_a_classifier_reports_its_accuracy_against_synchronous_training_in_points():
    def classified(variant: str, seed: int, loss: float, accuracy: float) -> dict:
        r = run(variant, seed, [loss])
        r["final"] = r["curve"][-1][1] = {"val_loss": loss, "val_accuracy": accuracy}
        return r
    results = [classified("sync", 0, 0.1, 0.97), classified("sync", 1, 0.1, 0.95),
               classified("5:5", 0, 0.11, 0.96), classified("5:5", 1, 0.1, 0.958)]
    rows = {r["variant"]: r for r in quality.summarise(results)}
    assert rows["5:5"]["accuracy_pts"] == pytest.approx((-1.0 + 0.8) / 2)
    assert (rows["5:5"]["accuracy_min"], rows["5:5"]["accuracy_max"]) == pytest.approx((-1.0, 0.8))
    table = quality.render(list(rows.values()))
    assert "| sync | loss 0.1000, accuracy 96.0 % |" in table
    assert "| 5:5 | +5.0 % (+0.0..+10.0); -/-/-; -0.1 pt (-1.0..+0.8) |" in table
    assert "in points" in table
    assert "val_accuracy" not in quality.summarise([run("sync", 0, [0.1])])[0]
