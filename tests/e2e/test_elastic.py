"""Horovod elastic training: a rank removed and added back through the host-discovery script, as
on a cluster whose scheduler takes a node away and gives it back. Training must go on at each
change, from the last commit, with the new world size, and finish with every rank alike."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launchers import BIN, PYTHON, REPO, horovodrun, launcher_env, run_ranks

TRAIN = ["-m", "ssd_allreduce.train", "--no-progress", "--data", "digits", "--model", "cnn", "--elastic",
         "--commit-every", "10", "--warmup-steps", "10", "--sync-every", "4", "--epochs", "400",
         "--checkpoint-every", "0", "--fault-timeout", "60"]
STEPS = 500   # of the run whose rank is removed and added back


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(proc: subprocess.Popen, what: str, test, timeout: float, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if test():
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()}")


def test_a_rank_removed_and_added_back_by_the_discovery_script(tmp_path):
    """Slots 2 -> 1 -> 2: each change happens at a commit, so no step is lost or repeated; the
    learning rate and its schedule follow the size; the rank that joins takes rank 0's SSD-SGD state.
    The changes come within about 100 steps of step 120 (the ranks wait in the rendezvous while the
    joining one starts), so STEPS leaves a few hundred to spare."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    run, log = tmp_path / "run", tmp_path / "ranks.log"
    # rank 0 sleeps 3 x its compute per step (about 50 steps/s), so the changes land mid-run; the
    # rate drops tenfold at epoch 5 (step 110 with 2 ranks, 22 steps per epoch)
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
           str(discover), "--gloo", "--network-interface", "lo", PYTHON, *TRAIN, "--mode", "ssd",
           "--max-steps", str(STEPS), "--slow-rank", "0", "--slow-fraction", "3", "--lr-schedule", "step",
           "--lr-milestones", "5", "--out", str(run)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=launcher_env(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            def latest_step() -> int:
                return max((r["step"] for r in records(run) if r["kind"] == "step"), default=0)

            def membership(ranks: int) -> bool:
                return any(r["kind"] == "membership" and r["ranks"] == ranks for r in records(run))

            wait_for(proc, "step 120", lambda: latest_step() >= 120, 120, log)
            hosts.write_text("localhost:1\n")
            wait_for(proc, "the change to 1 rank", lambda: membership(1), 120, log)
            hosts.write_text("localhost:2\n")
            wait_for(proc, "the change back to 2 ranks", lambda: membership(2), 120, log)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    recs = records(run)
    changes = [(r["were"], r["ranks"], r["step"]) for r in recs if r["kind"] == "membership"]
    assert [c[:2] for c in changes] == [(2, 1), (1, 2)], (changes, output)
    assert all(step % 10 == 0 for *_, step in changes), changes          # at a commit (--commit-every 10)
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == list(range(1, STEPS + 1)), output
    removed, added = changes[0][2], changes[1][2]
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "step"}
    # 2 x, then 1 x, then 2 x the one-rank rate, past the milestone: the schedule counts epochs, which
    # are twice as many steps with one rank
    assert lrs[50] == pytest.approx(0.1) and removed > 120, (lrs[50], removed)
    assert (lrs[removed], lrs[removed + 1], lrs[added], lrs[added + 1]) == pytest.approx((0.01, 0.005, 0.005, 0.01))
    assert "SSD-SGD state taken from rank 0" in output, output
    # SPEC: after a change every rank's local weights are W, the same W on every rank
    after = re.findall(r"rank (\d) of (\d) at step (\d+); local weights at W: (\w+), W sum (\S+)", output)
    assert sorted((r, n, int(step)) for r, n, step, *_ in after) == [
        ("0", "1", removed), ("0", "2", added), ("1", "2", added)], output
    assert all(at == "True" for *_, at, _ in after), after
    assert len({w for r, n, step, at, w in after if n == "2"}) == 1, after
    summary = [r for r in recs if r["kind"] == "summary"][-1]
    assert summary["ranks"] == 2 and summary["test_accuracy"] > 0.9, summary
    # the counts run on across the changes: k = 4 from step 11 lands about 120 windows, the last
    # change (near step 200) leaves about 75 after it
    assert summary["ssd_stats"]["windows_landed"] > 100, summary


