"""Horovod backend: NCCL on GPUs, Gloo or MPI on CPUs, with Horovod's tensor fusion."""
from __future__ import annotations

import datetime
import itertools
import pickle
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .base import Communicator, Handle, ReduceOp, sum_gathered_, sum_scale

GROUP_TIMEOUT = datetime.timedelta(minutes=5)
_splits = itertools.count()   # each split's groups meet under their own prefix


class _HorovodHandle(Handle):
    """Horovod handles: ``handle`` (None when everything went by ``gathers``), and bfloat16
    tensors whose bits were gathered (Horovod 0.28 cannot sum bfloat16), summed here in rank
    order (the same on every rank) and scaled by ``gather_scale``."""

    def __init__(self, handle: Optional[int], tensors: Sequence[Tensor],
                 gathers: Sequence[tuple[Tensor, int]] = (), gather_scale: float = 1.0) -> None:
        self.handle, self.tensors = handle, list(tensors)
        self.gathers, self.gather_scale = list(gathers), gather_scale
        self.output: Optional[Tensor] = None

    @property
    def pending(self) -> list[int]:
        return ([] if self.handle is None else [self.handle]) + [h for _, h in self.gathers]


class HorovodCommunicator(Communicator):
    """Collectives through ``horovod.torch`` (``hvd.init()`` must have run, possibly on an
    mpi4py sub-communicator: ``hvd.init(comm=subcomm)``), over a process set (default: all)."""

    name = "horovod"
    matches_by_name = True

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

    @property
    def whole_job(self) -> bool:
        return self.process_set is self._hvd.global_process_set

    def split(self, partitions: Sequence[Sequence[Sequence[int]]], device_type: str = "cpu",
              hosts: int = 1) -> list[Communicator]:
        """Process groups of their own (Gloo, or NCCL for CUDA tensors), not Horovod process sets:
        Horovod runs every process set's collectives from one background cycle that also
        negotiates across the whole job, so a group's collectives would wait behind the others'.
        They meet in a store rank 0 serves (``rendezvous``); a store that cannot be served raises
        ``StoreUnavailable`` on every rank."""
        import torch.distributed as dist

        from ..rendezvous import interface, serve_from_rank0
        from .torch_dist import ProcessGroupCommunicator

        iface = interface()
        store, _, _ = serve_from_rank0(self, hosts, GROUP_TIMEOUT)
        tag = f"ssd-groups-{next(_splits)}"
        mine = []
        for p, partition in enumerate(partitions):
            index, ranks = next((i, r) for i, r in enumerate(partition) if self.rank in r)
            prefixed = dist.PrefixStore(f"{tag}/{p}/{index}", store)
            rank, size = list(ranks).index(self.rank), len(ranks)
            if device_type == "cuda":
                group = dist.ProcessGroupNCCL(prefixed, rank, size)
            else:
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = GROUP_TIMEOUT
                opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface) if iface
                                 else dist.ProcessGroupGloo.create_default_device()]
                group = dist.ProcessGroupGloo(prefixed, rank, size, opts)
            mine.append(ProcessGroupCommunicator(group, rank, size, device_type))
        return mine

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str,
                         op: ReduceOp = ReduceOp.AVERAGE, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        summed = [t for t in tensors if t.dtype != torch.bfloat16]
        handle = None if not summed else self._hvd.grouped_allreduce_async_(
            summed, name=name, op=self._ops[op], prescale_factor=prescale_factor,
            postscale_factor=postscale_factor, process_set=self.process_set)
        bf16 = [t for t in tensors if t.dtype == torch.bfloat16]
        if not bf16:
            return _HorovodHandle(handle, tensors)
        pre, post = sum_scale(op, self.size, prescale_factor, postscale_factor)
        gathers = [(t, self._hvd.allgather_async(t.reshape(-1).view(torch.int16), name=f"{name}.bf16.{i}",
                                                 process_set=self.process_set)) for i, t in enumerate(bf16)]
        return _HorovodHandle(handle, tensors, gathers, pre * post)

    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        handle = self._hvd.allgather_async(tensor, name=name, process_set=self.process_set)
        return _HorovodHandle(handle, [tensor])

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _HorovodHandle)
        return all([bool(self._hvd.poll(h)) for h in handle.pending])

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _HorovodHandle)
        if handle.handle is not None:
            handle.output = self._hvd.synchronize(handle.handle)
        for tensor, h in handle.gathers:
            sum_gathered_(tensor, self._hvd.synchronize(h), handle.gather_scale)
        handle.gathers = []

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
