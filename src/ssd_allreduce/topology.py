"""Which ranks share a node, and the two communicators of hierarchical SSD-SGD: one per node (the
fast link: gradients averaged every step) and one per local rank across the nodes (the slow link:
the delayed windows, each local rank carrying its shard of the node's delta).

A rank's node is ``$SSD_NODE`` where set (emulated nodes on one machine, or a scheduler's own
naming), else its host name. How a backend builds the groups is its own (``Communicator.split``).
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .comm import Communicator
from .rendezvous import StoreUnavailable

NODE_ENV = "SSD_NODE"


def node_name() -> str:
    """This process's node: ``$SSD_NODE``, else the host name."""
    return os.environ.get(NODE_ENV) or socket.gethostname()


@dataclass(frozen=True)
class NodeLayout:
    """The ranks of each node (ordered by their first rank), seen from ``rank``; ``hosts``: how
    many machines they run on (1 where nodes are emulated on one)."""

    nodes: tuple[tuple[int, ...], ...]
    rank: int
    hosts: int = 1

    @classmethod
    def from_names(cls, names: list[str], rank: int, hosts: int = 1) -> "NodeLayout":
        by_name: dict[str, list[int]] = {}
        for r, name in enumerate(names):
            by_name.setdefault(name, []).append(r)
        return cls(tuple(tuple(ranks) for ranks in by_name.values()), rank, hosts)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def node(self) -> int:
        return next(i for i, ranks in enumerate(self.nodes) if self.rank in ranks)

    @property
    def local_rank(self) -> int:
        return self.nodes[self.node].index(self.rank)

    @property
    def local_size(self) -> int:
        return len(self.nodes[self.node])

    @property
    def uniform(self) -> bool:
        return len({len(ranks) for ranks in self.nodes}) == 1

    @property
    def cross_groups(self) -> tuple[tuple[int, ...], ...]:
        """Ranks of equal local rank, one per node: who carries the same shard across nodes."""
        return tuple(tuple(ranks[i] for ranks in self.nodes) for i in range(len(self.nodes[0])))

    def describe(self) -> str:
        sizes = sorted({len(ranks) for ranks in self.nodes})
        per_node = str(sizes[0]) if len(sizes) == 1 else "/".join(str(len(r)) for r in self.nodes)
        return f"{self.num_nodes} node(s) x {per_node} rank(s)"


def launcher_layout(env: Optional[Mapping[str, str]] = None) -> Optional[tuple[int, int, str]]:
    """(nodes, ranks per node, launcher) as the launcher's environment tells it, before any
    collective; None where it does not. What the optimizer uses is gathered from every rank."""
    env = os.environ if env is None else env

    def count(name: str) -> int:
        value = env.get(name, "")
        return int(value) if value.isdigit() else 0
    if count("HOROVOD_LOCAL_SIZE") and count("HOROVOD_CROSS_SIZE"):
        return count("HOROVOD_CROSS_SIZE"), count("HOROVOD_LOCAL_SIZE"), "horovodrun"
    if count("LOCAL_WORLD_SIZE") and count("WORLD_SIZE"):
        return count("WORLD_SIZE") // count("LOCAL_WORLD_SIZE"), count("LOCAL_WORLD_SIZE"), "torchrun"
    if count("OMPI_COMM_WORLD_LOCAL_SIZE") and count("OMPI_COMM_WORLD_SIZE"):
        return (count("OMPI_COMM_WORLD_SIZE") // count("OMPI_COMM_WORLD_LOCAL_SIZE"),
                count("OMPI_COMM_WORLD_LOCAL_SIZE"), "mpirun")
    nodes = count("SLURM_STEP_NUM_NODES") or count("SLURM_JOB_NUM_NODES") or count("SLURM_NNODES")
    tasks = count("SLURM_STEP_NUM_TASKS") or count("SLURM_NTASKS")
    if nodes and tasks:
        return nodes, tasks // nodes, "slurm"
    return None


def discover_layout(comm: Communicator) -> NodeLayout:
    """Every rank's node and host, gathered (collective)."""
    everyone = comm.allgather_object((node_name(), socket.gethostname()))
    return NodeLayout.from_names([node for node, _ in everyone], comm.rank, len({host for _, host in everyone}))


@dataclass
class Hierarchy:
    """Hierarchical SSD-SGD's communicators: ``node`` (this node's ranks) and ``cross`` (this local
    rank on every node)."""

    layout: NodeLayout
    node: Communicator
    cross: Communicator

    @property
    def shard(self) -> tuple[int, int]:
        """(which, of how many): the part of the delta this rank carries across nodes."""
        return self.layout.local_rank, self.layout.local_size


def resolve_hierarchy(local_sync: Optional[bool], comm: Communicator, device_type: str = "cpu") -> Optional[Hierarchy]:
    """The hierarchy to train with, or None for flat SSD-SGD. ``local_sync`` None: on where the
    job spans several nodes with several ranks on each. Collective on every rank of ``comm``."""
    if local_sync not in (None, True, False):
        raise ValueError(f"local_sync must be True, False or None (automatic), got {local_sync!r}")
    if local_sync is False or comm.size == 1 or not comm.member:
        return None
    if not comm.whole_job or os.environ.get("HOROVOD_ELASTIC") == "1":
        if local_sync:
            raise ValueError("local_sync=True builds its node and cross-node communicators itself: it needs "
                             "backend='horovod', 'torch' or 'mpi' over the whole job, without a process set, "
                             "sub-communicator or Horovod elastic mode")
        return None
    layout = discover_layout(comm)
    if local_sync is None and (layout.num_nodes == 1 or layout.local_size == 1 or not layout.uniform):
        return None
    if not layout.uniform:
        raise ValueError(f"local_sync=True needs the same number of ranks on every node, this job has "
                         f"{layout.describe()}: launch as many ranks per node, or pass local_sync=False")
    key = (comm.job_key, layout, device_type)
    if key not in _built:   # one pair per job and layout: every optimizer of the process shares it
        try:
            node, cross = comm.split([layout.nodes, layout.cross_groups], device_type, layout.hosts)
        except StoreUnavailable as exc:   # the same verdict on every rank
            if local_sync:
                raise RuntimeError(f"hierarchical SSD-SGD (local_sync=True): {exc}") from None
            warnings.warn(f"SSD-SGD stays flat (local_sync is automatic): {exc}")
            return None
        _built[key] = (node, cross)
    return Hierarchy(layout, *_built[key])


_built: dict[tuple[Any, NodeLayout, str], tuple[Communicator, Communicator]] = {}
