"""Who am I in the job: rank, size, device and backend, whichever launcher started us.

horovodrun, ``srun --mpi=pmix`` and ``mpirun`` start Horovod (or mpi4py) ranks; torchrun, or
``srun`` without MPI, starts torch.distributed ranks (``MASTER_ADDR`` is derived from Slurm's
node list when torchrun did not set it). A rank's GPU is chosen from those it sees
(``gpu_binding``), so one GPU bound per task works as well as a node's GPUs shared by its tasks.
"""
from __future__ import annotations

import faulthandler
import importlib.util
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..comm import BACKENDS, Communicator, ReduceOp, make_communicator
from ..gpu_binding import choose_gpu
from ..topology import launcher_layout
from .watchdog import set_backend_timeouts, torch_timeout

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK")
# set by horovodrun, torchrun, Open MPI's mpirun and MPICH's mpiexec for the processes they start
# (under Slurm these run one srun task per node, so Slurm's task count is not the job's size), and
# WORLD_SIZE, also where a user set torch.distributed's place by hand inside `srun --pty`
NON_SLURM_LAUNCHER_VARS = ("HOROVOD_RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                           "WORLD_SIZE")


@dataclass
class DistContext:
    backend: str
    rank: int
    size: int
    local_rank: int
    device: torch.device
    comm: Communicator

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of ``values`` over ranks (blocking; float64 on the CPU)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.device.type == "cuda" and self.backend == "torch":
            t = t.to(self.device)  # NCCL reduces device tensors only
        self.comm.synchronize(self.comm.allreduce_async_([t], name="ssd.metrics", op=ReduceOp.SUM))
        return t.cpu().tolist()

    def barrier(self) -> None:
        self.comm.allgather_object(None)


def detect_backend() -> str:
    """"torch" under torchrun (or a Slurm step without MPI), else "horovod" if it imports, else "mpi"."""
    if any(v in os.environ for v in TORCHRUN_VARS):
        return "torch"
    if "SLURM_PROCID" in os.environ and not any(v in os.environ for v in MPI_RANK_VARS):
        # srun without --mpi: only a TCP rendezvous works
        return "torch"
    return "horovod" if importlib.util.find_spec("horovod") is not None else "mpi"


def _slurm_master_addr() -> str:
    """The first node of this step (where srun puts task 0), else of the job."""
    nodes = (os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
             or os.environ.get("SLURM_NODELIST"))
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodes.split(",")[0]


def _torch_ranks_on_this_host() -> int:
    """How many of torch.distributed's ranks run on this host: torchrun's count (set alike on
    every rank), else a gather of host names (plain srun sets none)."""
    import torch.distributed as dist

    layout = launcher_layout()
    if layout is not None and layout[2] == "torchrun":
        return layout[1]
    hosts: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def _init_torch_distributed(use_cuda: bool, timeout: float) -> tuple[int, int, int]:
    import torch.distributed as dist

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        # the step's tasks, which may be fewer than the allocation's (srun -n 2 inside sbatch -n 4)
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        # steps of one job may share a node: each its own port
        job_step = int(env.get("SLURM_JOB_ID", "0")) * 64 + int(env.get("SLURM_STEP_ID", "0"))
        env.setdefault("MASTER_PORT", str(20000 + job_step % 20000))
    if "RANK" not in env:  # a plain single process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(cuda_index(local_rank))   # NCCL's communicator takes the current device
    kwargs = {"timeout": torch_timeout(timeout)} if timeout > 0 else {}
    dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size(), local_rank


def init_distributed(backend: str = "auto", device: str = "auto", fault_timeout: float = 0.0) -> DistContext:
    """Initialise ``backend`` ("auto", "horovod", "torch", "mpi") and pin one GPU per local rank;
    ``fault_timeout`` > 0 bounds the backend's own waits on a lost peer (see ``watchdog``)."""
    if backend == "auto":
        backend = detect_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU: check CUDA_VISIBLE_DEVICES "
                         "and `python -m ssd_allreduce.doctor`")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "horovod":
        import horovod.torch as hvd
        check_horovod_gpu_support(use_cuda, hvd.nccl_built())
        set_backend_timeouts(fault_timeout)
        hvd.init()
        rank, size, local_rank, local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()
        if use_cuda:
            torch.cuda.set_device(cuda_index(local_rank))
    elif backend == "torch":
        rank, size, local_rank = _init_torch_distributed(use_cuda, fault_timeout)
        local_size = _torch_ranks_on_this_host()
    else:
        if use_cuda:
            raise ValueError("the mpi backend reduces CPU tensors only: use --backend horovod or torch on GPUs")
        from mpi4py import MPI
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
    _share_cpus(local_size, rank)
    dev = torch.device("cuda", cuda_index(local_rank)) if use_cuda else torch.device("cpu")
    if not faulthandler.is_enabled():
        # Installed after the backend's own handler (MPI's, for SIGSEGV, SIGBUS, SIGFPE and SIGABRT),
        # which it then calls: a rank that crashes in native code first prints where each thread was.
        try:
            faulthandler.enable(all_threads=True)
        except (AttributeError, OSError, RuntimeError, ValueError):   # no usable stderr to write to
            pass
    return DistContext(backend, rank, size, local_rank, dev, make_communicator(backend))


