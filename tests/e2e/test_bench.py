"""The benchmark as users run it: one short side-by-side comparison, the ablation, the synthetic mode."""
from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import torch

from launchers import PYTHON, REPO, horovodrun, launcher_env, run_bounded, run_ranks
from ssd_allreduce.bench import ablation, overhead, report
from ssd_allreduce.bench.compare import run_dirname
from ssd_allreduce.bench.convergence import study
from ssd_allreduce.train import runlog
from ssd_allreduce.train.models import build_model


COMPACT_HEADER = "| mode | img/s | x horovod | x no-comm | test acc | B/step | to target s |"


def test_short_comparison_writes_side_by_side_results(tmp_path):
    """Every mode learns the digits under horovodrun (10 epochs of 22 steps), side by side."""
    out = tmp_path / "bench"
    proc = run_bounded([PYTHON, "-m", "ssd_allreduce.bench", "--bandwidths", "100mbit", "--epochs", "10",
                        "--ssd-configs", "4:4", "auto/int8", "--warmup-steps", "20", "--out", str(out),
                        "--record", str(tmp_path / "docs" / "results" / "auto.json")],
                       env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    (section,) = results["bandwidths"]
    rows = {r["name"]: r for r in section["rows"]}
    assert list(rows) == ["horovod", "ssd k=4 d=4", "ssd k=auto d=auto int8", "local-sgd k=5", "no-comm"]
    base, ssd, limit = rows["horovod"], rows["ssd k=4 d=4"], rows["no-comm"]
    assert ssd["x_horovod"] == pytest.approx(ssd["images_per_sec"] / base["images_per_sec"])
    assert ssd["x_no_comm"] == pytest.approx(ssd["images_per_sec"] / limit["images_per_sec"])
    # Horovod blocks on every step's allreduce, no-comm on none. (SSD-SGD's smaller wait is a timing,
    # measured by the benchmark's records; that its window is in flight during the local steps is
    # tested without comparing timings in tests/ranks/test_multirank.py)
    assert base["comm_wait_ms"] > 0 and limit["comm_wait_ms"] == 0
    assert ssd["bytes_per_step"] / base["bytes_per_step"] == pytest.approx(0.25, rel=0.01)
    assert limit["bytes_per_step"] == 0 and ssd["extra_state_mb"] > 0
    summaries = {}
    for name in rows:                             # each run's directory, as the driver left it
        run = out / "runs" / "100mbit" / f"{run_dirname(name)}-0"
        steps = [rec for rec in runlog.read(run) if rec["kind"] == "step"]
        s = summaries[name] = runlog.latest_summary(run)
        assert s["ranks"] == 2 and s["steps"] == len(steps) == 10 * 22, s
        assert s["test_accuracy"] == rows[name]["test_accuracy"] >= (0.80 if name == "no-comm" else 0.85), s
        assert all(rec["compute_time"] > 0 for rec in steps) and (run / "curves.png").stat().st_size > 10_000
    # W, snapshot and in-flight buffer: three copies of the parameters and float buffers
    s = summaries["ssd k=4 d=4"]
    assert s["ssd_stats"]["windows_landed"] > 0 and 0 < s["extra_state_bytes"] <= 3 * s["parameter_bytes"] * 1.01
    assert s["bytes_per_step"] == pytest.approx(s["parameter_bytes"] / 4, rel=0.01)
    if section["measured_mbps"] is not None:       # shaped: the emulated link was measured
        assert 80 < section["measured_mbps"] < 110 and "tbf 100mbit" in proc.stdout
    else:
        assert "NOTE: no emulated network" in proc.stdout
    assert any("ssd k=4 d=4" in t and "bytes/step = 0.25" in t for t in section["targets"])
    auto = rows["ssd k=auto d=auto int8"]     # a window of its own choosing, a quarter of the bytes
    assert 1 <= auto["sync_every_used"] <= 16 and 1 <= auto["delay_used"] <= auto["sync_every_used"]
    # int8: a quarter of float32's bytes plus a scale per chunk, whatever windows the re-checks chose
    assert ssd["bytes_per_window"] == pytest.approx(base["bytes_per_step"], rel=0.01)
    assert 0.25 <= auto["bytes_per_window"] / base["bytes_per_step"] < 0.25 * 1.05
    assert auto["bytes_per_step"] <= auto["bytes_per_window"]
    assert any(f"chose k={auto['sync_every_used']}" in t for t in section["targets"])
    assert {c["name"] for c in section["cost_model"]} == set(rows)
    # the terminal gets the compact table, results.md every column
    assert COMPACT_HEADER in proc.stdout and "rank img/s" not in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines() if line.startswith("|")) <= 100
    full = (out / "results.md").read_text()
    assert "| ssd k=4 d=4 |" in full and "rank img/s min/med/max" in full and "exposed comm ms" in full
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000
    # the record a document's section is written from: the same rows, its provenance, no curves
    record = json.loads((tmp_path / "docs" / "results" / "auto.json").read_text())
    assert record["command"] == results["command"] and record["horovod"] == "0.28.1"
    assert [r["name"] for r in record["bandwidths"][0]["rows"]] == list(rows)
    assert all("curve" not in r and len(r["images_per_sec_repeats"]) == 1 for r in record["bandwidths"][0]["rows"])
    page = tmp_path / "docs" / "PAGE.md"
    page.write_text("<!-- results:auto -->\n<!-- /results:auto -->\n")
    assert report.main(["--docs", str(tmp_path / "docs")]) == 0
    assert f"| {auto['images_per_sec']:,.0f} (k={auto['sync_every_used']}, d={auto['delay_used']}) |" in page.read_text()


