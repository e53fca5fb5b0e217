"""Tests of the alpha-beta cost model against hand-computed numbers."""
from __future__ import annotations

import math

import pytest

from ssd_allreduce.bench import costmodel
from ssd_allreduce.bench.costmodel import (
    REFERENCE_MODELS,
    Network,
    Workload,
    baseline_step_seconds,
    cluster_table,
    no_comm_step_seconds,
    predict,
    prediction_error,
    ring_allreduce_seconds,
    ssd_step_seconds,
)

NET10 = Network(bandwidth_gbps=10.0, latency_us=5.0)
# 100 MB over 4 ranks at 10 Gbit/s (1.25e9 B/s), alpha 5 us:
#   2*3*5e-6 + 2*3/4 * 1e8 / 1.25e9 = 3e-5 + 0.12
T_AR_100MB_4 = 0.12003


def test_ring_allreduce_hand_computed() -> None:
    assert ring_allreduce_seconds(100e6, 4, NET10) == pytest.approx(T_AR_100MB_4, rel=1e-12)
    # 8 ranks, 1 GB at 100 Gbit/s, alpha 10 us: 14*1e-5 + 14/8 * 1e9 / 1.25e10
    assert ring_allreduce_seconds(1e9, 8, Network(100.0, 10.0)) == pytest.approx(0.14014)


def test_a_link_shared_by_the_ranks_carries_all_their_traffic() -> None:
    """The benchmark's ranks share one shaped loopback: 4 ranks take 4 times as long on the
    bandwidth term (each still pays its own latency hops)."""
    shared = Network(bandwidth_gbps=10.0, latency_us=5.0, shared_by=4)
    assert ring_allreduce_seconds(100e6, 4, shared) == pytest.approx(2 * 3 * 5e-6 + 4 * 2 * 3 / 4 * 1e8 / 1.25e9)
    with pytest.raises(ValueError, match="shared_by must be an integer >= 1, got 0"):
        Network(10.0, shared_by=0)


def test_one_rank_costs_nothing() -> None:
    assert ring_allreduce_seconds(100e6, 1, NET10) == 0.0
    w = Workload(param_bytes=100e6, compute_seconds=0.1)
    assert baseline_step_seconds(w, 1, NET10) == pytest.approx(0.1)


def test_baseline_hides_allreduce_behind_backward() -> None:
    w = Workload(param_bytes=100e6, compute_seconds=0.09, backward_fraction=2 / 3)
    # overlap 0.06 s, exposed 0.12003 - 0.06
    assert baseline_step_seconds(w, 4, NET10) == pytest.approx(0.09 + T_AR_100MB_4 - 0.06)
    fast = Workload(param_bytes=100e6, compute_seconds=0.3)
    assert baseline_step_seconds(fast, 4, NET10) == pytest.approx(0.3)


def test_ssd_fully_hidden_when_delay_covers_allreduce() -> None:
    w = Workload(param_bytes=100e6, compute_seconds=0.05)
    launch = 100e6 * 3 / 100e9
    # delay 3 -> 0.15 s of compute >= 0.12003 s allreduce: only launch cost, amortised over k
    assert ssd_step_seconds(w, 4, NET10, sync_every=5, delay=3) == pytest.approx(0.05 + launch / 5)
    # memory bandwidth is a parameter
    assert ssd_step_seconds(w, 4, NET10, 5, 3, memory_bw_gbytes=50.0) == pytest.approx(
        0.05 + 100e6 * 3 / 50e9 / 5)


def test_ssd_delay_zero_exposes_all() -> None:
    w = Workload(param_bytes=100e6, compute_seconds=0.05)
    launch = 100e6 * 3 / 100e9
    assert ssd_step_seconds(w, 4, NET10, sync_every=4, delay=0) == pytest.approx(
        0.05 + (T_AR_100MB_4 + launch) / 4)
    # partial hiding: delay 1 hides 0.05 s
    assert ssd_step_seconds(w, 4, NET10, sync_every=4, delay=1) == pytest.approx(
        0.05 + (T_AR_100MB_4 - 0.05 + launch) / 4)


def test_no_comm_is_compute() -> None:
    assert no_comm_step_seconds(Workload(1e6, 0.123)) == 0.123


@pytest.mark.parametrize("mode", ["baseline", "ssd"])
def test_monotonic_in_bandwidth(mode: str) -> None:
    w = REFERENCE_MODELS["resnet50"]
    bandwidths = [0.1, 1, 10, 25, 100, 400]
    steps = [
        baseline_step_seconds(w, 64, Network(bw)) if mode == "baseline"
        else ssd_step_seconds(w, 64, Network(bw), 5, 1)
        for bw in bandwidths
    ]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert steps[0] > steps[-1]


@pytest.mark.parametrize(
    ("k", "d", "needle"),
    [(0, 0, "got 0"), (-2, 0, "got -2"), (5, 6, "got 6"), (5, -1, "got -1"), (2.5, 1, "got 2.5")],
)
def test_bad_k_or_d_raise(k: int, d: int, needle: str) -> None:
    w = Workload(1e6, 0.01)
    with pytest.raises(ValueError, match=needle):
        ssd_step_seconds(w, 4, NET10, k, d)


