"""Real jobs on an emulated cluster of two Slurm nodes (scripts/cluster_local.sh), 2 nodes x 2 ranks:
slurm/train.sbatch on every launch path, slurm/compare.sbatch, a slurm/sweep.sbatch array and its
merge, and a node lost in a window (the job requeues and resumes).

The jobs that only read what they left are submitted together once (a module fixture) and run side
by side; each test waits for its own. Skipped, saying why, without root (namespaces and daemons) or
without a Horovod build in this interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from driver_oracle import FinalState, assert_matches, load_final_checkpoints, simulate_driver, summary
from launchers import run_bounded
from requeue import RequeueRelease

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "cluster_local.sh"
CLUSTER_DIR = Path(os.environ.get("SSD_CLUSTER_DIR", "/tmp/ssd-allreduce-cluster"))
NODES = ("ssd-node1", "ssd-node2")
PYTHON = sys.executable
VENV = Path(PYTHON).parent.parent
SHAPE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]
RANKS, RANKS_PER_NODE = 4, 2
TRAIN = ["--mode", "ssd", "--data", "digits", "--model", "mlp", "--warmup-steps", "3", "--sync-every", "2",
         "--no-progress"]
EPOCHS = ["--epochs", "1"]                    # 11 steps at 4 ranks
LAUNCH_PATHS = ("srun", "horovodrun", "torchrun", "mpirun")
PATH_VARIABLES = {"mpirun": {"MPIRUN_AGENT": "ssh"}}   # its daemons reach the other node by ssh
LAUNCH_LINES = {"srun": "srun --mpi=pmix --kill-on-bad-exit=1",              # what each job's log must show
                "horovodrun": "-H ssd-node1:2,ssd-node2:2 --gloo",
                "torchrun": "--rdzv-backend=c10d --rdzv-endpoint=ssd-node1:",
                "mpirun": "--mca plm rsh -H ssd-node1:2,ssd-node2:2"}
SWEEP = "ssd 2 2 none\nssd 4 2 none\nssd 2 2 fp16"
JOB_SECONDS = 240                             # every job of this module ends within this
FAULT_BOUND, FAULT_SLACK = 6, 6               # --fault-timeout of the fault run, and its slack
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _why_not() -> Optional[str]:
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, slurmd and sshd as root)"
    if shutil.which("apt-get") is None and not all(shutil.which(t) or Path("/usr/sbin", t).exists()
                                                   for t in ("slurmctld", "slurmd", "munged", "sshd")):
        return "Slurm, munge or openssh-server is missing and there is no apt-get to install them"
    if importlib.util.find_spec("horovod") is None:
        return f"{PYTHON} has no Horovod (scripts/setup.sh builds it)"
    if not (VENV / "bin" / "activate").exists():
        return f"{PYTHON} is not in a virtual environment (the templates activate one)"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.timeout(JOB_SECONDS + 60), pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def diagnostics(*logs: Path) -> str:
    """The jobs' logs (every rank's output) and the daemons' last lines."""
    daemons = [CLUSTER_DIR / "slurmctld.log", *(CLUSTER_DIR / f"slurmd.{n}.log" for n in NODES)]
    return "\n".join(f"--- {p} ---\n{_tail(p, 80 if p in logs else 15)}" for p in (*logs, *daemons))


