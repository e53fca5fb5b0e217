"""Faults injected for real: a rank stops itself (SIGSTOP: frozen) or is killed (SIGKILL) at a chosen
phase; every survivor must stop within the bound, saying where, the job must exit non-zero, and the
newest complete checkpoint must resume. Each run prints one JSON line of what it measured
(docs/RELIABILITY.md is filled from them)."""
from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO, horovodrun, launcher_env, mpirun, run_ranks, torchrun

pytestmark = pytest.mark.multirank
BOUND = 6            # --fault-timeout of these runs, seconds
SLACK = 5            # from the bound to the survivor's exit
TRAIN = ["-m", "ssd_allreduce.train", "--no-progress", "--data", "digits", "--model", "cnn", "--epochs", "3",
         "--warmup-steps", "10", "--sync-every", "4", "--fault-timeout", str(BOUND)]
# 2 ranks: 22 steps per epoch; epoch 0 ends with its evaluation, then its checkpoint, at step 22
LAUNCHERS = {
    "horovod-gloo": lambda *a: horovodrun(2, *a),
    "horovod-mpi": lambda *a: mpirun(2, *a),
    "torch-gloo": lambda *a: torchrun(2, *a, "--backend", "torch"),
    "mpi4py": lambda *a: mpirun(2, *a, "--backend", "mpi"),
}
EXPECTED_PHASE = {"warmup": re.escape("step 5 (warm-up: gradients averaged every step)"),
                  "window": r"step 3[0-9] \(a window in flight\)",
                  "checkpoint": "the checkpoint at step 22", "evaluation": "the evaluation after step 22"}


def inject(tmp_path: Path, launcher: str, fault: str) -> tuple[str, float]:
    """Run with the fault; returns (the ranks' output, the fault's time)."""
    out = tmp_path / "run"
    cmd = LAUNCHERS[launcher](*TRAIN, "--out", str(out), "--fault-at", f"{fault}:1")
    proc = subprocess.run(cmd, env=launcher_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=180, start_new_session=True)
    assert proc.returncode != 0, f"the job exited 0 after {fault}:\n{proc.stdout}"
    fault_file = out / "fault-rank1.time"
    assert fault_file.exists(), f"the fault {fault} was never reached:\n{proc.stdout}"
    return proc.stdout, float(fault_file.read_text())


@pytest.mark.parametrize("launcher, fault", [
    ("horovod-gloo", "stop:warmup:5"), ("horovod-gloo", "stop:window:30"), ("horovod-gloo", "kill:window:30"),
    ("horovod-gloo", "stop:evaluation:22"), ("horovod-gloo", "stop:checkpoint:22"),
    ("horovod-mpi", "stop:window:30"), ("torch-gloo", "stop:window:30"), ("mpi4py", "stop:window:30"),
])
def test_a_lost_rank_stops_the_survivor_within_the_bound_saying_where(tmp_path, launcher, fault):
    output, fault_time = inject(tmp_path, launcher, fault)
    phase = EXPECTED_PHASE[fault.split(":")[1]]
    said = re.search(rf"rank 0 at (\S+): (stopped during|no progress for \d+ s during) ({phase})[^\n]*", output)
    assert said, f"rank 0 did not say where it stopped ({phase}):\n{output}"
    seconds = datetime.fromisoformat(said[1]).timestamp() - fault_time
    assert seconds < BOUND + SLACK, f"rank 0 stopped {seconds:.1f} s after the fault:\n{output}"
    print(json.dumps({"launcher": launcher, "fault": fault, "seconds": round(seconds, 1),
                      "message": said[0][:160]}))


def test_after_a_lost_rank_the_newest_complete_checkpoint_resumes(tmp_path):
    inject(tmp_path, "horovod-gloo", "kill:window:30")       # after epoch 0's checkpoint (step 22)
    out = run_ranks(horovodrun(2, *TRAIN, "--out", str(tmp_path / "run"), "--resume"))
    assert "resumed from" in out and "step-00000022 at epoch 1, step 22" in out
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["steps"] == 66