def test_ablation_table_holds_what_the_simulator_computes(tmp_path):
    proc = run_bounded([PYTHON, "-m", "ssd_allreduce.bench", "ablation", "--ranks", "2", "--epochs", "1",
                        "--seeds", "1", "--sync-every", "2", "--warmup-steps", "20", "--out", str(tmp_path),
                        "--record", str(tmp_path / "ablation.json")],
                       env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "ablation.md").read_text()
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert record["config"]["sync_every"] == 2 and record["seconds"] > 0
    assert ablation.render_record(record).split("\n\n", 1)[1] == table.split("\n\n", 1)[1], \
        "the documents' table (from the record) is the table the run wrote"
    cells = {}
    for variant in ("ssgd", "overwrite", "glu_beta=1.0", "glu_beta=0.5", "glu_beta=0.25", "glu_beta=0.1"):
        match = re.search(rf"\| {re.escape(variant)} \| ([0-9.]+) ± [0-9.]+ \| ([0-9.]+) ± [0-9.]+ \|", table)
        assert match, f"{variant} missing from\n{table}"
        cells[variant] = (float(match[1]), float(match[2]))
    expected = study(workers=2, sync_every=2, delay=2, warmup_steps=20, glu_beta=0.5, compensation="glu",
                     shards="shuffle", epochs=1, batch_size=16, lr=0.05, model_name="mlp", seed=0)
    assert cells["glu_beta=0.5"][0] == pytest.approx(expected["accuracy"], abs=5e-5)
    assert cells["ssgd"][0] > 0.8, "synchronous SGD on the digits learns within one epoch"


def test_synthetic_mode_runs_ssd_windows_and_prints_horovod_style_img_per_sec():
    out = run_ranks(horovodrun(2, "-m", "ssd_allreduce.bench", "synthetic", "--model", "cnn", "--no-cuda",
                               "--batch-size", "8", "--num-warmup-batches", "1", "--num-batches-per-iter", "2",
                               "--num-iters", "2", "--mode", "ssd", "--sync-every", "2", "--warmup-steps", "0"))
    assert "Number of CPUs: 2" in out
    per_cpu = float(re.search(r"Img/sec per CPU: ([0-9.]+) \+-", out)[1])
    total = float(re.search(r"Total img/sec on 2 CPU\(s\): ([0-9.]+) \+-", out)[1])
    assert per_cpu > 0 and total == pytest.approx(2 * per_cpu, abs=0.11)
    # 5 steps, k = d = 2: windows launch at steps 1 and 3; the first lands at 3, finish() lands the last
    model = build_model("cnn", 10, 3, 32)
    state_bytes = 4 * sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert f"SSD-SGD: 5 steps, 2 windows launched, 2 landed, {2 * state_bytes} bytes sent per rank" in out