def sh(cmd: Sequence[str], env: dict[str, str], timeout: float = 60, check: bool = True,
       cwd: Optional[Path] = None, logs: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Run a command with a bound; on a timeout or (with check) a failure, fail with its output and logs."""
    proc = run_bounded(cmd, timeout, context=lambda: diagnostics(*logs), env=env, cwd=cwd or REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{diagnostics(*logs)}")
    return proc


@dataclass
class Job:
    """A submitted job: its id, where it runs and the log its template writes there."""

    id: str
    dir: Path           # the --chdir of the job: its run directory is dir/runs/<id>
    env: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return self.dir / "runs" / self.id

    @property
    def log(self) -> Path:
        return self.run_dir / f"slurm-{self.id}.out"

    def logs(self) -> list[Path]:
        return sorted(self.run_dir.rglob("slurm-*.out")) or [self.log]

    def states(self) -> list[str]:
        """JobState of the job (of every task of an array)."""
        out = sh(["scontrol", "show", "job", self.id], self.env, check=False).stdout
        return re.findall(r"\bJobState=(\S+)", out)

    def field(self, name: str) -> str:
        out = sh(["scontrol", "show", "job", self.id], self.env, check=False).stdout
        found = re.search(rf"\b{name}=(\S+)", out)
        return found[1] if found else ""

    def wait(self, seconds: float = JOB_SECONDS) -> list[str]:
        """Until every task of the job ended; fails with every rank's output past ``seconds``."""
        deadline = time.monotonic() + seconds
        while not (states := self.states()) or not all(s in TERMINAL for s in states):
            if time.monotonic() > deadline:
                sh(["scancel", self.id], self.env, check=False)
                pytest.fail(f"job {self.id} not done after {seconds:.0f} s ({states})\n{diagnostics(*self.logs())}")
            time.sleep(0.5)
        return states

    def completed(self) -> str:
        """Waits; fails unless every task COMPLETED; returns the job's log."""
        states = self.wait()
        if set(states) != {"COMPLETED"}:
            pytest.fail(f"job {self.id}: {states}\n{diagnostics(*self.logs())}")
        return self.log.read_text()


def submit(env: dict[str, str], where: Path, template: str, *args: str, sbatch: Sequence[str] = (),
           **variables: str) -> Job:
    """sbatch slurm/<template> from ``where`` with the template's variables in its environment."""
    where.mkdir(parents=True, exist_ok=True)
    job_env = {**env, **variables}
    proc = sh(["sbatch", "--parsable", *SHAPE, *sbatch, f"--chdir={where}", f"--output={where}/sbatch-%j.out",
               str(REPO / "slurm" / template), *args], job_env, cwd=where)
    return Job(proc.stdout.strip().split(";")[0], where, env)


# ------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Brings the cluster up (once for the module), and down at the end where it was not up before;
    the environment that talks to it and that the templates' variables start from."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_", "HOROVOD_"))}
    env.update({"SSD_CLUSTER_DIR": str(CLUSTER_DIR), "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf"),
                "PATH": f"{VENV / 'bin'}:{env.get('PATH', '')}:/usr/sbin:/sbin", "PYTHONUNBUFFERED": "1",
                "PROJECT_DIR": str(REPO), "VENV": str(VENV),
                # the emulated nodes run every rank as root: mpirun refuses that unless told
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    was_up = sh(["bash", str(CLUSTER), "status"], env, timeout=60, check=False).returncode == 0
    up = sh(["bash", str(CLUSTER), "up"], env, timeout=300, check=False)
    if up.returncode != 0:
        missing = [t for t in ("slurmctld", "slurmd", "munged", "sshd")
                   if not (shutil.which(t) or Path("/usr/sbin", t).exists())]
        if missing:   # no package index to install them from
            pytest.skip(f"{', '.join(missing)} missing and scripts/cluster_local.sh up could not install them: "
                        f"{up.stdout.strip().splitlines()[-1:]}")
        pytest.fail(f"scripts/cluster_local.sh up failed:\n{up.stdout}\n{diagnostics()}")
    yield {**env, "SSD_CLUSTER_WAS_UP": "1" if was_up else ""}
    if not was_up:
        sh(["bash", str(CLUSTER), "down"], env, timeout=120, check=False)


@pytest.fixture(scope="module")
def jobs(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """Every job the read-only tests share, submitted at once so that they run side by side."""
    root = tmp_path_factory.mktemp("two-nodes")
    submitted = {path: submit(cluster, root / path, "train.sbatch", *TRAIN, *EPOCHS, LAUNCHER=path,
                              **PATH_VARIABLES.get(path, {}))
                 for path in LAUNCH_PATHS}
    # compare and sweep take one rank a node: their point is the template, and CPUs are few
    one_a_node = ["--ntasks-per-node=1"]
    submitted["compare"] = submit(cluster, root / "compare", "compare.sbatch", *TRAIN[2:], *EPOCHS,
                                  sbatch=one_a_node, MODES="horovod ssd")
    submitted["sweep"] = submit(cluster, root / "sweep", "sweep.sbatch", *TRAIN[2:8], *EPOCHS, "--no-progress",
                                sbatch=["--array=0-2", *one_a_node], SWEEP_SETTINGS=SWEEP)   # k, d: the rows'
    return submitted


@pytest.fixture(scope="module")
def oracle() -> FinalState:
    """What the training jobs must end with, from the hierarchical simulator."""
    return simulate_driver([*TRAIN, *EPOCHS], RANKS, RANKS_PER_NODE)


def where_ranks_landed(log: str) -> dict[int, tuple[str, str, str, str]]:
    """rank -> (size, host, address, local rank), from the line slurm/rank.sh prints for each rank."""
    found = re.findall(r"== rank (\d+) of (\S+) on (\S+) \((\S+)\), local rank (\S+),", log)
    return {int(rank): rest for rank, *rest in found}


# ------------------------------------------------------------------------------ the tests
def test_up_again_restarts_nothing_and_each_node_reaches_the_other_by_ssh(cluster: dict[str, str]) -> None:
    again = sh(["bash", str(CLUSTER), "up"], cluster, timeout=120).stdout
    assert not re.search(r": (sshd|slurmd)$|slurmctld at|starting munged", again, re.M), again
    status = sh(["bash", str(CLUSTER), "status"], cluster).stdout
    assert all(re.search(rf"^{n} +1 +debug\* +(idle|mix|alloc|comp) *$", status, re.M) for n in NODES), status
    for here, there in (NODES, NODES[::-1]):   # host names and addresses: ssh checks the host keys
        said = sh(["bash", str(CLUSTER), "exec", here, "ssh", there, "hostname"], cluster).stdout.split()
        assert said == [there], said


@pytest.mark.parametrize("launch_path", LAUNCH_PATHS)
def test_train_template_runs_one_job_of_four_ranks_on_two_nodes_and_matches_the_oracle(
        jobs: dict[str, Job], oracle: FinalState, launch_path: str) -> None:
    job = jobs[launch_path]
    log = job.completed()
    failing = f"\n{diagnostics(job.log)}"
    assert f"launcher {launch_path}" in log and LAUNCH_LINES[launch_path] in log, failing
    landed = where_ranks_landed(log)
    assert sorted(landed) == [0, 1, 2, 3] and {size for size, *_ in landed.values()} == {"4"}, failing
    hosts = {host: set() for _, host, _, _ in landed.values()}
    for _, host, address, local_rank in landed.values():
        hosts[host].add((address, local_rank))
    assert sorted(hosts) == list(NODES), failing                               # node names, not one host
    assert [sorted(local for _, local in hosts[n]) for n in NODES] == [["0", "1"], ["0", "1"]], failing
    assert len({address for n in NODES for address, _ in hosts[n]}) == 2, failing   # an address per node
    records = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["kind"] == "start"]
    assert len(starts) == 1 and starts[0]["ranks"] == RANKS, failing         # one job of 4, not two of 2
    assert starts[0]["backend"] == ("torch" if launch_path == "torchrun" else "horovod"), failing
    assert starts[0]["args"]["local_sync"] == "auto", failing
    assert "hierarchical SSD-SGD on 2 node(s) x 2 rank(s)" in log, failing   # local_sync on by itself
    assert summary(job.run_dir)["local_sync_nodes"] == "2 node(s) x 2 rank(s)", failing
    assert_matches(load_final_checkpoints(job.run_dir, RANKS), oracle)       # W alike, weights as the oracle's


def test_compare_template_tables_the_horovod_baseline_and_ssd_sgd(jobs: dict[str, Job]) -> None:
    job = jobs["compare"]
    log = job.completed()
    table = (job.run_dir / "results.md").read_text()
    rows = {row.split("|")[2].strip(): row for row in table.splitlines() if re.match(r"\| (horovod|ssd) ", row)}
    assert set(rows) == {"horovod", "ssd"}, f"{table}\n{diagnostics(job.log)}"
    assert all("| finished |" in row and "| 2 |" in row for row in rows.values()), table
    assert "x baseline: steady images/s over horovod's" in table, table
    assert table.splitlines()[0] in log, "the table is not at the end of the job's log"
    assert (job.run_dir / "results.png").stat().st_size > 0
    hosts = {host for _, host, _, _ in where_ranks_landed(log).values()}
    assert hosts == set(NODES), diagnostics(job.log)


def test_sweep_array_runs_a_task_per_setting_and_collect_merges_them(jobs: dict[str, Job],
                                                                     cluster: dict[str, str]) -> None:
    job = jobs["sweep"]
    states = job.wait()
    tasks = sorted(p.name for p in job.run_dir.glob("task-*"))
    assert states == ["COMPLETED"] * 3, f"{states}\n{diagnostics(*job.logs())}"
    assert tasks == ["task-0-ssd-k2-d2-none", "task-1-ssd-k4-d2-none", "task-2-ssd-k2-d2-fp16"], tasks
    out = sh([PYTHON, "-m", "ssd_allreduce.bench", "collect", str(job.run_dir)], cluster, timeout=120).stdout
    rows = [row for row in out.splitlines() if row.startswith("| task-")]
    assert len(rows) == 3 and all("| finished |" in row for row in rows), out
    assert [row.split("|")[3:6] for row in rows] == [[" 2 ", " 2 ", " none "], [" 4 ", " 2 ", " none "],
                                                     [" 2 ", " 2 ", " fp16 "]], out
    assert (job.run_dir / "results.png").stat().st_size > 0 and (job.run_dir / "results.json").exists()


def ranks_of_job_on(node: str, marker: str) -> list[int]:
    """The processes on ``node`` (its network namespace) whose command line names ``marker``."""
    pids = subprocess.run(["ip", "netns", "pids", node], stdout=subprocess.PIPE, text=True, timeout=30).stdout.split()
    found = []
    for pid in pids:
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_node_lost_in_a_window_stops_the_survivors_naming_it_then_the_job_requeues_and_resumes(
        jobs: dict[str, Job], cluster: dict[str, str], tmp_path: Path) -> None:
    """Rank 2 (on the second node) stops in a window; then that node goes as a node does when it
    loses power: its link goes (no connection is closed, nothing more is heard), and its slurmd and
    ranks are killed. The ranks on the first node stop within the bound naming a lost rank on that
    host, the job requeues itself (a checkpoint newer than its start), and once the node is back the
    restart resumes from epoch 0's checkpoint to the end of an uninterrupted run: the same steps,
    the oracle's weights."""
    for job in jobs.values():   # the shared jobs end first: a node of theirs is about to go
        job.wait()
    lost_step = 16              # epoch 1 (11 steps an epoch); epoch 0's checkpoint is at step 11
    fault = ["--epochs", "3", "--fault-timeout", str(FAULT_BOUND), "--fault-at", f"stop:window:{lost_step}:2"]
    job = submit(cluster, tmp_path, "train.sbatch", *TRAIN, *fault, LAUNCHER="horovodrun", MAX_REQUEUES="1")
    marker = job.run_dir / "fault-rank2.time"
    deadline = time.monotonic() + JOB_SECONDS
    while not marker.exists() or len(marker.read_text().split()) < 2:
        if time.monotonic() > deadline or (job.states() and set(job.states()) <= TERMINAL):
            pytest.fail(f"rank 2 never stopped at step {lost_step}\n{diagnostics(job.log)}")
        time.sleep(0.1)
    sh(["ip", "link", "set", f"ssdc-v{NODES[1][-1]}", "down"], cluster)   # the bridge's end of its link
    os.kill(int((CLUSTER_DIR / f"slurmd.{NODES[1]}.pid").read_text()), signal.SIGKILL)
    victims = ranks_of_job_on(NODES[1], str(job.run_dir))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost_at = time.time()
    assert victims, f"no rank of job {job.id} found on {NODES[1]}\n{diagnostics(job.log)}"
    deadline = time.monotonic() + 60
    while "requeueing job" not in job.log.read_text():
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.id} did not requeue itself\n{diagnostics(job.log)}")
        time.sleep(0.2)
    log = job.log.read_text()
    said = re.findall(r"rank ([01]) at (\S+): (?:stopped during|no progress for \d+ s during) ([^;\n]*)([^\n]*)", log)
    assert len({rank for rank, *_ in said}) == 2, f"both survivors must say where they stopped:\n{log}"
    for rank, when, _, rest in said:
        seconds = datetime.fromisoformat(when).timestamp() - lost_at
        assert seconds < FAULT_BOUND + FAULT_SLACK, f"rank {rank} stopped {seconds:.1f} s after the loss:\n{log}"
        assert re.search(rf"lost: rank [23] \(pid \d+ on {NODES[1]}\)", rest), \
            f"rank {rank} named no rank of {NODES[1]}:\n{log}"
    # the node comes back (up mends the link, restarts slurmd); the requeued job is held back a while: start it now
    sh(["bash", str(CLUSTER), "up"], cluster, timeout=120, logs=[job.log])
    deadline, release = time.monotonic() + JOB_SECONDS, RequeueRelease()
    while (state := job.field("JobState")) not in TERMINAL or job.field("Restarts") in ("", "0"):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.id} stuck in {state}\n{diagnostics(job.log)}")
        if release.due(state):
            sh(["scontrol", "update", f"jobid={job.id}", "StartTime=now"], cluster, check=False)
        time.sleep(0.5)
    log = job.log.read_text()
    assert state == "COMPLETED", f"{state}\n{diagnostics(job.log)}"
    assert "(restart 1)" in log and re.search(r"resumed from .*step-0*11 at epoch 1, step 11", log), log
    uninterrupted = simulate_driver([*TRAIN, "--epochs", "3"], RANKS, RANKS_PER_NODE)
    assert summary(job.run_dir)["steps"] == uninterrupted.steps == 33
    assert_matches(load_final_checkpoints(job.run_dir, RANKS), uninterrupted)


def test_down_leaves_nothing_behind(cluster: dict[str, str]) -> None:
    pids = [int(p.read_text()) for p in CLUSTER_DIR.glob("*.pid") if p.read_text().strip().isdigit()]
    sh(["bash", str(CLUSTER), "down"], cluster, timeout=120)
    try:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        assert not alive, f"still running after down: {alive}"
        netns = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True, timeout=30).stdout
        assert not any(n in netns for n in NODES), netns
        links = subprocess.run(["ip", "-o", "link"], stdout=subprocess.PIPE, text=True, timeout=30).stdout
        assert "ssdc-" not in links, links
        assert "cluster_local.sh" not in Path("/etc/hosts").read_text()
        assert not Path("/etc/ssh/ssh_config.d/ssd-allreduce-cluster.conf").exists()
        assert not CLUSTER_DIR.exists()
    finally:
        if cluster["SSD_CLUSTER_WAS_UP"]:   # someone else's cluster: as it was
            sh(["bash", str(CLUSTER), "up"], cluster, timeout=300)
