"""A communicator for single-process tests: one rank, or ``mirrors`` identical ranks (every rank
holds what this one holds), so averages are identities; an allreduce can be made to stay "in
flight" for a number of polls."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ssd_allreduce.comm.base import Communicator, Handle, ReduceOp


class _LocalHandle(Handle):
    def __init__(self, tensors: Sequence[Tensor], scale: float, polls_left: int) -> None:
        self.tensors, self.scale, self.polls_left = list(tensors), scale, polls_left


class LocalCommunicator(Communicator):
    name = "local"
    rank = 0

    def __init__(self, pending_polls: int = 0, mirrors: int = 1) -> None:
        self.pending_polls, self.size = pending_polls, mirrors
        self.calls: list[tuple[str, int]] = []

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str, op: ReduceOp = ReduceOp.AVERAGE,
                         prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Handle:
        self.calls.append((name, len(tensors)))
        return _LocalHandle(tensors, prescale_factor * postscale_factor, self.pending_polls)

    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        self.calls.append((name, 1))
        handle = _LocalHandle([], 1.0, self.pending_polls)
        handle.output = tensor.reshape(-1).repeat(self.size)   # every rank holds what this one holds
        return handle

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _LocalHandle)
        handle.polls_left -= 1
        return handle.polls_left < 0

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _LocalHandle)
        if handle.scale != 1.0:
            for t in handle.tensors:
                t.mul_(handle.scale)

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        self.calls.append((name, len(tensors)))

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj] * self.size
