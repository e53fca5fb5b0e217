"""Every shell script and sbatch template parses (``bash -n``) and passes ``shellcheck``; the
emulated cluster says it needs root, and what to type, when started without it."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from launchers import REPO

SCRIPTS = sorted([*REPO.glob("scripts/*.sh"), *REPO.glob("scripts/lib/*.sh"), *REPO.glob("slurm/*.sh"),
                  *REPO.glob("slurm/*.sbatch")])
pytestmark = pytest.mark.timeout(120)


def test_there_are_scripts_to_check() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"cluster_local.sh", "slurm_common.sh", "launch.sh", "train.sbatch", "sweep.sbatch"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_parses_it(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_finds_nothing() -> None:
    proc = subprocess.run(["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cluster_without_root_says_so(tmp_path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root here, and no setpriv to drop it")
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    # a copy any user can read: the checkout may sit in a home directory only root enters
    copy = Path(tempfile.mkdtemp(prefix="ssd-scripts-"))
    try:
        shutil.copytree(REPO / "scripts", copy / "scripts")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755)
        proc = subprocess.run([*drop, "bash", str(copy / "scripts" / "cluster_local.sh"), "up"], capture_output=True,
                              text=True, timeout=30, cwd="/",
                              env={**os.environ, "SSD_CLUSTER_DIR": "/nonexistent/cluster"})
    finally:
        shutil.rmtree(copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs root (try: sudo" in proc.stderr, proc.stderr
