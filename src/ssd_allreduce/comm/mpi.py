"""mpi4py backend: ``Iallreduce`` on CPU tensors' memory, for CPU clusters without Horovod.

MPI implementations usually progress a non-blocking collective only inside MPI calls, so the
optimizer polls (``MPI_Test``) once per local step while a window is in flight.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..tensors import flatten
from .base import Communicator, FlattenedHandle, Handle, ReduceOp, sum_gathered_, sum_scale


# MPI has no 16-bit floating-point sum: such buffers are gathered and summed here, in rank order
# (the same on every rank)
_GATHERED_DTYPES = (torch.float16, torch.bfloat16)


class _MPIHandle(FlattenedHandle):
    def __init__(self, requests: list[Any], gathered: Optional[dict[int, Tensor]] = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.requests = requests
        self.gathered = gathered or {}   # index of a flat buffer -> every rank's copy of it

    def finish(self) -> None:
        for i, everyone in self.gathered.items():
            sum_gathered_(self.flats[i], everyone)
        super().finish()


class MPICommunicator(Communicator):
    """Collectives on an mpi4py communicator (``MPI.COMM_WORLD`` unless given)."""

    name = "mpi"

    def __init__(self, comm: Optional[Any] = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @property
    def whole_job(self) -> bool:
        return self.comm == self._MPI.COMM_WORLD

    def split(self, partitions: Sequence[Sequence[Sequence[int]]], device_type: str = "cpu",
              hosts: int = 1) -> list[Communicator]:
        """Split communicators, one per partition (colour: this rank's group)."""
        return [MPICommunicator(self.comm.Split(next(i for i, ranks in enumerate(p) if self.rank in ranks), self.rank))
                for p in partitions]

    @staticmethod
    def _numpy(t: Tensor) -> Any:
        if t.device.type != "cpu":
            raise ValueError(f"the mpi backend reduces CPU tensors only, got one on {t.device}: "
                             "use backend='horovod' (NCCL) or backend='torch' for GPU training")
        if t.dtype in _GATHERED_DTYPES:   # numpy has no bfloat16: move the bits
            t = t.view(torch.int16)
        return t.detach().numpy()

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str,
                         op: ReduceOp = ReduceOp.AVERAGE, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        pre, post = sum_scale(op, self.size, prescale_factor, postscale_factor)
        groups, flats = flatten(tensors)
        buffers = [self._numpy(flat) for flat in flats]   # validates before anything is modified
        requests, gathered = [], {}
        for i, (flat, buffer) in enumerate(zip(flats, buffers)):
            if pre != 1.0:
                flat.mul_(pre)
            if flat.dtype in _GATHERED_DTYPES:
                gathered[i] = flat.new_empty(flat.numel() * self.size)
                requests.append(self.comm.Iallgather(buffer, self._numpy(gathered[i])))
            else:
                requests.append(self.comm.Iallreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM))
        return _MPIHandle(requests, gathered, tensors=tensors, groups=groups, flats=flats, scale=post)

    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        tensor = tensor.reshape(-1).contiguous()
        output = tensor.new_empty(tensor.numel() * self.size)
        request = self.comm.Iallgather(self._numpy(tensor), self._numpy(output))
        handle = _MPIHandle([request], tensors=[], groups=[], flats=[], scale=1.0)
        handle.output = output
        handle.sent = tensor   # kept alive until the gather is done
        return handle

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _MPIHandle)
        return bool(self._MPI.Request.Testall(handle.requests))

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _MPIHandle)
        self._MPI.Request.Waitall(handle.requests)
        handle.finish()

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError(f"broadcast_ needs contiguous tensors ({name})")
            self.comm.Bcast(self._numpy(t), root=root_rank)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)
