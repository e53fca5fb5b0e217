"""Which ranks share a node, and the two communicators of hierarchical SSD-SGD: one per node (the
fast link: gradients averaged every step) and one per local rank across the nodes (the slow link:
the delayed windows, each local rank carrying its shard of the node's delta).

A rank's node is ``$SSD_NODE`` where set (emulated nodes on one machine, or a scheduler's own
naming), else its host name.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from .comm import Communicator

NODE_ENV = "SSD_NODE"


def node_name() -> str:
    """This process's node: ``$SSD_NODE``, else the host name."""
    return os.environ.get(NODE_ENV) or socket.gethostname()


@dataclass(frozen=True)
class NodeLayout:
    """The ranks of each node (ordered by their first rank), seen from ``rank``."""

    nodes: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def from_names(cls, names: list[str], rank: int) -> "NodeLayout":
        by_name: dict[str, list[int]] = {}
        for r, name in enumerate(names):
            by_name.setdefault(name, []).append(r)
        return cls(tuple(tuple(ranks) for ranks in by_name.values()), rank)

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


def discover_layout(comm: Communicator) -> NodeLayout:
    """Every rank's node, gathered (collective)."""
    return NodeLayout.from_names(comm.allgather_object(node_name()), comm.rank)


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


def resolve_hierarchy(local_sync: Optional[bool], comm: Communicator) -> Optional[Hierarchy]:
    """The hierarchy to train with, or None for flat SSD-SGD. ``local_sync`` None: on where the
    job spans several nodes with several ranks on each. Collective on every rank of ``comm``."""
    if local_sync not in (None, True, False):
        raise ValueError(f"local_sync must be True, False or None (automatic), got {local_sync!r}")
    if local_sync is False or comm.size == 1 or not comm.member:
        return None
    backend = _whole_job_backend(comm)
    if backend is None or os.environ.get("HOROVOD_ELASTIC") == "1":
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
    try:
        node, cross = _communicators(backend, layout)
    except HorovodSetsMissing as exc:   # the same on every rank: the sets and the environment are the job's
        if local_sync:
            raise
        warnings.warn(f"SSD-SGD stays flat: {exc}")
        return None
    return Hierarchy(layout, node, cross)


def _whole_job_backend(comm: Communicator) -> Optional[str]:
    """"horovod", "torch" or "mpi" where ``comm`` is that backend over every rank of the job."""
    if comm.name == "horovod":
        import horovod.torch as hvd
        return "horovod" if getattr(comm, "process_set", None) is hvd.global_process_set else None
    if comm.name == "torch":
        return "torch" if getattr(comm, "group", None) is None else None
    if comm.name == "mpi":
        from mpi4py import MPI
        return "mpi" if getattr(comm, "comm", None) == MPI.COMM_WORLD else None
    return None


def _communicators(backend: str, layout: NodeLayout) -> tuple[Communicator, Communicator]:
    """(this node's communicator, this local rank's across nodes), built collectively."""
    mine_node, mine_cross = layout.nodes[layout.node], layout.cross_groups[layout.local_rank]
    if backend == "horovod":
        from .comm.horovod import HorovodCommunicator
        return HorovodCommunicator(_horovod_set(mine_node, layout)), HorovodCommunicator(_horovod_set(mine_cross, layout))
    if backend == "torch":
        import torch.distributed as dist

        from .comm.torch_dist import TorchDistCommunicator
        groups = {ranks: dist.new_group(list(ranks)) for ranks in layout.nodes + layout.cross_groups}
        return TorchDistCommunicator(groups[mine_node]), TorchDistCommunicator(groups[mine_cross])
    from mpi4py import MPI

    from .comm.mpi import MPICommunicator
    world = MPI.COMM_WORLD
    return (MPICommunicator(world.Split(layout.node, layout.rank)),
            MPICommunicator(world.Split(layout.local_rank, layout.rank)))


_horovod_sets: dict[tuple[int, ...], Any] = {}


def _horovod_set(ranks: tuple[int, ...], layout: NodeLayout) -> Any:
    """Horovod's process set of ``ranks``: one registered at ``hvd.init(process_sets=...)``, or
    one added now (every rank adds the sets of every node and cross group it lacks, in the same
    order: Horovod's rule), which needs dynamic process sets."""
    import horovod.torch as hvd
    from horovod.common import process_sets as hvd_sets

    # Horovod 0.28 lists its registered sets only through this internal call
    registered = {tuple(r): i for i, r in hvd_sets._basics._get_process_set_ids_and_ranks().items()}
    for group in layout.nodes + layout.cross_groups:
        if group in _horovod_sets:
            continue
        if group == tuple(range(hvd.size())):
            _horovod_sets[group] = hvd.global_process_set
        elif group in registered:
            ps = hvd_sets._temp_process_set_object(registered[group])
            ps.ranks = list(group)
            _horovod_sets[group] = ps
        elif os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1":
            _horovod_sets[group] = hvd.add_process_set(list(group))
        else:
            raise HorovodSetsMissing(
                f"hierarchical SSD-SGD (local_sync) needs Horovod process sets for the nodes and the cross-node "
                f"groups of {layout.describe()} ({list(layout.nodes)} and {list(layout.cross_groups)}): pass them "
                "to hvd.init(process_sets=[hvd.ProcessSet(ranks), ...]), or set HOROVOD_DYNAMIC_PROCESS_SETS=1 "
                "before hvd.init() (the training driver does on several nodes), or pass local_sync=False")
    return _horovod_sets[ranks]


class HorovodSetsMissing(RuntimeError):
    """Hierarchical SSD-SGD's Horovod process sets are neither registered nor addable."""