def test_overhead_benchmark_reports_each_wrapper_against_the_plain_optimizer(tmp_path):
    proc = run_bounded([PYTHON, "-m", "ssd_allreduce.bench", "overhead", "--steps-per-round", "3", "--rounds", "2",
                        "--record", str(tmp_path / "overhead.json")],
                       env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "overhead.json").read_text())
    rendered = overhead.render_record(record)
    assert "median of 2 rounds of 3 steps" in rendered.splitlines()[0]
    assert rendered.split("\n\n", 1)[1].strip() in proc.stdout, "the documents' table is the one printed"
    rows = re.findall(r"\| (.+?) \| (plain|horovod|ssd warm-up|ssd delay stage) \| ([0-9.]+) \| ([-+][0-9.]+) \| "
                      r"([0-9.]+) \|", proc.stdout)
    assert [r[1] for r in rows] == ["plain", "horovod", "ssd warm-up", "ssd delay stage"] * 2, proc.stdout
    for model in ("many small tensors (162)", "few large tensors (6)"):
        ms = {r[1]: float(r[2]) for r in rows if r[0] == model}
        over = {r[1]: float(r[3]) for r in rows if r[0] == model}
        ratio = {r[1]: float(r[4]) for r in rows if r[0] == model}
        for kind in ms:
            assert over[kind] == pytest.approx(ms[kind] - ms["plain"], abs=2e-3)
            assert ratio[kind] == pytest.approx(ms[kind] / ms["horovod"], abs=2e-3)


def test_gpt_workload_compares_modes_on_validation_loss_and_runs_the_simulators_ablation(tmp_path):
    """Horovod and SSD-SGD on real ranks, then the simulator's GLU ablation. (The ablation's rows on
    real ranks are the same runs with other flags: tests/unit/test_options.py plans them, and
    tests/unit/test_delay.py checks the overwrite landing against the reference.)"""
    out = tmp_path / "gpt"
    proc = run_bounded([PYTHON, "-m", "ssd_allreduce.bench", "--workload", "gpt", "--max-steps", "10",
                        "--budget-factor", "2", "--lr-schedule", "cosine", "--eval-every", "5",
                        "--warmup-steps", "2", "--ssd-configs", "2:2", "--no-local-sgd", "--shards", "by-package",
                        "--ablation-config", "none", "--sim-steps", "6", "--sim-seeds", "1", "--sim-ranks", "2",
                        "--gpt-width", "32", "--gpt-layers", "1", "--context", "16", "--corpus-bytes", "200000",
                        "--eval-samples", "64", "--bandwidths", "none", "--out", str(out),
                        "--record", str(tmp_path / "docs" / "results" / "gpt.json")],
                       env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["horovod", "ssd k=2 d=2 beta=auto"]
    base, ssd = rows["horovod"], rows["ssd k=2 d=2 beta=auto"]
    # the others train twice Horovod's steps, each under a cosine schedule that ends at its own last step
    assert [step for step, _, _ in base["curve"]] == [5, 10]
    assert [step for step, _, _ in ssd["curve"]] == [5, 10, 15, 20]
    assert ssd["vs_horovod"] == pytest.approx(ssd["val_loss"] / base["val_loss"] - 1)
    assert all(r["val_loss"] < 5.55 for r in rows.values()), "ln 256: every mode learned something"
    # the table's loss is the model's at the last step: the run's own end-of-training evaluation agrees
    run = out / "runs" / "none" / "adamw-by-package-ssd_k2_d2_betaauto" / "metrics.jsonl"
    final = [json.loads(line) for line in run.read_text().splitlines() if '"kind": "epoch"' in line][-1]
    assert final["step"] == 20 and final["test_loss"] == pytest.approx(ssd["val_loss"], rel=1e-6)
    steps = [json.loads(line) for line in run.read_text().splitlines() if '"kind": "step"' in line]
    assert steps[9]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert steps[-1]["step"] == 20 and steps[-1]["lr"] == pytest.approx(0, abs=1e-12)
    # Horovod's mode wraps AdamW as it is: its final checkpoint holds AdamW's moments
    checkpoints = out / "runs" / "none" / "adamw-by-package-horovod" / "checkpoints"
    state = torch.load(checkpoints / (checkpoints / "latest").read_text().strip() / "rank-0.pt", weights_only=False)
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["optimizer"]["state"].values())))
    assert "ssd_sgd" not in state["optimizer"]
    assert {r["variant"] for r in results["simulator"]} == {"synchronous (k=1)", "overwrite", "glu beta=1",
                                                            "glu beta=0.5", "glu beta=0.25"}
    assert results["networks"] == ["unshaped loopback"] and {r["network"] for r in rows.values()} == {"unshaped loopback"}
    assert "| ssd k=2 d=2 beta=auto |" in (out / "results.md").read_text()
    assert "Horovod 10 steps and the others 20 with a cosine learning-rate schedule over each run" in \
        (out / "results.md").read_text()
    assert (out / "gpt_adamw_by-package.png").stat().st_size > 10_000
    # the time to Horovod's loss at its first validation at or after 50 % of its steps (step 5),
    # 75 % (step 10) and 100 % (step 10)
    assert base["x_horovod_to_50"] == base["x_horovod_to_75"] == base["x_horovod_to_100"] == 1.0
    losses = {step: loss for step, _, loss in base["curve"]}
    for r in rows.values():
        for percent, loss in ((50, losses[5]), (75, losses[10]), (100, losses[10])):
            base_time = next(wall for _, wall, value in base["curve"] if value <= loss)
            reached = [wall for _, wall, value in r["curve"] if value <= loss]
            assert r[f"x_horovod_to_{percent}"] == (pytest.approx(base_time / reached[0]) if reached else None)
    # the record: the same rows without their curves, its provenance, and the section it writes
    record = json.loads((tmp_path / "docs" / "results" / "gpt.json").read_text())
    assert record["horovod"] == "0.28.1" and record["commit"] and "--record" in record["command"]
    assert [r["name"] for r in record["rows"]] == list(rows) and all("curve" not in r for r in record["rows"])
    assert (tmp_path / "docs" / "results" / "gpt_adamw_by-package.png").stat().st_size > 10_000
    page = tmp_path / "docs" / "PAGE.md"
    page.write_text("<!-- results:gpt -->\n<!-- /results:gpt -->\n")
    assert report.main(["--docs", str(tmp_path / "docs")]) == 0
    assert f"| adamw | by-package | ssd k=2 d=2 beta=auto | {ssd['val_loss']:.4f} |" in page.read_text()


