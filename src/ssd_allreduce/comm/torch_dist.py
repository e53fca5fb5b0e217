"""torch.distributed backend (Gloo on CPUs, NCCL on GPUs) for jobs launched without Horovod.

On CUDA the packing and the collective are issued from a side stream, so the compute stream
only waits for them when the result is needed, and then on the device, not on the host.
"""
from __future__ import annotations

import pickle
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..tensors import flatten
from .base import Communicator, FlattenedHandle, Handle, ReduceOp, sum_scale


class _TorchHandle(FlattenedHandle):
    def __init__(self, works: list[Any], stream: Optional["torch.cuda.Stream"], **kw: Any) -> None:
        super().__init__(**kw)
        self.works, self.stream = works, stream


class TorchDistCommunicator(Communicator):
    """Collectives through an initialised ``torch.distributed`` process group."""

    name = "torch"

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "dist.init_process_group() (torchrun sets its environment) first")
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def whole_job(self) -> bool:
        return self.group is None

    def split(self, partitions: Sequence[Sequence[Sequence[int]]], device_type: str = "cpu",
              hosts: int = 1) -> list[Communicator]:
        """Subgroups (``new_group``: every rank creates every group, in the same order)."""
        mine = []
        for partition in partitions:
            groups = {tuple(ranks): dist.new_group(list(ranks)) for ranks in partition}
            mine.append(TorchDistCommunicator(next(g for ranks, g in groups.items() if self.rank in ranks)))
        return mine

    def _side_stream(self, device: torch.device) -> Optional["torch.cuda.Stream"]:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def allreduce_async_(self, tensors: Sequence[Tensor], name: str,
                         op: ReduceOp = ReduceOp.AVERAGE, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        pre, post = sum_scale(op, self.size, prescale_factor, postscale_factor)
        stream = self._side_stream(tensors[0].device) if tensors else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            groups, flats = flatten(tensors)
            works = []
            for flat in flats:
                if pre != 1.0:
                    flat.mul_(pre)
                works.append(self._sum_async(flat))
        return _TorchHandle(works, stream, tensors=tensors, groups=groups, flats=flats, scale=post)

    def allgather_async(self, tensor: Tensor, name: str) -> Handle:
        stream = self._side_stream(tensor.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            output = tensor.new_empty(tensor.numel() * self.size)
            work = self._gather_async(output, tensor.reshape(-1))
        handle = _TorchHandle([work], stream, tensors=[], groups=[], flats=[output], scale=1.0)
        handle.output = output
        return handle

    def _sum_async(self, flat: Tensor) -> Any:
        return dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def _gather_async(self, output: Tensor, part: Tensor) -> Any:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return gather(output, part, group=self.group, async_op=True)

    def poll(self, handle: Handle) -> bool:
        assert isinstance(handle, _TorchHandle)
        return all(w.is_completed() for w in handle.works)

    def synchronize(self, handle: Handle) -> None:
        assert isinstance(handle, _TorchHandle)
        for w in handle.works:
            w.wait()  # on CUDA this orders the current stream after the collective
        if handle.stream is not None:
            current = torch.cuda.current_stream(handle.stream.device)
            current.wait_stream(handle.stream)
            for flat in handle.flats:
                flat.record_stream(current)
        handle.finish()

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        src = root_rank if self.group is None else dist.get_global_rank(self.group, root_rank)
        for t in tensors:
            dist.broadcast(t, src=src, group=self.group)

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class ProcessGroupCommunicator(TorchDistCommunicator):
    """Collectives on a process group made directly from a store (``ProcessGroupGloo(store, rank,
    size)``), outside ``torch.distributed``'s registry: whatever launched the job (Horovod, MPI),
    such a group has threads of its own, so its collectives never queue behind another's."""

    name = "process-group"

    def __init__(self, group: Any, rank: int, size: int, device: str = "cpu") -> None:
        self.group, self.rank, self.size, self.device = group, rank, size, torch.device(device)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def whole_job(self) -> bool:
        return False

    def _sum_async(self, flat: Tensor) -> Any:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self.group.allreduce([flat], opts)

    def _gather_async(self, output: Tensor, part: Tensor) -> Any:
        return self.group.allgather([list(output.chunk(self.size))], [part])

    def broadcast_(self, tensors: Sequence[Tensor], root_rank: int, name: str) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root_rank
        for t in tensors:
            self.group.broadcast([t], opts).wait()

    def allgather_object(self, obj: Any) -> list[Any]:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = torch.zeros(self.size, dtype=torch.int64, device=self.device)   # NCCL moves device tensors only
        self.group.allgather([list(sizes.chunk(self.size))], [torch.tensor([data.numel()], device=self.device)]).wait()
        padded = torch.zeros(int(sizes.max()), dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data.to(self.device)
        everyone = torch.empty(self.size * padded.numel(), dtype=torch.uint8, device=self.device)
        self.group.allgather([list(everyone.chunk(self.size))], [padded]).wait()
        return [pickle.loads(chunk[:n].cpu().numpy().tobytes())
                for chunk, n in zip(everyone.chunk(self.size), sizes.tolist())]