@pytest.mark.parametrize(
    "make",
    [lambda: Network(0.0), lambda: Network(10.0, -1.0), lambda: Workload(-1.0, 0.1),
     lambda: Workload(1.0, 0.0), lambda: Workload(1.0, 0.1, 1.5),
     lambda: ring_allreduce_seconds(1.0, 0, NET10)],
)
def test_bad_inputs_raise(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_predict_modes_and_ratios() -> None:
    w = Workload(param_bytes=100e6, compute_seconds=0.05)
    base, ssd, none = predict(w, 4, NET10, batch_per_rank=32, sync_every=5, delay=3)
    assert [p.mode for p in (base, ssd, none)] == ["baseline", "ssd", "no-comm"]
    base_step = 0.05 + T_AR_100MB_4 - 0.05 * 2 / 3
    assert base.step_seconds == pytest.approx(base_step)
    assert base.throughput == pytest.approx(128 / base_step)
    assert base.speedup_vs_baseline == pytest.approx(1.0)
    assert ssd.speedup_vs_baseline == pytest.approx(base_step / ssd.step_seconds)
    assert none.fraction_of_no_comm == pytest.approx(1.0)
    assert none.throughput == pytest.approx(128 / 0.05)
    assert base.fraction_of_no_comm == pytest.approx(0.05 / base_step)
    assert all(p.ranks == 4 and p.bandwidth_gbps == 10.0 for p in (base, ssd, none))


def test_reference_models() -> None:
    assert REFERENCE_MODELS["resnet50"].param_bytes == pytest.approx(102.2e6, rel=1e-3)
    assert REFERENCE_MODELS["resnet20"].param_bytes == pytest.approx(0.27e6 * 4)
    assert REFERENCE_MODELS["vgg16"].param_bytes == pytest.approx(138.36e6 * 4, rel=1e-4)


def test_cluster_table_shape() -> None:
    table = cluster_table("resnet50", [8, 64], [10, 25, 100], sync_every=5, delay=5,
                          batch_per_rank=32)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["ranks", "Gbit/s", "baseline img/s", "SSD img/s", "SSD speedup",
                      "baseline % of no-comm", "SSD % of no-comm"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [(n, bw) for n in ("8", "64") for bw in ("10", "25", "100")]
    assert all(len(r) == len(header) for r in rows)
    first = predict(REFERENCE_MODELS["resnet50"], 8, Network(10.0), 32, 5, 5)
    assert rows[0][2] == f"{first[0].throughput:,.0f}"
    assert rows[0][4] == f"{first[1].speedup_vs_baseline:.2f}x"


def test_cluster_table_unknown_model() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        cluster_table("alexnet", [8], [10], 5, 5, 32)


def test_prediction_error() -> None:
    assert prediction_error(110.0, 100.0) == pytest.approx(0.1)
    assert prediction_error(90.0, 100.0) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="measured"):
        prediction_error(1.0, 0.0)


def test_main_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    costmodel.main(["--model", "resnet50", "--ranks", "8", "64", "256", "1024",
                    "--bandwidths", "10gbit", "25gbit", "100gbit", "--sync-every", "5", "--delay", "5"])
    out = capsys.readouterr().out
    assert out.startswith("| ranks |")
    assert len(out.strip().splitlines()) == 2 + 4 * 3


STAMP = {"commit": "abc1234", "date": "2026-12-06", "machine": "x86_64, 2 cores, Linux",
         "python": "3.11.7", "torch": "2.13.0", "horovod": "0.28.1"}


def test_the_record_writes_the_printed_table_with_its_command(tmp_path, capsys, monkeypatch) -> None:
    import json
    from ssd_allreduce.bench import report
    # the provenance asks git (a process): a stamp stands in for it here
    monkeypatch.setattr(report, "provenance", lambda command: {"command": command, **STAMP})
    record = tmp_path / "costmodel.json"
    costmodel.main(["--ranks", "8", "64", "--bandwidths", "10gbit", "--record", str(record)])
    printed = capsys.readouterr().out
    written = json.loads(record.read_text())
    assert written["command"] == f"python -m ssd_allreduce.bench costmodel --ranks 8 64 --bandwidths 10gbit --record {record}"
    assert [r["ranks"] for r in written["rows"]] == [8, 64]
    base, ssd, _ = predict(REFERENCE_MODELS["resnet50"], 64, Network(10.0), 32, 5, 5)
    assert written["rows"][1]["ssd_img_s"] == pytest.approx(ssd.throughput)
    assert written["rows"][1]["baseline_img_s"] == pytest.approx(base.throughput)
    table = costmodel.render_record(written)
    assert table.startswith(f"Command: `{written['command']}` (commit ")
    assert table.split("\n\n", 1)[1].strip() == printed.split("wrote")[0].strip()


def test_main_custom_workload(capsys: pytest.CaptureFixture[str]) -> None:
    costmodel.main(["--param-bytes", "100e6", "--compute-seconds", "0.05", "--ranks", "4",
                    "--bandwidths", "10gbit", "--sync-every", "5", "--delay", "3"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    base, ssd, _ = predict(Workload(100e6, 0.05), 4, NET10, 32, 5, 3)
    assert f"| {base.throughput:,.0f} | {ssd.throughput:,.0f} |" in row
    assert not math.isnan(ssd.throughput)


def test_main_rejects_bad_delay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        costmodel.main(["--sync-every", "5", "--delay", "7"])
    assert "delay (d)" in capsys.readouterr().err