@pytest.mark.timeout(600)   # four runs of 4 ranks on 2 cores: 70-110 s here
def test_comparison_on_emulated_nodes_runs_every_window_flat_and_hierarchical(tmp_path):
    """4 ranks as 2 emulated nodes: the rows, the bytes that crossed the nodes' links, the cost model.
    (Blocking local SGD's rows are left out: its hierarchical landing is checked exactly, on every
    backend, by tests/ranks/test_hierarchical.py.)"""
    out = tmp_path / "nodes"
    proc = run_bounded([PYTHON, "-m", "ssd_allreduce.bench", "--ranks", "4", "--nodes", "2", "--bandwidths",
                        "200mbit", "--epochs", "2", "--ssd-configs", "5:5", "--no-local-sgd", "--warmup-steps", "4",
                        "--out", str(out)],
                       env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=570)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    (section,) = results["bandwidths"]
    rows = {r["name"]: r for r in section["rows"]}
    assert list(rows) == ["horovod", "ssd k=5 d=5", "ssd k=5 d=5 hier", "no-comm"]
    assert all(r["test_accuracy"] > 0.5 for r in rows.values())
    if section["measured_mbps"] is None:
        assert "NOTE: no emulated network" in proc.stdout
        return
    assert 160 < section["measured_mbps"] < 220 and "2 nodes x 2 ranks, links tbf 200mbit" in proc.stdout
    crossed = {name: r["inter_node_bytes_per_step"] for name, r in rows.items()}
    # Horovod sends every step's gradients between the nodes, SSD-SGD after its 4 synchronous steps
    # every fifth step's delta. A 22-step run's count is much else besides (start-up, evaluation,
    # Horovod's coordination: no-comm, without a collective, sent about 70 kB a step), which the
    # hierarchical rows' groups add to and their slower steps stretch (one run: Horovod 1.8x the
    # flat row, 1.3x the hierarchical one), so their payload is checked from bytes_per_window below
    # and the link's count against no-comm only
    assert crossed["horovod"] > 1.2 * crossed["ssd k=5 d=5"]
    assert crossed["no-comm"] < min(crossed["ssd k=5 d=5"], crossed["ssd k=5 d=5 hier"])
    assert rows["ssd k=5 d=5 hier"]["wire_bytes_per_step_per_rank"] is None
    # a window's payload: the whole delta flat, each rank's half of it between 2 nodes of 2 ranks
    flat, hier = rows["ssd k=5 d=5"]["bytes_per_window"], rows["ssd k=5 d=5 hier"]["bytes_per_window"]
    assert hier == pytest.approx(flat / 2, rel=0.05)
    checked = {c["name"] for c in results["node_cost_model"]}
    assert checked == set(rows) and "Cost model on the nodes" in (out / "results.md").read_text()
    assert "between nodes B/step" in proc.stdout
