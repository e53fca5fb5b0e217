"""Horovod backend: NCCL on GPUs, Gloo or MPI on CPUs, with Horovod's tensor fusion."""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Communicator, Handle, ReduceOp


class _HorovodHandle(Handle):
    def __init__(self, handle: int, tensors: Sequence[Tensor]) -> None:
        self.handle, self.tensors = handle, list(tensors)


class HorovodCommunicator(Communicator):
    """Collectives through ``horovod.torch`` (``hvd.init()`` must have run, possibly on an
    mpi4py sub-communicator: ``hvd.init(comm=subcomm)``), over a process set (default: all)."""

    name = "horovod"

    def __init__(self, process_set: Any = None) -> None:
        import horovod.torch as hvd

        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialised: call hvd.init() before building the optimizer")
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self._ops = {ReduceOp.AVERAGE: hvd.Average, ReduceOp.SUM: hvd.Sum, ReduceOp.ADASUM: hvd.Adasum}
        self.refresh()

    def refresh(self) -> None:
        """Re-read this process's place, e.g. after ``hvd.elastic.run`` re-initialised Horovod."""
        self.member = bool(self.process_set.included())
        self.size = self.process_set.size()
        self.rank = self.process_set.rank() if self.member else -1
        # Horovod reads a broadcast's root as a global rank; ours is a rank in the set
        self._global_ranks = list(self.process_set.ranks or range(self._hvd.size()))

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str,
                         op: ReduceOp = ReduceOp.AVERAGE, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        handle = self._hvd.grouped_allreduce_async_(
            list(tensors), name=name, op=self._ops[op], prescale_factor=prescale_factor,
            postscale_factor=postscale_factor, process_set=self.process_set)
        return _HorovodHandle(handle, tensors)

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _HorovodHandle)
        return bool(self._hvd.poll(handle.handle))

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _HorovodHandle)
        self._hvd.synchronize(handle.handle)

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        handles = [self._hvd.broadcast_async_(t, self._global_ranks[root_rank], name=f"{name}.{i}",
                                              process_set=self.process_set)
                   for i, t in enumerate(tensors)]
        for h in handles:
            self._hvd.synchronize(h)

    def allgather_object(self, obj: Any) -> list[Any]:
        # hvd.allgather_object() takes no process set in Horovod 0.28: gather pickled bytes instead
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self._hvd.allgather(torch.tensor([data.numel()]), name="ssd.object_sizes",
                                    process_set=self.process_set)
        gathered = self._hvd.allgather(data, name="ssd.objects", process_set=self.process_set)
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in torch.split(gathered, sizes.tolist())]
