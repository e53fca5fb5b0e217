"""How a window's delta crosses the ranks: an allreduce of the wire format, or, for a format whose
values cannot be summed (int8), a gather that every rank reduces alike; and in hierarchical
SSD-SGD, which shard of the node's delta this rank carries and how the node's ranks gather the
averaged shards at the landing.

The missing-gradient flag travels as a collective of its own, so the delta's buffer is the
collective's buffer (no packing copy on backends that flatten what they are given).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..comm import Communicator, Handle, ReduceOp, payload_bytes
from ..compression import compress, decompress_into_, reduces_by_gather, wire_bytes
from ..tensors import FlatSpace, shard_bounds, shard_views


@dataclass
class InFlight:
    """A window's collectives: ``handles`` for the delta's wire, ``flag_handle`` for the share of
    ranks that stepped without gradients (``flag``, averaged in place)."""

    handles: list[Handle]
    wire: list[Tensor]
    contexts: list[Any]
    flag: Tensor
    flag_handle: Handle

    @property
    def all(self) -> list[Handle]:
        return self.handles + [self.flag_handle]


class Transport:
    """Sends a window's delta parts and leaves the ranks' mean in them: ``send``, ``arrived``
    (never blocks), ``receive`` (waits)."""

    def __init__(self, comm: Communicator, compression: Any, name: str) -> None:
        self.comm, self.compression, self.name = comm, compression, name

    def send(self, parts: Sequence[Tensor], missing_gradients: bool) -> InFlight:
        wire, contexts = compress(self.compression, parts)
        flag = torch.full((1,), float(missing_gradients), device=parts[0].device if parts else "cpu")
        handles = self._start(wire)
        flag_handle = self.comm.allreduce_async_([flag], name=f"{self.name}.flag", op=ReduceOp.AVERAGE)
        return InFlight(handles, wire, contexts, flag, flag_handle)

    def arrived(self, inflight: InFlight) -> bool:
        return all([self.comm.poll(h) for h in inflight.all])   # a list: every part polled (MPI progress)

    def receive(self, inflight: InFlight, parts: Sequence[Tensor]) -> None:
        for h in inflight.all:
            self.comm.synchronize(h)
        self._mean_into(inflight, parts)

    def bytes_sent(self, parts: Sequence[Tensor]) -> int:
        """Bytes a window's wire puts on the link from this rank."""
        return sum(wire_bytes(self.compression, p.numel(), p.dtype) for p in parts)

    @staticmethod
    def payload(inflight: InFlight) -> int:
        return payload_bytes(inflight.wire)

    def _start(self, wire: list[Tensor]) -> list[Handle]:
        return [self.comm.allreduce_async_(wire, name=self.name, op=ReduceOp.AVERAGE)] if wire else []

    def _mean_into(self, inflight: InFlight, parts: Sequence[Tensor]) -> None:
        decompress_into_(self.compression, parts, inflight.wire, inflight.contexts)


class GatherTransport(Transport):
    """A wire format that cannot be summed (int8, a scale per chunk): every rank gathers every
    rank's packed delta and reduces them in rank order, so the mean is bit-identical everywhere."""

    def bytes_sent(self, parts: Sequence[Tensor]) -> int:
        # a gather receives (size - 1) copies where a ring allreduce moves about 2 (size - 1) / size
        return round(super().bytes_sent(parts) * max(1.0, self.comm.size / 2))

    def _start(self, wire: list[Tensor]) -> list[Handle]:
        return [self.comm.allgather_async(w, name=f"{self.name}.{i}") for i, w in enumerate(wire)]

    def _mean_into(self, inflight: InFlight, parts: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for part, h, ctx in zip(parts, inflight.handles, inflight.contexts):
                part.copy_(self.compression.mean_of_gathered(self.comm.gathered(h), self.comm.size, ctx))


def make_transport(comm: Communicator, compression: Any, name: str) -> Transport:
    """The transport for ``compression``'s wire format (warning where a gather grows too big)."""
    if not reduces_by_gather(compression):
        return Transport(comm, compression, f"{name}.delta")
    limit = getattr(compression, "GATHER_LIMIT", None)
    if limit and comm.size >= limit:
        warnings.warn(f"{comm.size} ranks gather each other's int8 deltas: from {limit} ranks on that moves more "
                      "bytes than a float32 allreduce; use compression=Compression.bf16 or fp16 at this scale")
    return GatherTransport(comm, compression, f"{name}.delta")


class NodeShards:
    """Hierarchical SSD-SGD: the ranks of a node hold the same weights, so local rank ``which`` of
    ``of`` carries shard ``which`` of each flat buffer across nodes, and at the landing the node
    gathers the averaged shards over its fast link. Flat SSD-SGD: one shard, the whole buffers."""

    def __init__(self, shard: tuple[int, int] = (0, 1), node_comm: Optional[Communicator] = None,
                 name: str = "ssd") -> None:
        self.shard, self.node_comm, self.name = shard, node_comm, name

    def part(self, space: FlatSpace) -> list[Tensor]:
        """This rank's shard of each buffer of ``space`` (non-empty ones only)."""
        return shard_views(space.buffers, self.shard)

    def gather_(self, space: FlatSpace) -> None:
        """Every rank of the node takes the others' shards of ``space``: the whole buffers."""
        which, of = self.shard
        comm = self.node_comm
        if comm is None or of == 1:
            return
        handles = []
        with torch.no_grad():
            for i, b in enumerate(space.buffers):
                lo, hi = shard_bounds(b.numel(), which, of)
                mine = b.new_zeros(-(-b.numel() // of))   # equal lengths for the gather
                mine[:hi - lo].copy_(b[lo:hi])
                handles.append((b, comm.allgather_async(mine, name=f"{self.name}.shards.{i}")))
            for b, h in handles:
                comm.synchronize(h)
                b.copy_(comm.gathered(h)[:b.numel()])