def test_a_rank_joining_a_self_tuned_run_makes_the_same_collectives_and_takes_w(tmp_path):
    """1 -> 2 with --sync-every auto: whether a launch re-checks the window (a blocking
    agreement) is in the state the joining rank adopts from rank 0, so the two ranks make the same
    collectives (a rank deciding from its own timings made Horovod wait forever)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    run, log = tmp_path / "run", tmp_path / "ranks.log"
    train = [a for a in TRAIN if a not in ("--sync-every", "4")]
    cmd = [str(BIN / "horovodrun"), "-np", "1", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
           str(discover), "--gloo", "--network-interface", "lo", PYTHON, *train, "--mode", "ssd", "--sync-every", "auto",
           "--max-steps", "350", "--slow-rank", "0", "--slow-fraction", "3", "--out", str(run)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=launcher_env(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(proc, "step 100", lambda: any(r["kind"] == "step" and r["step"] >= 100 for r in records(run)),
                     120, log)
            hosts.write_text("localhost:2\n")
            wait_for(proc, "the change to 2 ranks",
                     lambda: any(r["kind"] == "membership" and r["ranks"] == 2 for r in records(run)), 120, log)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    after = re.findall(r"rank (\d) of 2 at step (\d+); local weights at W: (\w+), W sum (\S+)", output)
    assert sorted(r for r, *_ in after) == ["0", "1"] and all(at == "True" for *_, at, _ in after), output
    assert len({w for *_, w in after}) == 1, after
    summary = [r for r in records(run) if r["kind"] == "summary"][-1]
    assert summary["ranks"] == 2 and summary["steps"] == 350, summary


def test_a_crashed_rank_is_dropped_and_training_goes_on_from_the_last_commit(tmp_path):
    """A second host whose rank is SIGKILLed mid-window: Horovod blacklists the host, the survivor's
    collective fails, every survivor restores the last commit and training finishes on what is left.
    The second host is this machine under 127.0.0.2, which Horovod does not count as local and so
    reaches through `ssh`: here a stand-in that runs the command on this machine."""
    shim = tmp_path / "bin" / "ssh"
    shim.parent.mkdir()
    shim.write_text('#!/bin/bash\n# ssh [options] HOST COMMAND: run COMMAND here\nexec bash -c "${@: -1}"\n')
    shim.chmod(0o755)
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.2:1\n")
    discover.chmod(0o755)
    run = tmp_path / "run"
    epochs = [a for a in TRAIN if a not in ("--epochs", "400")] + ["--epochs", "6", "--mode", "ssd"]
    out = run_ranks([str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
                     str(discover), "--gloo", "--network-interface", "lo", PYTHON, *epochs, "--out", str(run),
                     "--fault-at", "kill:window:54:1"],     # rank 1 is the one on 127.0.0.2
                    timeout=240, env={"PATH": f"{shim.parent}:{BIN}:{os.environ.get('PATH', '')}"})
    assert (run / "fault-rank1.time").exists(), out             # the rank on the second host was killed
    recs = records(run)
    changes = [(r["were"], r["ranks"], r["step"]) for r in recs if r["kind"] == "membership"]
    assert changes == [(2, 1, 50)], (changes, out)               # back to the commit before step 54
    assert "rank 0: 1 ranks now (were 2): continuing from the commit at step 50" in out, out
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    # the survivor may be a step or two behind the killed rank when its collective fails (before
    # step 54), so the restore is where step 51 comes again
    assert 51 in steps, steps
    restored = len(steps) - 1 - steps[::-1].index(51)
    assert restored >= 50 and steps[:restored] == list(range(1, restored + 1)), steps
    assert steps[restored:] == list(range(51, 51 + len(steps) - restored)), steps
    summary = [r for r in recs if r["kind"] == "summary"][-1]
    # 2 epochs and 6 of 22 steps by 2 ranks; alone, 12 of 44 are done, so 32 steps and 3 more epochs of 44
    assert summary["ranks"] == 1 and summary["steps"] == 50 + 32 + 3 * 44 and summary["test_accuracy"] > 0.9, summary


def test_a_preempted_elastic_run_says_how_to_resume_and_that_resume_finishes_it(tmp_path):
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:2\n")
    discover.chmod(0o755)
    run = tmp_path / "run"
    common = ["--mode", "ssd", "--epochs", "3", "--out", str(run)]   # the last --epochs counts
    out = run_ranks([str(BIN / "horovodrun"), "-np", "2", "--min-np", "2", "--max-np", "2",
                     "--host-discovery-script", str(discover), "--gloo", "--network-interface", "lo", PYTHON,
                     *TRAIN, *common, "--preempt-at-step", "30", "--signal-check-every", "10"], timeout=180)
    assert "rerun with --resume, without --elastic, at this number of ranks to continue" in out, out
    run_ranks(horovodrun(2, *[a for a in TRAIN if a != "--elastic"], *common, "--resume"), timeout=180)
    done = [r for r in records(run) if r["kind"] == "summary"]
    assert done and done[-1]["steps"] == 3 * 22, done


# where --elastic is refused: checked in this process, tests/unit/test_options.py
