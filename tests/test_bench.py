"""The benchmark as users run it: one short side-by-side comparison, the ablation, the synthetic mode."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, horovodrun, launcher_env, run_ranks

pytestmark = pytest.mark.multirank


def test_short_comparison_writes_side_by_side_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([PYTHON, "-m", "ssd_allreduce.bench", "--bandwidths", "100mbit", "--epochs", "2",
                           "--ssd-configs", "4:4", "--warmup-steps", "4", "--out", str(out)],
                          env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    (section,) = results["bandwidths"]
    rows = {r["name"]: r for r in section["rows"]}
    assert list(rows) == ["horovod", "ssd k=4 d=4", "local-sgd k=5", "no-comm"]
    base, ssd = rows["horovod"], rows["ssd k=4 d=4"]
    assert base["x_horovod"] == 1.0 and rows["no-comm"]["x_no_comm"] == 1.0
    assert ssd["bytes_per_step"] / base["bytes_per_step"] == pytest.approx(0.25, rel=0.01)
    assert rows["no-comm"]["bytes_per_step"] == 0 and ssd["extra_state_mb"] > 0
    assert all(r["test_accuracy"] > 0.5 and r["images_per_sec"] > 0 for r in rows.values())
    if section["measured_mbps"] is not None:       # shaped: the emulated link was measured
        assert 80 < section["measured_mbps"] < 110 and "tbf 100mbit" in proc.stdout
    else:
        assert "NOTE: no emulated network" in proc.stdout
    assert any("ssd k=4 d=4" in t and "bytes/step = 0.25" in t for t in section["targets"])
    assert {c["name"] for c in section["cost_model"]} == set(rows)
    assert "| ssd k=4 d=4 |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000


def test_ablation_table(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ssd_allreduce.bench", "--ablation", "--ablation-workers", "2",
                           "--ablation-epochs", "1", "--ablation-seeds", "1", "--ablation-k", "2",
                           "--out", str(tmp_path)], env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "ablation.md").read_text()
    for variant in ("ssgd", "overwrite", "glu_beta=1.0", "glu_beta=0.5", "glu_beta=0.25", "glu_beta=0.1"):
        assert f"| {variant} | 0." in table


def test_synthetic_mode_prints_horovod_style_img_per_sec():
    out = run_ranks(horovodrun(2, "-m", "ssd_allreduce.bench", "synthetic", "--model", "cnn", "--no-cuda",
                               "--batch-size", "8", "--num-warmup-batches", "1", "--num-batches-per-iter", "2",
                               "--num-iters", "2", "--mode", "ssd", "--sync-every", "2"))
    assert "Number of CPUs: 2" in out and "Img/sec per CPU:" in out and "Total img/sec on 2 CPU(s):" in out
