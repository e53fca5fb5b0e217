"""N ranks as N threads of one process, with a communicator whose collectives really cross the
threads (torchft tests its collectives this way): the library's real optimizer and delay stage run
at 2 or 4 ranks in seconds, against the reference, with no launcher.

Collectives meet by call order, as on torch.distributed and MPI: the i-th collective of every rank
must be the same kind under the same name, or every rank raises ``CollectiveMismatch`` (where a
real backend would hang). A waiting rank gives up after the world's ``timeout``. Sums run in rank
order, once, so every rank receives the same bits. Buffers are packed with the library's own
``tensors.flatten``, as the torch.distributed and MPI backends do.
"""
from __future__ import annotations

import itertools
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ssd_allreduce import topology
from ssd_allreduce.comm.base import Communicator, FlattenedHandle, Handle, ReduceOp, sum_scale
from ssd_allreduce.tensors import flatten

_thread = threading.local()
_worlds = itertools.count()   # a world's key outlives it (ids of freed objects are reused)


class CollectiveMismatch(RuntimeError):
    """Ranks called different collectives at the same position (a real job would hang)."""


@dataclass
class _Op:
    kind: str
    name: str
    parts: dict[int, Any] = field(default_factory=dict)
    result: Any = None
    error: Optional[str] = None


class World:
    """The ranks' meeting place: the i-th collective of each rank joins ``ops[i]``."""

    def __init__(self, size: int, timeout: float = 30.0) -> None:
        self.size, self.timeout = size, timeout
        self.key = next(_worlds)
        self.cond = threading.Condition()
        self.ops: dict[int, _Op] = {}
        self.subworlds: dict[Any, "World"] = {}
        self.failure: Optional[str] = None

    def join(self, seq: int, rank: int, kind: str, name: str, payload: Any,
             reduce: Callable[[list[Any]], Any]) -> _Op:
        with self.cond:
            op = self.ops.setdefault(seq, _Op(kind, name))
            if (op.kind, op.name) != (kind, name) and op.error is None:
                op.error = (f"collective #{seq}: rank {rank} called {kind} {name!r}, another rank "
                            f"{op.kind} {op.name!r}")
            op.parts[rank] = payload
            if len(op.parts) == self.size and op.error is None:
                op.result = reduce([op.parts[r] for r in range(self.size)])
            self.cond.notify_all()
        return op

    def done(self, op: _Op) -> bool:
        return op.error is not None or op.result is not None or self.failure is not None

    def wait(self, op: _Op, rank: int) -> Any:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done(op), timeout=self.timeout):
                raise TimeoutError(f"rank {rank} waited {self.timeout:.0f} s in {op.kind} {op.name!r}: "
                                   f"only ranks {sorted(op.parts)} arrived")
        if op.error is not None:
            raise CollectiveMismatch(op.error)
        if op.result is None:
            raise RuntimeError(f"rank {rank}: a peer failed ({self.failure})")
        return op.result

    def fail(self, why: str) -> None:
        with self.cond:
            self.failure = self.failure or why
            for sub in self.subworlds.values():
                sub.fail(why)
            self.cond.notify_all()

    def subworld(self, key: Any, size: int) -> "World":
        with self.cond:
            return self.subworlds.setdefault(key, World(size, self.timeout))


