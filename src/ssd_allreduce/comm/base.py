"""The one small interface every communication backend implements.

Naming follows Horovod: a trailing ``_`` works in place, ``_async`` returns a handle that
``poll`` tests and ``synchronize`` waits on.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

from ..tensors import unflatten_


class ReduceOp(enum.Enum):
    AVERAGE = "average"
    SUM = "sum"
    ADASUM = "adasum"


class Handle:
    """An in-flight allreduce. Backends subclass it to carry what their wait needs."""


class Communicator(ABC):
    """Collectives over the ranks of one job (or one process set of it); ``rank`` and ``size``
    are this process's place in it, fixed when the communicator is built. A process outside the
    set (``member`` False) takes part in none of its collectives."""

    name: str = "base"
    rank: int
    size: int
    member: bool = True
    matches_by_name: bool = False   # collectives are matched by name (Horovod), not by call order

    @abstractmethod
    def allreduce_async_(self, tensors: Sequence[Tensor], name: str,
                         op: ReduceOp = ReduceOp.AVERAGE, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        """Start reducing ``tensors`` in place across ranks; every rank passes tensors of the same
        shapes, dtypes and order, under the same ``name``. AVERAGE divides by ``size``."""

    @abstractmethod
    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        """Start gathering every rank's 1-D ``tensor`` (the same length everywhere) end to end in
        rank order; after ``synchronize``, ``gathered(handle)`` is the result."""

    @staticmethod
    def gathered(handle: Handle) -> Tensor:
        """The result of a finished ``allgather_async``."""
        return handle.output  # type: ignore[attr-defined]

    @abstractmethod
    def poll(self, handle: Handle) -> bool:
        """True when the allreduce behind ``handle`` has finished (never blocks)."""

    @abstractmethod
    def synchronize(self, handle: Handle) -> None:
        """Wait until ``handle`` has finished and its result is in the tensors it was given."""

    @abstractmethod
    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        """Overwrite ``tensors`` on every rank with root's values (blocking)."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (blocking)."""

    @property
    def job_key(self) -> Any:
        """This process's place in its job: the optimizers of one key are numbered together (their
        collectives' names) and share their hierarchical groups. One job per backend in a process."""
        return self.name

    @property
    def whole_job(self) -> bool:
        """This communicator spans every rank of the job (what ``split`` builds on)."""
        return False

    def split(self, partitions: Sequence[Sequence[Sequence[int]]], device_type: str = "cpu",
              hosts: int = 1) -> list["Communicator"]:
        """For each partition of the ranks into groups, this rank's group as a communicator of
        its own (collective: every rank passes the same partitions). ``device_type`` is where
        the groups' tensors live; ``hosts``, how many machines the ranks run on."""
        raise NotImplementedError(f"the {self.name} backend cannot be split into groups")

    def refresh(self) -> None:
        """Re-read ``rank`` and ``size`` after the job's membership changed (Horovod elastic)."""
        raise NotImplementedError(f"the {self.name} backend has a fixed membership: elastic training "
                                  "needs Horovod (horovodrun --min-np/--max-np)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def payload_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes an allreduce of ``tensors`` carries per rank (its input, not the wire traffic)."""
    return sum(t.numel() * t.element_size() for t in tensors)


class FlattenedHandle(Handle):
    """A reduction running on flat buffers (``tensors.flatten``) copied back into the caller's
    tensors when it is done."""

    def __init__(self, tensors: Sequence[Tensor], groups: list[list[int]],
                 flats: list[Tensor], scale: float) -> None:
        self.tensors, self.groups, self.flats, self.scale = list(tensors), groups, flats, scale

    def finish(self) -> None:
        """Scale the reduced buffers and copy them back (nothing to copy where a buffer is the tensor)."""
        with torch.no_grad():
            if self.scale != 1.0:
                torch._foreach_mul_(self.flats, self.scale)
        unflatten_(self.tensors, self.groups, self.flats)


def sum_gathered_(target: Tensor, everyone: Tensor, scale: float = 1.0) -> None:
    """``target`` = ``scale`` x the sum of every rank's copy of it, gathered end to end (possibly
    as raw bits of another dtype), in rank order and in float32: the same on every rank. For 16-bit
    floats the backend cannot sum."""
    total = everyone.view(target.dtype).view(-1, target.numel()).float().sum(dim=0)
    with torch.no_grad():
        target.copy_((total * scale).view_as(target))


def sum_scale(op: ReduceOp, size: int, prescale_factor: float, postscale_factor: float) -> tuple[float, float]:
    """(factor before a SUM reduction, factor after it) that realise ``op`` with pre/postscale."""
    if op is ReduceOp.ADASUM:
        raise ValueError("op=Adasum is only available with the Horovod backend")
    post = postscale_factor / size if op is ReduceOp.AVERAGE else postscale_factor
    return prescale_factor, post
