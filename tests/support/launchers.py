"""Launching real ranks with a timeout that shows what every rank printed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
WORKERS = REPO / "tests" / "support" / "workers"


def launcher_env(extra: Optional[dict[str, Optional[str]]] = None) -> dict[str, str]:
    """This environment for a launcher and its ranks, with ``extra``'s variables (None: unset)."""
    env = dict(os.environ)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        # OpenMPI as root, more ranks than cores, inside containers:
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "PATH": f"{BIN}:{env.get('PATH', '')}",
    })
    # Ranks here share 2 cores with the other pytest worker: a waiting mpirun rank yields its core
    # (OpenMPI busy-polls otherwise) and Horovod's background loop wakes every 5 ms, not every 1 ms.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("HOROVOD_CYCLE_TIME", "5")
    env.update(extra or {})
    return {name: value for name, value in env.items() if value is not None}


def run_bounded(cmd: Sequence[str], timeout: float, capture_output: bool = False,
                context: Optional[Callable[[], str]] = None, **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own whose whole process group is killed at the
    timeout, or when the test is stopped (pytest-timeout's signal, ^C), not only its first
    process: a hung launcher's ranks must not outlive the test and take the cores from the next
    one. (Horovod starts each rank in a session of its own, under a middleman that ends it when
    the launcher dies, within the 30 s allowed here.) A timeout fails the test with what the
    command printed by then, and what ``context()`` adds (e.g. daemons' logs)."""
    if capture_output:
        if "stdout" in popen or "stderr" in popen:
            raise ValueError("stdout and stderr may not be used with capture_output")
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(list(cmd), start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        try:
            printed = "".join(_text(part) for part in proc.communicate(timeout=30))
        except subprocess.TimeoutExpired as still:   # a descendant in a session of its own holds the pipe
            printed = _text(still.stdout) + _text(still.stderr) + "\n(its output pipe stayed open)"
        try:
            more = f"\n{context()}" if context else ""
        except Exception as exc:   # the timeout's own message matters more
            more = f"\n(its context could not be read: {exc!r})"
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}\n--- its output ---\n{printed}{more}")
    except BaseException:
        _kill_session(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:   # it ended on its own meanwhile
        pass
    proc.wait()


def _text(part: Any) -> str:
    return part.decode(errors="replace") if isinstance(part, bytes) else (part or "")


def run_ranks(cmd: Sequence[str], timeout: float = 240, env: Optional[dict[str, Optional[str]]] = None,
              cwd: Optional[Path] = None) -> str:
    """Run a multi-rank command; on failure or timeout, fail showing every rank's output."""
    proc = run_bounded(cmd, timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=launcher_env(env), cwd=cwd or REPO)
    if proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n--- ranks' output ---\n{proc.stdout}")
    return proc.stdout


def horovodrun(np: int, *args: str) -> list[str]:
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
            "--network-interface", "lo", PYTHON, *args]


def torchrun(np: int, *args: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={np}", *args]


def mpirun(np: int, *args: str) -> list[str]:
    return [shutil.which("mpirun") or "mpirun", "-np", str(np), "--bind-to", "none",
            "-x", "PYTHONUNBUFFERED", "-x", "OMP_NUM_THREADS", "-x", "PATH", PYTHON, *args]
