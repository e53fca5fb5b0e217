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


def inject(tmp_path: Path, launcher: str, fault: str, lost: int = 1) -> tuple[str, float, int]:
    """Run with the fault sent to rank ``lost``; returns (the ranks' output, the fault's time, the
    lost rank's pid)."""
    out = tmp_path / "run"
    cmd = LAUNCHERS[launcher](*TRAIN, "--out", str(out), "--fault-at", f"{fault}:{lost}")
    proc = subprocess.run(cmd, env=launcher_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=180, start_new_session=True)
    assert proc.returncode != 0, f"the job exited 0 after {fault}:\n{proc.stdout}"
    fault_file = out / f"fault-rank{lost}.time"
    assert fault_file.exists(), f"the fault {fault} was never reached:\n{proc.stdout}"
    when, pid = fault_file.read_text().split()
    return proc.stdout, float(when), int(pid)


@pytest.mark.parametrize("launcher, fault, lost", [
    ("horovod-gloo", "stop:warmup:5", 1), ("horovod-gloo", "stop:window:30", 1), ("horovod-gloo", "kill:window:30", 1),
    ("horovod-gloo", "stop:evaluation:22", 1), ("horovod-gloo", "stop:checkpoint:22", 1),
    ("horovod-gloo", "stop:window:30", 0), ("horovod-mpi", "stop:window:30", 1), ("torch-gloo", "stop:window:30", 1),
    ("mpi4py", "stop:window:30", 1),
])
def test_a_lost_rank_stops_the_survivor_within_the_bound_saying_where_and_who(tmp_path, launcher, fault, lost):
    output, fault_time, pid = inject(tmp_path, launcher, fault, lost)
    phase = EXPECTED_PHASE[fault.split(":")[1]]
    survivor = 1 - lost
    said = re.search(rf"rank {survivor} at (\S+): (stopped during|no progress for \d+ s during) ({phase})[^\n]*",
                     output)
    assert said, f"rank {survivor} did not say where it stopped ({phase}):\n{output}"
    seconds = datetime.fromisoformat(said[1]).timestamp() - fault_time
    assert seconds < BOUND + SLACK, f"rank {survivor} stopped {seconds:.1f} s after the fault:\n{output}"
    # the roll call names the lost rank, its pid and (rank 0 keeps the roll call) how it went
    who = rf"lost: rank {lost} \(pid {pid} on [^)]+\), " + ("which keeps the roll call, does not answer" if lost == 0
                                                            else r"silent since it was at (start-up|step \d+|the )")
    assert re.search(who, said[0]), f"rank {survivor} did not name rank {lost} as lost:\n{said[0]}"
    print(json.dumps({"launcher": launcher, "fault": f"{fault}:{lost}", "seconds": round(seconds, 1),
                      "message": said[0][:240]}))


def test_after_a_lost_rank_the_newest_complete_checkpoint_resumes(tmp_path):
    inject(tmp_path, "horovod-gloo", "kill:window:30")       # after epoch 0's checkpoint (step 22)
    out = run_ranks(horovodrun(2, *TRAIN, "--out", str(tmp_path / "run"), "--resume"))
    assert "resumed from" in out and "step-00000022 at epoch 1, step 22" in out
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["steps"] == 66
