"""The cost model on nodes: its limits are the flat model's, its hierarchical terms hand-computed,
its calibration recovers the numbers that made a measurement."""
from __future__ import annotations

import math

import pytest

from ssd_allreduce.bench import nodecost
from ssd_allreduce.bench.costmodel import Network, Workload, ring_allreduce_seconds
from ssd_allreduce.bench.nodecost import Cluster, calibrate_overlap, check_measured, step_seconds

W = Workload(param_bytes=100e6, compute_seconds=0.1)
INTER, INTRA = Network(10.0, 5.0), Network(1000.0, 1.0)


def test_cross_node_shards_share_the_node_link_hand_computed():
    c = Cluster(4, 8, INTER, INTRA)
    # 8 shards of 12.5 MB, each a ring over 4 nodes, the 8 rings through one 10 Gbit/s link
    expected = 6 * 5e-6 + 6 / 4 * 12.5e6 / (10e9 / 8 / 8)
    assert math.isclose(nodecost.cross_shards_seconds(100e6, c), expected)
    assert math.isclose(nodecost.node_gather_seconds(100e6, c), 7 * 1e-6 + 7 / 8 * 100e6 / (1000e9 / 8))


def test_one_rank_per_node_is_flat_and_one_node_is_synchronous():
    per_node = Cluster(4, 1, INTER, INTRA)
    for k, d in ((5, 5), (4, 0)):
        assert math.isclose(step_seconds("ssd-hier", W, per_node, k, d), step_seconds("ssd", W, per_node, k, d))
    one = Cluster(1, 8, INTER, INTRA)
    hide = W.backward_fraction * W.compute_seconds
    assert math.isclose(step_seconds("ssd-hier", W, one),
                        W.compute_seconds + max(0.0, ring_allreduce_seconds(100e6, 8, INTRA) - hide))


def test_hierarchical_windows_beat_flat_ones_where_the_node_link_is_slow():
    c = Cluster(8, 8, Network(1.0, 5.0), INTRA)
    assert step_seconds("ssd-hier", W, c, 5, 5) < step_seconds("ssd", W, c, 5, 5)
    assert step_seconds("horovod-hier", W, c) < step_seconds("horovod", W, c)
    assert step_seconds("no-comm", W, c) == W.compute_seconds


def test_overlap_calibration_recovers_the_overlap_of_a_step():
    c = Cluster(2, 4, Network(1.0, 5.0), INTRA)
    step = step_seconds("horovod", W, c, overlap=0.4)
    assert math.isclose(calibrate_overlap(step, W, c), 0.4)
    assert calibrate_overlap(W.compute_seconds + 10.0, W, c) == 0.0   # slower than no overlap at all
    fast = Cluster(2, 4, Network(1000.0, 0.0), INTRA)   # nothing exposed: the least overlap that hides it
    assert math.isclose(calibrate_overlap(W.compute_seconds, W, fast),
                        nodecost.flat_allreduce_seconds(W.param_bytes, fast) / W.compute_seconds)


def test_check_recovers_the_latencies_and_overlap_behind_synthetic_measurements():
    nodes, per_node, inter_us, intra_us, overlap = 2, 2, 300.0, 2000.0, 0.3
    w = Workload(param_bytes=4 * 2**20, compute_seconds=0.02)

    def rows(mbps):
        c = Cluster(nodes, per_node, Network(mbps / 1e3, inter_us), Network(10.0, intra_us))
        made = []
        for name, mode, k, d in (("horovod", "horovod", 1, 0), ("ssd k=5 d=5", "ssd", 5, 5),
                                 ("ssd k=5 d=5 hier", "ssd", 5, 5), ("local-sgd k=5", "local-sgd", 5, 0),
                                 ("local-sgd k=5 hier", "local-sgd", 5, 0), ("no-comm", "no-comm", 1, 0)):
            model = nodecost.row_mode({"mode": mode, "name": name})
            made.append({"name": name, "mode": mode, "sync_every_used": k, "delay_used": d, "parameter_mb": 4.0,
                         "compute_ms": 20.0, "step_ms": 1e3 * step_seconds(model, w, c, k, d, overlap=overlap)})
        return made
    checked = check_measured([(100.0, rows(100.0)), (20.0, rows(20.0))], nodes, per_node)
    assert {c["mbps"] for c in checked} == {100.0, 20.0}
    assert len(checked) == 12 and all(abs(c["error"]) < 1e-6 for c in checked), checked
    assert math.isclose(checked[0]["inter_latency_us"], inter_us, rel_tol=1e-6)
    assert math.isclose(checked[0]["intra_latency_us"], intra_us, rel_tol=1e-6)
    assert math.isclose(checked[0]["overlap"], overlap, rel_tol=1e-6)


def test_the_cluster_table_prints_every_size_and_link(capsys):
    nodecost.main(["--model", "resnet50", "--ranks", "8", "1024", "--bandwidths", "25gbit", "400gbit"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1:4] for r in rows] == [[" 8 ", " 1 ", " 25 "], [" 8 ", " 1 ", " 400 "],
                                               [" 1024 ", " 128 ", " 25 "], [" 1024 ", " 128 ", " 400 "]]


STAMP = {"commit": "abc1234", "date": "2026-12-06", "machine": "x86_64, 2 cores, Linux",
         "python": "3.11.7", "torch": "2.13.0", "horovod": "0.28.1"}


def test_the_record_writes_a_table_per_model_as_printed(tmp_path, capsys, monkeypatch):
    import json
    from ssd_allreduce.bench import report
    # the provenance asks git (a process): a stamp stands in for it here
    monkeypatch.setattr(report, "provenance", lambda command: {"command": command, **STAMP})
    record = tmp_path / "nodecost.json"
    nodecost.main(["--ranks", "8", "64", "--bandwidths", "25gbit", "--record", str(record)])
    printed = capsys.readouterr().out.split("wrote")[0].strip()
    written = json.loads(record.read_text())
    assert [(r["model"], r["gpus"]) for r in written["rows"]] == [("resnet50", 8), ("resnet50", 64),
                                                                  ("vit-b16", 8), ("vit-b16", 64)]
    rendered = nodecost.render_record(written)
    assert rendered.splitlines()[2] == "ResNet-50, batch 64 per GPU, 8 GPUs per node, k = 5, d = 5:"
    assert rendered.split("\n\n", 1)[1].strip() == printed.replace("resnet50,", "ResNet-50,").replace(
        "vit-b16,", "ViT-B/16,")


def test_bad_clusters_and_modes_raise():
    with pytest.raises(ValueError, match="nodes >= 1"):
        Cluster(0, 8, INTER, INTRA)
    with pytest.raises(ValueError, match="mode must be one of"):
        step_seconds("adasum", W, Cluster(1, 1, INTER, INTRA))
