"""Every shell script and sbatch template parses (``bash -n``) and passes ``shellcheck``; the
emulated cluster says it needs root, and what to type, when started without it."""
from __future__ import annotations

import json
import os
import re
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


def test_bench_lists_every_section_and_each_record_was_measured_by_its_section() -> None:
    """A committed record's command is what its section of bench.sh runs (then its output folder),
    and the list says how long each recorded section took."""
    listing = subprocess.run([str(REPO / "scripts" / "bench.sh"), "--list"], capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
    matches = [re.fullmatch(r"(\S+) +(\d+ min|\?) +(.+)", line) for line in listing[1:]]
    assert all(matches), listing
    sections = {m[1]: m for m in matches}
    assert "quality" in sections and "sweep" in sections
    records = sorted((REPO / "docs" / "results").glob("*.json"))
    on_gpu = {"overhead-cuda", "gpu-synthetic"}   # scripts/bench_gpu.sh writes these where a GPU is
    gpu_script = (REPO / "scripts" / "bench_gpu.sh").read_text()
    assert all(f"docs/results/{stem}.json" in gpu_script for stem in on_gpu)
    assert records and {r.stem for r in records} <= set(sections) | on_gpu
    for record in (r for r in records if r.stem not in on_gpu):
        measured = json.loads(record.read_text())
        _, took, command = sections[record.stem].groups()
        assert took == (f"{measured['seconds'] / 60:.0f} min" if measured.get("seconds") else "?"), record.stem
        if record.stem != "faults":   # the fault matrix is the record of its test module
            assert measured["command"].startswith(command), (record.stem, command)