def _share_cpus(local_size: int, rank: int) -> None:
    """Fewer torch threads where ``threads_per_rank`` says so (said once, by rank 0)."""
    threads = threads_per_rank(local_size)
    if threads is not None and threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        if rank == 0:
            print(f"ssd_allreduce: {local_size} rank(s) on this node: {threads} torch thread(s) each "
                  "(OMP_NUM_THREADS sets another number)", file=sys.stderr, flush=True)


def threads_per_rank(local_ranks: int, env: Optional[Mapping[str, str]] = None,
                     usable: Optional[int] = None) -> Optional[int]:
    """torch's threads for one of ``local_ranks`` ranks on a node. Each rank's torch would start a
    thread per core it may run on, and where the launcher bound no rank to CPUs of its own
    (horovodrun, mpirun --bind-to none) ranks spinning in each other's threads ran the digits
    CNN's steps at 237 ms instead of 6 ms on 2 cores. So the CPUs this rank may run on are shared
    out among the node's ranks (where a launcher bound each rank to CPUs of its own, its share is
    divided again: fewer threads, never more), or Slurm's share of a task that srun started is
    taken (``SLURM_CPUS_PER_TASK``). None where ``OMP_NUM_THREADS`` chooses, as torchrun and
    slurm/launch.sh set it."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    if _started_by_srun(env) and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    usable = len(os.sched_getaffinity(0)) if usable is None else usable
    return max(1, usable // max(1, local_ranks))


def _started_by_srun(env: Mapping[str, str]) -> bool:
    """srun itself started this process (no horovodrun, mpirun or torchrun in between)."""
    return "SLURM_STEP_NUM_TASKS" in env and not any(v in env for v in NON_SLURM_LAUNCHER_VARS)


def cuda_index(local_rank: int) -> int:
    """The GPU this rank uses, of those it sees (``local_rank % device_count``; see ``gpu_binding``)."""
    return choose_gpu(local_rank, torch.cuda.device_count()).index


def check_slurm_step(size: int, backend: str, env: Optional[Mapping[str, str]] = None) -> None:
    """Where srun itself started this process (no horovodrun, mpirun or torchrun in between), every
    task of the step must be a rank of this one job: otherwise the tasks did not find each other
    and each would train alone. Raised alike on every task."""
    env = os.environ if env is None else env
    if not _started_by_srun(env) or int(env["SLURM_STEP_NUM_TASKS"]) == size:
        return
    tasks = env["SLURM_STEP_NUM_TASKS"]
    if backend == "horovod":
        how = ("This Horovod cannot take its ranks from srun alone: start the step with `srun --mpi=pmix` "
               "and a Horovod built with MPI, or launch with horovodrun, or pass --backend torch to srun")
    else:
        how = "Start the step with `srun --mpi=pmix` (MPI), or pass --backend torch to plain srun"
    raise SystemExit(f"srun started {tasks} tasks in this step (SLURM_STEP_NUM_TASKS) but this task's job has "
                     f"{size} rank(s) through {backend}: the tasks would each train apart. {how}. "
                     "Independent runs are separate steps (srun -n 1 each)")


def check_horovod_gpu_support(use_cuda: bool, nccl_built: bool) -> None:
    """GPU training through Horovod needs its NCCL operations; say so before any rank starts."""
    if use_cuda and not nccl_built:
        raise SystemExit("this Horovod was built without NCCL, so it cannot reduce GPU tensors: rebuild it "
                         "with scripts/setup.sh where torch has CUDA (it builds NCCL in), or train on the "
                         "GPU with --backend torch (NCCL through torch.distributed), or on CPUs with --device cpu")


def shutdown(ctx: Optional[DistContext]) -> None:
    """Leave the job cleanly (after every window has landed)."""
    if ctx is not None and ctx.backend == "torch":
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()   # no rank tears its connections down while a peer still uses them
            dist.destroy_process_group()
