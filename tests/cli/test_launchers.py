"""The suite's own bound on the commands it starts (support/launchers.py): a command past its
timeout fails its test with what it printed, and nothing it started lives on."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launchers import run_bounded

pytestmark = pytest.mark.timeout(60)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE   # killed, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


def test_a_command_past_its_timeout_fails_with_its_output_and_its_children_are_killed(tmp_path: Path):
    child = tmp_path / "child.pid"
    # a launcher whose rank hangs: the rank is a child of the command, not the command itself
    script = f"sleep 300 & echo $! > {child}; echo the rank started; wait"
    started = time.monotonic()
    failure = r"(?s)timed out after 5 s: bash -c .*the rank started.*the daemons' log"
    with pytest.raises(pytest.fail.Exception, match=failure):
        run_bounded(["bash", "-c", script], timeout=5, context=lambda: "the daemons' log",
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert time.monotonic() - started < 30
    _assert_gone(int(child.read_text()))


def test_a_test_stopped_while_its_command_runs_takes_the_command_with_it(tmp_path: Path):
    """A test stopped mid-wait (here ^C, raised by a timer once the command's child is running)
    takes the command's whole session with it."""
    child = tmp_path / "child.pid"

    def stop(signum, frame):
        if not child.exists() or not child.read_text().strip():
            signal.setitimer(signal.ITIMER_REAL, 0.5)   # the child is not started yet: look again
            return
        raise KeyboardInterrupt

    # pytest-timeout's bound uses the same timer: it is put back, less the time spent here
    previous, (left, _) = signal.signal(signal.SIGALRM, stop), signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_bounded(["bash", "-c", f"sleep 300 & echo $! > {child}; wait"], timeout=50)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if left:
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - started), 1))
    _assert_gone(int(child.read_text()))


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"the command's child {pid} outlived it"


def test_a_command_within_its_timeout_returns_like_subprocess_run(tmp_path: Path):
    proc = run_bounded(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    with pytest.raises(ValueError, match="capture_output"):
        run_bounded(["true"], timeout=30, capture_output=True, stdout=subprocess.PIPE)
