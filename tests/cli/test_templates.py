"""The sbatch templates without a Slurm: each launch path's command line from the job's nodes and
tasks (slurm/launch.sh, with stand-ins for scontrol and srun), and a wrong variable stopping the job
before any rank starts, saying what to set. Real jobs are tests/slurm's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import REPO

VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """An environment as inside a job of 3 nodes x 4 tasks, with scontrol and srun stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && '
                                      'printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\n[ "$1" = "--mpi=list" ] && printf "MPI plugin types are...\\n\\tnone\\n'
                                  '\\tpmi2\\n\\tcray_shasta\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))},
            "PATH": f"{bin_dir}:{VENV / 'bin'}:{os.environ.get('PATH', '')}", "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_TASKS_PER_NODE": "4(x3)", "SLURM_JOB_NUM_NODES": "3",
            "PROJECT_DIR": str(REPO), "VENV": str(VENV), "RUN_DIR": str(tmp_path / "run")}


def launch_command(env: dict[str, str], launcher: str, **variables: str) -> list[str]:
    script = ('source slurm/launch.sh; LAUNCHER=$1; MPI_PLUGIN=${MPI_PLUGIN:-auto}; RENDEZVOUS_PORT=29400; '
              'SRUN_CPUS_PER_TASK=2; [ "$LAUNCHER" != srun ] || ssd_pick_mpi_plugin; '
              'ssd_launch_command -m ssd_allreduce.train --mode ssd; printf "%s\\n" "${SSD_CMD[@]}"')
    proc = subprocess.run(["bash", "-c", script, "launch", launcher], cwd=REPO, env={**env, **variables},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_each_launch_path_takes_its_hosts_and_slots_from_the_job(fake_slurm: dict[str, str]) -> None:
    srun = launch_command(fake_slurm, "srun")
    assert srun[:4] == ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "--cpus-per-task=2"]   # pmix not offered
    hvd = launch_command(fake_slurm, "horovodrun", LAUNCHER_ARGS="--ssh-port 2222")
    assert hvd[:7] == ["horovodrun", "-np", "12", "-H", "gpu-a:4,gpu-b:4,gpu-c:4", "--gloo", "--start-timeout"]
    assert hvd[hvd.index("--ssh-port") + 1] == "2222"
    torch = launch_command(fake_slurm, "torchrun")
    assert "--nnodes=3" in torch and "--nproc-per-node=4" in torch and "--ntasks-per-node=1" in torch
    assert "--cpus-per-task=8" in torch and any(a.startswith("--rdzv-endpoint=gpu-a:") for a in torch)
    mpirun = launch_command(fake_slurm, "mpirun", MPIRUN_AGENT="ssh", NETWORK_INTERFACE="lo")
    assert mpirun[:5] == ["mpirun", "-np", "12", "--map-by", "ppr:4:node"]
    assert mpirun[mpirun.index("-H") + 1] == "gpu-a:4,gpu-b:4,gpu-c:4"
    for command in (srun, hvd, torch, mpirun):   # every rank starts through rank.sh, then the driver
        assert command[-5:] == [str(REPO / "slurm" / "rank.sh"), "-m", "ssd_allreduce.train", "--mode", "ssd"]


def test_nodes_with_different_task_counts_stop(fake_slurm: dict[str, str]) -> None:
    proc = subprocess.run(["bash", "-c", "source slurm/launch.sh; ssd_tasks_per_node"], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={**fake_slurm, "SLURM_TASKS_PER_NODE": "4(x2),3"})
    assert proc.returncode == 2 and "submit with --ntasks-per-node" in proc.stderr, proc.stderr


@pytest.mark.parametrize("template, variables, said", [
    ("train.sbatch", {"LAUNCHER": "bogus"},
     "LAUNCHER=bogus: set it to auto or one of: srun horovodrun torchrun mpirun"),
    ("train.sbatch", {"NETWORK_INTERFACE": "nosuch0"}, "NETWORK_INTERFACE=nosuch0 does not exist on"),
    ("train.sbatch", {"VENV": "/nonexistent/venv"}, "no virtual environment at VENV=/nonexistent/venv"),
    ("train.sbatch", {"SETUP_SCRIPT": "/nonexistent/site.sh"}, "SETUP_SCRIPT=/nonexistent/site.sh does not exist"),
    ("train.sbatch", {"MPI_PLUGIN": "pmix", "LAUNCHER": "srun"}, "MPI_PLUGIN=pmix is not offered by this Slurm"),
    ("compare.sbatch", {"LAUNCHER": "torchrun", "MODES": "horovod ssd"}, "use ddp as the baseline"),
    ("sweep.sbatch", {}, "submit this as a job array: sbatch --array=0-3"),
])
def test_a_wrong_variable_stops_before_any_rank_saying_what_to_set(fake_slurm: dict[str, str], tmp_path: Path,
                                                                  template: str, variables: dict, said: str) -> None:
    proc = subprocess.run(["bash", str(REPO / "slurm" / template), "--epochs", "1"], cwd=tmp_path,
                          env={**fake_slurm, **variables}, capture_output=True, text=True, timeout=60)
    log = "".join(p.read_text() for p in (tmp_path / "run").glob("slurm-*.out")) + proc.stdout + proc.stderr
    assert proc.returncode == 2, log
    assert any(line.startswith("== STOP: ") and said in line for line in log.splitlines()), log
    assert "== launch" not in log, log
