"""The warm-up's synchronous step: gradients averaged across ranks, as ``hvd.DistributedOptimizer``
does, in Horovod's fusion-friendly groups."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from .comm import Communicator, ReduceOp, payload_bytes
from .compression import compress, decompress_into_
from .stats import SSDStats

Groups = Optional[Union[int, list[list[Tensor]]]]


def make_groups(params: Sequence[Tensor], groups: Groups) -> list[list[Tensor]]:
    """Horovod's ``groups``: None (one fused allreduce), a count of near-equal groups, or lists of
    parameters (those left out go alone)."""
    params = list(params)
    if groups is None:
        return [params]
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1:
            raise ValueError(f"groups must be a positive integer or a list of lists of parameters, got {groups}")
        n = min(groups, len(params))
        return [params[i * len(params) // n:(i + 1) * len(params) // n] for i in range(n)]
    if not isinstance(groups, list):
        raise ValueError("groups must be a positive integer or a list of lists of parameters")
    index = {id(p): i for i, p in enumerate(params)}
    seen: set[int] = set()
    out = []
    for group in groups:
        members = []
        for p in group:
            if not isinstance(p, Tensor):
                raise ValueError("groups must consist of torch.Tensor parameters")
            if id(p) in seen:
                raise ValueError("a parameter can only appear once in groups")
            seen.add(id(p))
            if id(p) in index:
                members.append(p)
        if members:
            out.append(sorted(members, key=lambda p: index[id(p)]))
    out += [[p] for p in params if id(p) not in seen]
    return out


class GradientAverager:
    """Averages the gradients of ``params`` in place across ranks, under the collective names
    ``{name}.grad.{group}``; ``gradient_predivide_factor`` splits the division as Horovod does."""

    def __init__(self, comm: Communicator, params: Sequence[Tensor], *, groups: Groups,
                 gradient_predivide_factor: float, compression: Any, sparse_as_dense: bool,
                 stats: SSDStats, name: str = "ssd") -> None:
        self.comm, self.params = comm, list(params)
        self.groups = make_groups(self.params, groups)
        self.prescale = 1.0 / gradient_predivide_factor
        self.postscale = gradient_predivide_factor
        self.compression, self.sparse_as_dense, self.stats = compression, sparse_as_dense, stats
        self.name = name

    def average_(self, without_gradients: bool = False) -> int:
        """Every rank calls it at the same step; a parameter without a gradient sends zeros
        (another rank may have one: dynamic graphs). Sparse gradients are gathered and stay sparse,
        as Horovod does, unless ``sparse_as_dense``. Returns how many ranks said they stepped
        ``without_gradients`` (a flag fused into the first allreduce), so every rank can stop."""
        if self.comm.size == 1:   # a rank's gradients are their own average: no collective, as Horovod
            self.stats.warmup_allreduces += 1
            return int(without_gradients)
        with record_function("ssd_allreduce.warmup_allreduce"):
            t0 = time.perf_counter()
            sparse, densified = self._prepare_grads()
            pending = []
            flag = None
            for i, group in enumerate(self.groups):
                dense = [p for p in group if p.requires_grad and not p.grad.is_sparse]
                if not dense:
                    continue
                wire, contexts = compress(self.compression, [p.grad for p in dense])
                self._count_bytes(payload_bytes(wire))
                if flag is None:
                    flag = torch.full((1,), float(without_gradients), dtype=wire[0].dtype, device=wire[0].device)
                    wire, contexts = wire + [flag], contexts + [None]
                handle = self.comm.allreduce_async_(wire, name=f"{self.name}.grad.{i}", op=ReduceOp.AVERAGE,
                                                    prescale_factor=self.prescale,
                                                    postscale_factor=self.postscale)
                pending.append((dense, handle, wire, contexts))
            for p in sparse:
                self._average_sparse_(p)
            for dense, handle, wire, contexts in pending:
                self.comm.synchronize(handle)
                decompress_into_(self.compression, [p.grad for p in dense], wire, contexts)
            if flag is None:   # every gradient sparse: the flag travels alone
                flag = torch.full((1,), float(without_gradients), device=self.params[0].device)
                self.comm.synchronize(self.comm.allreduce_async_([flag], name=f"{self.name}.flag"))
            for p in densified:
                p.grad = p.grad.to_sparse()
            self.stats.comm_wait_seconds += time.perf_counter() - t0
            self.stats.warmup_allreduces += 1
            return round(float(flag) * self.comm.size)

    def _count_bytes(self, nbytes: int) -> None:
        self.stats.bytes_allreduced += nbytes
        self.stats.warmup_bytes_allreduced += nbytes

    def _prepare_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """Zeros for missing gradients of trainable parameters (frozen ones take no part). Returns
        the sparse gradients' parameters, and those densified for the allreduce
        (``sparse_as_dense``), to be made sparse again."""
        sparse, densified = [], []
        for p in self.params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse:
                if self.sparse_as_dense:
                    p.grad = p.grad.to_dense()
                    densified.append(p)
                else:
                    sparse.append(p)
        return sparse, densified

    def _average_sparse_(self, p: Tensor) -> None:
        """The mean of every rank's sparse gradient: their entries gathered, summed, divided."""
        grad = p.grad.coalesce()
        everyone = self.comm.allgather_object((grad.indices().cpu(), grad.values().cpu()))
        indices = torch.cat([i for i, _ in everyone], dim=1).to(grad.device)
        values = torch.cat([v for _, v in everyone]).to(grad.device)
        self._count_bytes(grad.indices().nbytes + grad.values().nbytes)
        p.grad = torch.sparse_coo_tensor(indices, values / len(everyone), grad.shape,
                                         check_invariants=False).coalesce()   # valid: from coalesced ones
