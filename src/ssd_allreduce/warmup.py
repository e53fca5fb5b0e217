"""The warm-up's synchronous step: gradients averaged across ranks as ``hvd.DistributedOptimizer``
does, each bucket's allreduce started from backward as soon as its gradients are ready."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from .comm import Communicator, ReduceOp, payload_bytes
from .compression import compress, decompress_into_, gradient_compression
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


BUCKET_BYTES = 1 << 20   # without ``groups``: gradients launched together, about 1 MiB at a time


def make_buckets(params: Sequence[Tensor], groups: Groups, bucket_bytes: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """The allreduces of one warm-up step, in launch order. ``params`` are in the model's order,
    so backward produces their gradients roughly last to first: buckets start at the end. Without
    ``groups``, consecutive parameters fill buckets of about ``bucket_bytes``; with them, each
    group is a bucket (Horovod's grouped allreduce: sent once all its gradients are ready)."""
    params = list(params)
    if groups is not None:
        index = {id(p): i for i, p in enumerate(params)}
        return sorted(make_groups(params, groups), key=lambda g: -max(index[id(p)] for p in g))
    buckets: list[list[Tensor]] = []
    size = bucket_bytes
    for p in reversed(params):
        if size >= bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets


class _Launched:
    """A bucket's allreduce in flight: the parameters whose gradients it carries."""

    def __init__(self, dense: list[Tensor], handle: Any, wire: list[Tensor], contexts: list[Any]) -> None:
        self.dense, self.handle, self.wire, self.contexts = dense, handle, wire, contexts


class GradientAverager:
    """Averages the gradients of ``params`` (in the model's order) in place across ranks, as
    ``hvd.DistributedOptimizer`` does: a bucket's allreduce starts from backward, as soon as its
    last gradient is accumulated (``grad_ready``), and ``average_`` at the step sends what is left
    and waits. On backends that match collectives by call order (torch.distributed, MPI) buckets
    start in index order on every rank; on Horovod, which matches them by name, each gradient is
    a bucket of its own and starts when ready. Names are ``{name}.grad.{bucket}``;
    ``gradient_predivide_factor`` splits the division as Horovod does. ``counts`` names the
    ``stats`` it adds to: "warmup" (``warmup_allreduces``...) or "node" (hierarchical SSD-SGD's
    every-step average inside a node). With ``read_noise`` each step also leaves ``last_norms``
    (``warmup_end.WarmupEnd.observe``'s): the ranks' mean of their own dense gradients' squared
    norms, taken before they are sent, and the squared norm of the average, through one more
    collective: an allgather of two numbers per rank."""

    def __init__(self, comm: Communicator, params: Sequence[Tensor], *, groups: Groups,
                 gradient_predivide_factor: float, compression: Any, sparse_as_dense: bool,
                 stats: SSDStats, name: str = "ssd", counts: str = "warmup") -> None:
        self.comm, self.params = comm, list(params)
        # Horovod fuses what is ready in each cycle itself and matches collectives by name, so it
        # gets every gradient as soon as it is ready, as its own optimizer gives them
        self.buckets = make_buckets(self.params, groups, 0 if comm.matches_by_name else BUCKET_BYTES)
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.prescale = 1.0 / gradient_predivide_factor
        self.postscale = gradient_predivide_factor
        self.compression = gradient_compression(compression)
        self.sparse_as_dense, self.stats = sparse_as_dense, stats
        self.name, self.counts = name, counts
        self.last_seconds, self.last_bytes = 0.0, 0   # the last step's buckets: first start to last arrival
        self.read_noise = False
        self.last_norms: Optional[tuple[float, float]] = None
        self._reset()

    def _reset(self) -> None:
        self._ready: list[set[Tensor]] = [set() for _ in self.buckets]
        self._launched: dict[int, _Launched] = {}
        self._next = 0   # buckets below it have started (the order-matched backends' order)
        self._flag: Optional[Tensor] = None
        self._started: Optional[float] = None   # when this step's first bucket started
        self._bytes = 0
        self._own_sq: list[Tensor] = []   # read_noise: each bucket's squared norm before it is sent

    def grad_ready(self, p: Tensor) -> None:
        """``p``'s gradient is final for this step (from its post-accumulate hook): start every
        bucket that is complete and next in order."""
        i = self.bucket_of.get(p)
        if i is None or self.comm.size == 1:
            return
        self._ready[i].add(p)
        if self.comm.matches_by_name:
            if self._complete(i):
                self._launch(i, without_gradients=False)
                self._count("allreduces_in_backward", 1)
            return
        while self._next < len(self.buckets) and self._complete(self._next):
            self._launch(self._next, without_gradients=False)
            self._count("allreduces_in_backward", 1)
            self._next += 1

    def _complete(self, i: int) -> bool:
        """Bucket ``i`` has every gradient, all dense (a bucket with a sparse one is sent from
        ``average_``, where it is gathered or densified)."""
        trainable = [q for q in self.buckets[i] if q.requires_grad]
        return len(self._ready[i]) >= len(trainable) and not any(q.grad.is_sparse for q in trainable)

    def _launch(self, i: int, without_gradients: bool) -> None:
        dense = [p for p in self.buckets[i] if p.requires_grad and not p.grad.is_sparse]
        if not dense:
            self._launched[i] = _Launched([], None, [], [])
            return
        if self.read_noise:
            self._own_sq.append(_squared_norm([p.grad for p in dense], self.params[0].device))
        wire, contexts = compress(self.compression, [p.grad for p in dense])
        nbytes = payload_bytes(wire)
        self._count_bytes(nbytes)
        self._bytes += nbytes
        if self._flag is None and not self.comm.matches_by_name:
            # the first allreduce of the step tells if a rank had no gradient (with Horovod, where
            # buckets start in any order, the flag goes alone from average_())
            self._flag = torch.full((1,), float(without_gradients), dtype=wire[0].dtype, device=wire[0].device)
            wire, contexts = wire + [self._flag], contexts + [None]
        handle = self.comm.allreduce_async_(wire, name=f"{self.name}.grad.{i}", op=ReduceOp.AVERAGE,
                                            prescale_factor=self.prescale, postscale_factor=self.postscale)
        self._launched[i] = _Launched(dense, handle, wire, contexts)
        if self._started is None:
            self._started = time.perf_counter()

    def average_(self, without_gradients: bool = False) -> int:
        """Every rank calls it at the same step; a parameter without a gradient sends zeros
        (another rank may have one: dynamic graphs). Sparse gradients are gathered and stay sparse,
        as Horovod does, unless ``sparse_as_dense``. Returns how many ranks said they stepped
        ``without_gradients`` (a flag fused into the first allreduce), so every rank can stop."""
        self.last_norms = None
        if self.comm.size == 1:   # a rank's gradients are their own average: no collective, as Horovod
            self._count("allreduces", 1)
            return int(without_gradients)
        with record_function("ssd_allreduce.warmup_allreduce"):
            t0 = time.perf_counter()
            try:
                sparse, densified = self._prepare_grads()
                for i in range(len(self.buckets)):
                    if i not in self._launched:
                        self._launch(i, without_gradients)
                flag_alone = None
                if self._flag is None:   # Horovod, or every gradient sparse: the flag travels alone
                    self._flag = torch.full((1,), float(without_gradients), device=self.params[0].device)
                    flag_alone = self.comm.allreduce_async_([self._flag], name=f"{self.name}.flag")
                for p in sparse:
                    self._average_sparse_(p)
                for launched in self._launched.values():
                    if launched.handle is not None:
                        self.comm.synchronize(launched.handle)
                        decompress_into_(self.compression, [p.grad for p in launched.dense], launched.wire,
                                         launched.contexts)
                flag = self._flag
                if flag_alone is not None:
                    self.comm.synchronize(flag_alone)
                if self._started is not None:   # the gradients' own time, which the auto window reads
                    self.last_seconds, self.last_bytes = time.perf_counter() - self._started, self._bytes
                if self.read_noise:
                    self.last_norms = self._read_norms()
            finally:
                self._reset()
            for p in densified:
                p.grad = p.grad.to_sparse()
            self.stats.comm_wait_seconds += time.perf_counter() - t0
            self._count("allreduces", 1)
            return round(float(flag) * self.comm.size)

    def _read_norms(self) -> tuple[float, float]:
        """(the ranks' mean of their own squared norms, rank 0's squared norm of the average),
        from an allgather of both numbers: every rank sums the same bits in the same order, so all
        decide alike whatever order their backend's allreduce sums in."""
        device = self.params[0].device
        averaged = _squared_norm([p.grad for launched in self._launched.values() for p in launched.dense], device)
        own = torch.stack(self._own_sq).sum() if self._own_sq else torch.zeros((), device=device)
        mine = torch.stack([own, averaged])
        handle = self.comm.allgather_async(mine, name=f"{self.name}.noise")
        self.comm.synchronize(handle)
        everyone = self.comm.gathered(handle).reshape(-1, 2).tolist()
        self._count_bytes(mine.nbytes)
        return sum(own_sq for own_sq, _ in everyone) / len(everyone), everyone[0][1]

    def discard(self) -> None:
        """Forget the allreduces started from backward (their ranks changed: Horovod elastic)."""
        self._reset()

    def _count_bytes(self, nbytes: int) -> None:
        self.stats.bytes_allreduced += nbytes
        self._count("bytes_allreduced", nbytes)

    def _count(self, what: str, n: int) -> None:
        name = f"{self.counts}_{what}"
        setattr(self.stats, name, getattr(self.stats, name) + n)

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


def _squared_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """The squared norm of ``grads`` together, in float32 on ``device`` (16-bit gradients are
    widened first: their squares overflow)."""
    if not grads:
        return torch.zeros((), device=device)
    wide = [g if g.dtype in (torch.float32, torch.float64) else g.float() for g in grads]
    return torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(wide)]).square().sum()
