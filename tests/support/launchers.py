"""Launching real ranks with a timeout that shows what every rank printed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
WORKERS = REPO / "tests" / "support" / "workers"


def launcher_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        # OpenMPI as root, more ranks than cores, inside containers:
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "PATH": f"{BIN}:{env.get('PATH', '')}",
    })
    env.update(extra or {})
    return env


def run_ranks(cmd: Sequence[str], timeout: float = 240, env: Optional[dict[str, str]] = None,
              cwd: Optional[Path] = None) -> str:
    """Run a multi-rank command; on failure or timeout, fail showing every rank's output."""
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=launcher_env(env), cwd=cwd or REPO,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n--- ranks' output ---\n{out}")
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
