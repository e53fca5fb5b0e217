"""Real jobs on the one-node Slurm of scripts/slurm_local.sh: srun, srun --mpi=pmix + Horovod, sbatch.

Skipped where Slurm/munge are not installed or we are not root (the local daemons run as root).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import pytest

from launchers import run_bounded
from requeue import RequeueRelease

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
SLURM_DIR = Path(os.environ.get("SSD_SLURM_DIR", "/tmp/ssd-allreduce-slurm"))
PYTHON = sys.executable
TEMPLATES = [REPO / "slurm" / "train.sbatch", REPO / "slurm" / "compare.sbatch", REPO / "slurm" / "sweep.sbatch"]
HVD_SNIPPET = ("import horovod.torch as hvd; hvd.init(); import torch; t=torch.ones(3)*(hvd.rank()+1); "
               "print(hvd.rank(), hvd.size(), hvd.allreduce(t, op=hvd.Sum).tolist())")
# Overrides that make the 2x4-GPU templates fit the local node (no GRES, few CPUs).
LOCAL_OVERRIDES = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]

_missing = [t for t in ("slurmctld", "slurmd", "srun", "sbatch", "munged")
            if not (shutil.which(t) or Path("/usr/sbin", t).exists())]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(bool(_missing), reason=f"Slurm/munge not installed: {_missing}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local one-node Slurm runs its daemons as root"),
]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"({exc})"


def _diagnostics(files: Iterable[Path] = ()) -> str:
    parts = [f"--- {f} ---\n{_tail(f, 60)}" for f in files]
    parts += [f"--- {SLURM_DIR / log} (tail) ---\n{_tail(SLURM_DIR / log)}"
              for log in ("slurmd.log", "slurmctld.log")]
    return "\n".join(parts)


def run(cmd: Sequence[str], env: dict[str, str], timeout: float = 180, check: bool = True,
        files: Iterable[Path] = (), cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a command; on timeout or (with check) failure, fail with its output, the job's output
    files and the Slurm daemons' log tails."""
    assert timeout <= 180
    proc = run_bounded(cmd, timeout, context=lambda: _diagnostics(files), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{_diagnostics(files)}")
    return proc


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Start (or reuse) the local Slurm; the environment subprocesses need to talk to it.
    A Slurm this fixture started is stopped again at the end of the session."""
    env = dict(os.environ)
    env["SSD_SLURM_DIR"] = str(SLURM_DIR)
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_", "SALLOC_"))]:
        del env[key]  # inside an outer allocation, srun would try to join it
    env.update({
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        # Shared memory single-copy (CMA) needs ptrace rights that containers often lack.
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "PATH": f"{Path(PYTHON).parent}:{env.get('PATH', '')}",
    })
    was_running = run(["bash", str(SCRIPT), "status"], env, timeout=60, check=False).returncode == 0
    run(["bash", str(SCRIPT), "start"], env, timeout=120)
    yield env
    if not was_running:
        run(["bash", str(SCRIPT), "stop"], env, timeout=60, check=False)


def _check_hvd_lines(text: str) -> None:
    got = sorted(re.findall(r"^(\d) (\d) \[([\d., ]+)\]$", text, re.M))
    assert got == [("0", "2", "3.0, 3.0, 3.0"), ("1", "2", "3.0, 3.0, 3.0")], text


def test_start_is_idempotent_and_env(slurm_env: dict[str, str]) -> None:
    again = run(["bash", str(SCRIPT), "start"], slurm_env, timeout=60)
    assert "starting" not in again.stdout, again.stdout  # nothing restarted
    out = run(["bash", str(SCRIPT), "env"], slurm_env, timeout=30).stdout
    assert out.strip() == f"export SLURM_CONF={SLURM_DIR / 'slurm.conf'}"
    status = run(["bash", str(SCRIPT), "status"], slurm_env, timeout=30).stdout
    assert "idle" in status or "mix" in status, status


def test_srun_hostname(slurm_env: dict[str, str]) -> None:
    out = run(["srun", "-n", "2", "hostname"], slurm_env, timeout=120).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0] == lines[1], out


def test_srun_pmix_horovod_allreduce(slurm_env: dict[str, str]) -> None:
    # As root, direct launch under PMIx needs no OMPI_ALLOW_RUN_AS_ROOT (that is an mpirun check);
    # srun passes the whole environment (--export=ALL is its default).
    out = run(["srun", "-n", "2", "--mpi=pmix", PYTHON, "-c", HVD_SNIPPET], slurm_env, timeout=180).stdout
    _check_hvd_lines(out)


def test_srun_tasks_that_cannot_join_one_job_all_stop_saying_so(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """A Horovod with Gloo alone (forced here) cannot take its ranks from plain srun: each task
    would train alone as a job of 1. Every task stops before training, saying what to do."""
    env = {**slurm_env, "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"}
    proc = run(["srun", "-n", "2", PYTHON, "-m", "ssd_allreduce.train", "--no-progress", "--backend", "horovod",
                "--data", "digits", "--model", "cnn", "--epochs", "1", "--out", str(tmp_path / "run")],
               env, timeout=180, check=False)
    said = re.findall(r"srun started 2 tasks in this step \(SLURM_STEP_NUM_TASKS\) but this task's job has 1 "
                      r"rank\(s\) through horovod.*srun --mpi=pmix", proc.stdout)
    assert proc.returncode != 0 and len(said) == 2, proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sbatch_horovod_job_completes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    out_file = tmp_path / "job-%j.out"
    script = tmp_path / "hvd.sbatch"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f"srun --mpi=pmix {PYTHON} -c '{HVD_SNIPPET}'\n")
    cmd = ["sbatch", "--parsable", "--wait", "-n", "2", "--time=5", "--job-name=ssd-test",
           f"--output={out_file}", f"--chdir={tmp_path}", str(script)]
    proc = run(cmd, slurm_env, timeout=180, check=False, files=list(tmp_path.glob("job-*.out")))
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
    outs = list(tmp_path.glob("job-*.out"))
    if proc.returncode != 0 or not job_id.isdigit():
        pytest.fail(f"sbatch --wait exit {proc.returncode}:\n{proc.stdout}\n{_diagnostics(outs)}")
    info = run(["scontrol", "show", "job", job_id], slurm_env, timeout=30, files=outs).stdout
    state = re.search(r"JobState=(\S+)", info)
    if not state or state.group(1) != "COMPLETED":
        pytest.fail(f"job {job_id} not COMPLETED:\n{info}\n{_diagnostics(outs)}")
    out_path = tmp_path / f"job-{job_id}.out"
    assert out_path.exists(), _diagnostics(outs)
    _check_hvd_lines(out_path.read_text())


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_parse_and_are_accepted(slurm_env: dict[str, str], template: Path, tmp_path: Path) -> None:
    run(["bash", "-n", str(template)], slurm_env, timeout=30)
    text = template.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=4" in text
    assert 'source "$PROJECT_DIR/slurm/launch.sh"' in text
    assert re.search(r"^##SBATCH --account=", text, re.M) and re.search(r"^##SBATCH --partition=", text, re.M)
    # A CPU cluster overrides the GPU request on the command line, or with SBATCH_GPUS_PER_NODE=0.
    for extra_env, flags in (({}, LOCAL_OVERRIDES),
                             ({"SBATCH_GPUS_PER_NODE": "0"}, [f for f in LOCAL_OVERRIDES if "gpus" not in f])):
        proc = run(["sbatch", "--test-only", *flags, str(template), "--mode", "ssd", "--sync-every", "5"],
                   {**slurm_env, **extra_env}, timeout=60, cwd=tmp_path)
        assert re.search(r"Job \d+ to start at .* on nodes", proc.stdout), proc.stdout


def _job_field(job_id: str, field: str, env: dict[str, str], files: Iterable[Path]) -> str:
    info = run(["scontrol", "show", "job", job_id], env, timeout=30, files=files).stdout
    m = re.search(rf"\b{field}=(\S+)", info)
    return m.group(1) if m else ""


def test_train_template_requeues_and_resumes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """train.sbatch end to end: Slurm delivers USR1 to the running ranks (as it does before the time
    limit), they checkpoint, the job requeues itself, and the restart resumes from the checkpoint."""
    import time

    venv = Path(PYTHON).parent.parent
    if not (venv / "bin" / "activate").exists():
        pytest.skip(f"{PYTHON} is not in a virtual environment (train.sbatch activates one)")
    env = {**slurm_env, "SSD_VENV": str(venv)}
    out = tmp_path / "train-%j.out"
    proc = run(["sbatch", "--parsable", *LOCAL_OVERRIDES, "--time=10", f"--chdir={tmp_path}",
                f"--output={out}", str(TEMPLATES[0]), "--mode", "ssd", "--data", "digits", "--model", "mlp",
                "--epochs", "150", "--checkpoint-every", "0", "--no-progress", "--signal-check-every", "1"],
               env, timeout=60)
    job_id = proc.stdout.strip().split(";")[0]
    # the template writes its log into the run directory (sbatch's own file has one line: where)
    outs = [tmp_path / "runs" / job_id / f"slurm-{job_id}.out", tmp_path / f"train-{job_id}.out"]
    metrics = tmp_path / "runs" / job_id / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not metrics.exists() or metrics.read_text().count('"kind": "step"') < 30:
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} did not start training\n{_diagnostics(outs)}")
            time.sleep(0.2)
        # what Slurm does before the time limit (--signal=USR1@120): the signal goes to the job's steps
        run(["scancel", "--signal=USR1", job_id], env, timeout=30, files=outs)
        deadline = time.monotonic() + 150
        while _job_field(job_id, "Restarts", env, outs) in ("", "0"):  # first run, until it requeues
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} did not requeue itself\n{_diagnostics(outs)}")
            time.sleep(1)
        # A requeued job is held back ~2 min (BeginTime); let it start now, once its first run is surely
        # over. An update sent while the job is still completing does not stick, so repeat it while it pends.
        deadline, release = time.monotonic() + 150, RequeueRelease()
        while (state := _job_field(job_id, "JobState", env, outs)) not in (
                "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} stuck in {state}\n{_diagnostics(outs)}")
            if release.due(state):
                run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env, timeout=30, files=outs,
                    check=False)
            time.sleep(1)
        text = outs[0].read_text()
        assert state == "COMPLETED", f"{state}\n{_diagnostics(outs)}"
        assert "requeueing job" in text and "restart 1" in text, text
        preempted = [json.loads(line) for line in metrics.read_text().splitlines() if '"preempted"' in line]
        assert len(preempted) == 1 and 30 <= preempted[0]["step"] < 150 * 22, preempted
        step = preempted[0]["step"]
        assert re.search(rf"resumed from .*step-0*{step} at epoch \d+, step {step}", text), text
        assert "training exited with 0" in text, text
    finally:
        run(["scancel", job_id], env, timeout=30, check=False)
