"""Which GPU a rank takes, from what it can see, under every Slurm GPU option and every launcher.

    --gpus-per-node=4 (4 tasks a node)     every task sees the node's 4 GPUs: local rank i takes GPU i
    --gpus-per-task=1, --gpu-bind=single:1 each task sees only its own GPU: it takes that one (index 0)
    CUDA_VISIBLE_DEVICES set per task      the same: the one it sees
    more ranks than GPUs on a node         local rank modulo the GPUs seen: ranks share GPUs

So the rule is ``local_rank % device_count``: a rank never asks for a device ordinal it cannot
see ("invalid device ordinal" where Slurm bound one GPU per task). A pure function of the
environment and the device count: no GPU is needed to check it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

LOCAL_RANK_VARS = ("LOCAL_RANK", "HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "PMI_LOCAL_RANK", "SLURM_LOCALID")
"""Where launchers put a process's rank on its node: torchrun, horovodrun, Open MPI, MPICH/Intel
MPI, PMI, and srun itself (last: under horovodrun or mpirun inside a job it names the batch step)."""

VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclass(frozen=True)
class GpuChoice:
    """The device index a rank uses, and why, in words a log can carry."""

    index: int
    visible: int
    local_rank: int
    physical: str
    shared: bool

    def describe(self) -> str:
        where = f"cuda:{self.index} (GPU {self.physical} of the machine)"
        if self.visible == 1:
            why = "the only GPU this rank sees (one bound per task)"
        elif self.shared:
            why = f"local rank {self.local_rank} modulo the {self.visible} GPUs it sees: ranks share GPUs"
        else:
            why = f"local rank {self.local_rank} of the {self.visible} GPUs the node's ranks share"
        return f"{where}: {why}"


def local_rank_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This process's rank on its node as its launcher says, or None where none does."""
    env = os.environ if env is None else env
    for name in LOCAL_RANK_VARS:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def visible_devices(env: Mapping[str, str]) -> Optional[list[str]]:
    """The devices named in CUDA_VISIBLE_DEVICES (or ROCm's), None where it is not set."""
    for name in VISIBLE_VARS:
        if name in env:
            return [d.strip() for d in env[name].split(",") if d.strip()]
    return None


def choose_gpu(local_rank: int, device_count: int, env: Optional[Mapping[str, str]] = None) -> GpuChoice:
    """The GPU of the rank with ``local_rank`` on its node that sees ``device_count`` GPUs."""
    env = os.environ if env is None else env
    if local_rank < 0:
        raise ValueError(f"a local rank is 0 or more, got {local_rank}")
    if device_count < 1:
        shown = ", ".join(f"{n}={env[n]!r}" for n in VISIBLE_VARS if n in env) or "CUDA_VISIBLE_DEVICES unset"
        raise ValueError(f"this rank sees no GPU ({shown}): ask Slurm for GPUs (--gpus-per-node or "
                         "--gpus-per-task), or train on the CPU with --device cpu")
    index = local_rank % device_count
    named = visible_devices(env)
    physical = named[index] if named is not None and len(named) == device_count else str(index)
    tasks_on_node = env.get("LOCAL_WORLD_SIZE") or env.get("HOROVOD_LOCAL_SIZE") or env.get(
        "OMPI_COMM_WORLD_LOCAL_SIZE")
    shared = device_count > 1 and (local_rank >= device_count
                                   or (tasks_on_node is not None and tasks_on_node.isdigit()
                                       and int(tasks_on_node) > device_count))
    return GpuChoice(index, device_count, local_rank, physical, shared)