class _Pending(FlattenedHandle):
    def __init__(self, op: _Op, polls_left: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.op, self.polls_left = op, polls_left
        self.output: Optional[Tensor] = None


def _sum(parts: list[list[Tensor]]) -> list[Tensor]:
    total = [p.clone() for p in parts[0]]
    for rank_parts in parts[1:]:
        for t, p in zip(total, rank_parts):
            t.add_(p)
    return total


class ThreadedCommunicator(Communicator):
    """Rank ``rank`` of ``world``. ``pending_polls``: polls that answer "not yet" although the
    collective is done (a slow link)."""

    name = "threaded"

    def __init__(self, world: World, rank: int, pending_polls: int = 0) -> None:
        self.world, self.rank, self.size, self.pending_polls = world, rank, world.size, pending_polls
        self.seq = 0
        self.splits = 0
        self.sent: list[tuple[str, list[Tensor]]] = []   # (name, the buffers each allreduce was given)

    @property
    def whole_job(self) -> bool:
        return True

    @property
    def job_key(self) -> Any:
        return (self.world.key, self.rank)

    def refresh(self) -> None:
        """Nothing to re-read: a test re-points ``world``, ``rank`` and ``size`` itself."""

    def _join(self, kind: str, name: str, payload: Any, reduce: Callable[[list[Any]], Any]) -> _Op:
        op = self.world.join(self.seq, self.rank, kind, name, payload, reduce)
        self.seq += 1
        return op

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str, op: ReduceOp = ReduceOp.AVERAGE,
                         prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Handle:
        pre, post = sum_scale(op, self.size, prescale_factor, postscale_factor)
        groups, flats = flatten(tensors)
        self.sent.append((name, flats))
        with torch.no_grad():
            for f in flats:
                if pre != 1.0:
                    f.mul_(pre)
        joined = self._join("allreduce", name, [f.detach().clone() for f in flats], _sum)
        return _Pending(joined, self.pending_polls, tensors=tensors, groups=groups, flats=flats, scale=post)

    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        joined = self._join("allgather", name, tensor.detach().reshape(-1).clone(), torch.cat)
        return _Pending(joined, self.pending_polls, tensors=[], groups=[], flats=[], scale=1.0)

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _Pending)
        handle.polls_left -= 1
        return handle.polls_left < 0 and self.world.done(handle.op)

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _Pending)
        result = self.world.wait(handle.op, self.rank)
        if handle.op.kind == "allgather":
            handle.output = result
            return
        with torch.no_grad():
            for flat, total in zip(handle.flats, result):
                flat.copy_(total)
        handle.finish()

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        mine = [t.detach().clone() for t in tensors] if self.rank == root_rank else None
        joined = self._join("broadcast", name, mine, lambda parts: parts[root_rank])
        with torch.no_grad():
            for t, v in zip(tensors, self.world.wait(joined, self.rank)):
                t.copy_(v)

    def allgather_object(self, obj: Any) -> list[Any]:
        joined = self._join("allgather_object", "object", pickle.dumps(obj), list)
        return [pickle.loads(b) for b in self.world.wait(joined, self.rank)]

    def split(self, partitions: Sequence[Sequence[Sequence[int]]], device_type: str = "cpu",
              hosts: int = 1) -> list[Communicator]:
        self.splits += 1
        mine = []
        for p, partition in enumerate(partitions):
            ranks = next(tuple(r) for r in partition if self.rank in r)
            sub = self.world.subworld((self.splits, p, ranks), len(ranks))
            mine.append(ThreadedCommunicator(sub, ranks.index(self.rank), self.pending_polls))
        return mine


def node_of_this_thread() -> str:
    """The emulated node of the rank running on this thread (``topology.node_name``'s stand-in)."""
    return getattr(_thread, "node", "node0")


def run_threads(size: int, fn: Callable[[ThreadedCommunicator], Any], *, ranks_per_node: Optional[int] = None,
                nodes: Optional[Sequence[str]] = None, timeout: float = 120.0, pending_polls: int = 0,
                expect_errors: bool = False) -> list[Any]:
    """``fn(comm)`` on ``size`` ranks, each a thread; their results in rank order. A rank that
    raises ends the others' waits; then the first error is raised (``expect_errors``: every
    rank's exception, or result, is returned instead). ``ranks_per_node``: consecutive ranks share
    an emulated node (``topology.node_name`` says so on each thread); ``nodes``: each rank's node."""
    if nodes is None:
        nodes = [f"node{r // ranks_per_node}" if ranks_per_node else "node0" for r in range(size)]
    world = World(size, timeout=min(timeout, 60.0))
    results: list[Any] = [None] * size
    errors: list[Optional[BaseException]] = [None] * size

    def body(rank: int) -> None:
        _thread.node = nodes[rank]
        try:
            results[rank] = fn(ThreadedCommunicator(world, rank, pending_polls))
        except BaseException as exc:  # every rank's failure is reported
            errors[rank] = exc
            world.fail(f"rank {rank}: {exc!r}")

    original = topology.node_name
    topology.node_name = node_of_this_thread
    try:
        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            world.fail("the test's time ran out")
            raise TimeoutError(f"{stuck} still running after {timeout:.0f} s")
    finally:
        topology.node_name = original
        world.fail("the ranks' threads have ended")   # a later wait (a finish() at exit) answers at once
    if expect_errors:
        return [e if e is not None else r for e, r in zip(errors, results)]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
