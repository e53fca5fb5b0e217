"""Faults injected for real: a rank stops itself (SIGSTOP: frozen) or is killed (SIGKILL) at a chosen
phase; every survivor must stop within the bound, saying where, the job must exit non-zero, and the
newest complete checkpoint must resume. Each run prints one JSON line of what it measured; with
$SSD_FAULT_RECORD=FILE the module writes them all to FILE with their provenance (docs/RELIABILITY.md's
table is written from docs/results/faults.json: `scripts/bench.sh faults`)."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from launchers import REPO, WORKERS, horovodrun, launcher_env, mpirun, run_bounded, run_ranks, torchrun

BOUND = 6            # --fault-timeout of these runs, seconds
SLACK = 5            # from the bound to the survivor's exit
TRAIN = ["-m", "ssd_allreduce.train", "--no-progress", "--data", "digits", "--model", "cnn", "--epochs", "3",
         "--warmup-steps", "10", "--sync-every", "4", "--delay", "4", "--fault-timeout", str(BOUND)]
# 2 ranks: 22 steps per epoch; epoch 0 ends with its evaluation, then its checkpoint, at step 22
LAUNCHERS = {
    "horovod-gloo": lambda *a: horovodrun(2, *a),
    "horovod-mpi": lambda *a: mpirun(2, *a),
    "torch-gloo": lambda *a: torchrun(2, *a, "--backend", "torch"),
    "mpi4py": lambda *a: mpirun(2, *a, "--backend", "mpi"),
}
# windows launch at steps 13, 17, ..., 29, 33 and land 4 steps later: a rank lost at step 30 has landed
# the window of step 25 (so the survivor had launched it) and never sends the one of step 33 (so the
# survivor cannot land it at step 37): the survivor stops at a step from 25 to 37, behind the lost
# rank where the loss is seen at once (a killed rank's closed connections), ahead where a bound must pass
EXPECTED_PHASE = {"warmup": re.escape("step 5 (warm-up: gradients averaged every step)"),
                  "window": r"step (2[5-9]|3[0-7]) \(a window in flight\)",
                  "checkpoint": "the checkpoint at step 22", "evaluation": "the evaluation after step 22"}


def inject(tmp_path: Path, launcher: str, fault: str, lost: int = 1) -> tuple[str, float, int, float]:
    """Run with the fault sent to rank ``lost``; returns (the ranks' output, the fault's time, the
    lost rank's pid, the job's end). A frozen rank is killed once a survivor has said where it
    stopped, or the bound (and slack) has passed: launchers wait long for a stopped process to end
    (torchrun 30 s)."""
    out, log = tmp_path / "run", tmp_path / "ranks.log"
    fault_file = out / f"fault-rank{lost}.time"
    cmd = LAUNCHERS[launcher](*TRAIN, "--out", str(out), "--fault-at", f"{fault}:{lost}")
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=launcher_env(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        end, killed = time.monotonic() + 180, False
        while proc.poll() is None:
            if time.monotonic() > end:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"the job did not end within 180 s of its start:\n{log.read_text()}")
            written = fault_file.read_text().split() if fault_file.exists() else []
            if fault.startswith("stop") and not killed and len(written) == 2:
                frozen_at, frozen = written
                if time.time() > float(frozen_at) + BOUND + SLACK or SURVIVOR_STOPPED.search(log.read_text()):
                    killed = True
                    try:
                        os.kill(int(frozen), signal.SIGKILL)
                    except ProcessLookupError:   # the launcher ended it already
                        pass
            time.sleep(0.2)
    ended, output = time.time(), log.read_text()
    assert proc.returncode != 0, f"the job exited 0 after {fault}:\n{output}"
    assert fault_file.exists(), f"the fault {fault} was never reached:\n{output}"
    when, pid = fault_file.read_text().split()
    return output, float(when), int(pid), ended


SURVIVOR_STOPPED = re.compile(r"rank \d+ at \S+: (stopped during|no progress for \d+ s during) .*\n")
PHASE_FAULTS = ("stop:warmup:5", "stop:window:30", "kill:window:30", "stop:evaluation:22", "stop:checkpoint:22")
# The suite runs every phase on Horovod with Gloo and a frozen window on the other backends;
# SSD_FAULT_MATRIX=full runs every phase on every backend (docs/RELIABILITY.md's table).
CASES = [(launcher, fault, 1) for launcher in LAUNCHERS for fault in PHASE_FAULTS
         if os.environ.get("SSD_FAULT_MATRIX") == "full" or launcher == "horovod-gloo" or fault == "stop:window:30"]
CASES.insert(len(PHASE_FAULTS), ("horovod-gloo", "stop:window:30", 0))


@pytest.fixture(scope="module")
def measured():
    """Every case's measurement; written to $SSD_FAULT_RECORD once the module is done, and only
    when every case passed (a table with a case missing is not written)."""
    rows: list[dict] = []
    started = time.time()
    yield rows
    record = os.environ.get("SSD_FAULT_RECORD")
    if record and len(rows) == len(CASES):
        from ssd_allreduce.bench.report import provenance
        matrix = "SSD_FAULT_MATRIX=full " if os.environ.get("SSD_FAULT_MATRIX") == "full" else ""
        stamp = provenance(f"{matrix}pytest tests/e2e/test_faults.py -k lost_rank")
        Path(record).write_text(json.dumps({**stamp, "seconds": round(time.time() - started), "bound_s": BOUND, "rows": rows}, indent=1) + "\n")


@pytest.mark.parametrize("launcher, fault, lost", CASES)
def test_a_lost_rank_stops_the_survivor_within_the_bound_saying_where_and_who(tmp_path, measured, launcher, fault,
                                                                             lost):
    output, fault_time, pid, ended = inject(tmp_path, launcher, fault, lost)
    phase = EXPECTED_PHASE[fault.split(":")[1]]
    survivor = 1 - lost
    if fault.startswith("kill") and launcher in ("horovod-mpi", "mpi4py"):
        # mpirun ends the whole job as soon as a rank dies, saying which: the survivor has no time to
        said = re.search(rf"mpirun noticed that process rank {lost} .* exited on signal 9", output)
        assert said and ended - fault_time < BOUND + SLACK, f"{ended - fault_time:.1f} s:\n{output}"
        measured.append({"launcher": launcher, "fault": f"{fault}:{lost}", "seconds": round(ended - fault_time, 1),
                         "message": said[0], "job_end": True})
        print(json.dumps(measured[-1]))
        return
    said = re.search(rf"rank {survivor} at (\S+): (stopped during|no progress for \d+ s during) ({phase})[^\n]*",
                     output)
    assert said, f"rank {survivor} did not say where it stopped ({phase}):\n{output}"
    seconds = datetime.fromisoformat(said[1]).timestamp() - fault_time
    assert seconds < BOUND + SLACK, f"rank {survivor} stopped {seconds:.1f} s after the fault:\n{output}"
    # the roll call names the lost rank, its pid and (rank 0 keeps the roll call) how it went
    who = rf"lost: rank {lost} \(pid {pid} on [^)]+\), " + ("which keeps the roll call, does not answer" if lost == 0
                                                            else r"last heard at (start-up|step \d+|the )")
    assert re.search(who, said[0]), f"rank {survivor} did not name rank {lost} as lost:\n{said[0]}"
    measured.append({"launcher": launcher, "fault": f"{fault}:{lost}", "seconds": round(seconds, 1),
                     "message": said[0], "job_end": False})
    print(json.dumps(measured[-1]))


def test_after_a_lost_rank_the_newest_complete_checkpoint_resumes(tmp_path):
    inject(tmp_path, "horovod-gloo", "kill:window:30")       # after epoch 0's checkpoint (step 22)
    out = run_ranks(horovodrun(2, *TRAIN, "--out", str(tmp_path / "run"), "--resume"))
    assert "resumed from" in out and "step-00000022 at epoch 1, step 22" in out
    summary = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["steps"] == 66


def test_the_roll_call_names_a_frozen_third_rank_and_nobody_when_every_rank_leaves():
    """3 real ranks: an error on every rank (each says it is leaving) names nobody; a frozen rank 2
    is named by both survivors with its pid, host and where it last beat."""
    proc = run_bounded(horovodrun(3, str(WORKERS / "rollcall_ranks.py")), env=launcher_env(),
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    verdicts = dict(((scene, int(rank)), said) for scene, rank, said in
                    re.findall(r"VERDICT (\w+) (\d) (.*)$", proc.stdout, re.M))
    assert [verdicts.get(("leaving", r)) for r in range(3)] == ["''"] * 3, proc.stdout
    for survivor in (0, 1):
        assert re.fullmatch(r"'; lost: rank 2 \(pid \d+ on [^)]+\), last heard at step 14'",
                            verdicts.get(("frozen", survivor), "")), proc.stdout


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_a_rank_that_crashes_in_native_code_prints_where_each_thread_was_then_mpis_report():
    """A real segmentation fault in a rank of mpirun with Horovod initialised: Python's stack of
    every thread first, then the backend's own handler (MPI's), which the rank's handler calls, and
    the launcher's word that the rank died of it."""
    code = ("import ctypes, threading\n"
            "from ssd_allreduce.train.launch import init_distributed\n"
            "init_distributed('horovod', 'cpu')\n"
            "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
            "def crash_in_native_code():\n"
            "    ctypes.string_at(0)\n"
            "crash_in_native_code()\n")
    env = {k: v for k, v in launcher_env().items() if k not in ("PYTHONFAULTHANDLER", "PYTHONDEVMODE")}
    proc = run_bounded(mpirun(1, "-c", code), env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                       preexec_fn=_no_core_dump)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Fatal Python error: Segmentation fault" in out, out
    assert re.search(r"line 6 in crash_in_native_code\n.*line 7 in <module>", out), out
    assert out.count("Thread 0x") + out.count("Current thread 0x") >= 2, out   # the waiting thread's too
    assert "signal 11" in out, out   # mpirun's word
    python_stack, mpi_report = proc.stderr.find("Fatal Python error"), proc.stderr.find("Signal: Segmentation fault")
    assert 0 <= python_stack < mpi_report, out
