"""The drop-in optimizer: SSD-SGD behind the API of ``horovod.torch.DistributedOptimizer``.

Example::

    import horovod.torch as hvd
    import ssd_allreduce

    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9, weight_decay=1e-4)
    opt = ssd_allreduce.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(),
        sync_every=5, delay=5, warmup_steps=500)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.finish()   # land the window still in flight (also done at interpreter exit)
"""
from __future__ import annotations

import atexit
import logging
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from .algorithm import (FlatSpace, Schedule, apply_global_update_, compensate_local_, launch_window,
                        validate_glu)
from .comm import Communicator, Handle, ReduceOp, make_communicator, payload_bytes
from .compression import Compression

logger = logging.getLogger(__name__)

DEFAULT_GLU_BETA = 0.5
STATE_KEY = "ssd_sgd"
STATE_VERSION = 1
NONFINITE_POLICIES = ("raise", "skip")

_live_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


@dataclass
class SSDStats:
    """Counters a user can read as ``optimizer.ssd_stats``.

    ``comm_wait_seconds`` is host time blocked on communication; on CUDA with the torch backend
    the wait is enqueued on the GPU stream instead and does not show here."""

    steps: int = 0
    warmup_allreduces: int = 0
    windows_launched: int = 0
    windows_landed: int = 0
    windows_skipped: int = 0
    bytes_allreduced: int = 0
    comm_wait_seconds: float = 0.0
    polls_pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Window:
    """A launched window: in flight while ``handle`` is set, then its result sits in ``delta``."""

    launched_at: int
    handle: Optional[Handle]
    wire: list[Tensor]
    contexts: list[Any]


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[tuple[str, Tensor]]] = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = ReduceOp.AVERAGE,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Optional[Union[int, list[list[Tensor]]]] = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
    *,
    sync_every: int = 5,
    delay: Optional[int] = None,
    warmup_steps: int = 500,
    glu_beta: float = DEFAULT_GLU_BETA,
    compensation: str = "glu",
    named_buffers: Optional[Iterable[tuple[str, Tensor]]] = None,
    backend: Union[str, Communicator] = "horovod",
    nonfinite: str = "raise",
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` (in place) so it trains with SSD-SGD; returns the same object, still an
    instance of its class.

    The first block of arguments means what it means for ``hvd.DistributedOptimizer``; they
    govern the warm-up's gradient allreduce (``op``, ``gradient_predivide_factor``, ``groups``,
    ``sparse_as_dense``), and ``compression`` also applies to the model-delta allreduce, which is
    always an average. SSD-SGD's own knobs:

    - ``sync_every`` (k): a window of k local steps ends with a non-blocking allreduce of the
      model delta; ``delay`` (d, default k): local steps it overlaps before it lands;
    - ``warmup_steps``: steps of exact synchronous SGD first;
    - ``glu_beta``: how a landing keeps this rank's own progress (1) versus the global estimate
      (0); ``compensation="overwrite"`` replaces the local weights by the global ones (ablation);
    - ``named_buffers``: floating-point buffers (BatchNorm statistics) averaged with the delta;
    - ``backend``: "horovod", "torch" (torch.distributed) or "mpi" (mpi4py), or a Communicator;
    - ``nonfinite``: "raise" (default) or "skip" a window whose averaged delta is not finite.
    """
    if hasattr(optimizer, "_ssd_schedule"):
        raise ValueError("this optimizer is already wrapped by ssd_allreduce.DistributedOptimizer")
    schedule = Schedule(sync_every, sync_every if delay is None else delay, warmup_steps)
    validate_glu(glu_beta, compensation)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    reduce_op = _resolve_op(op)
    if gradient_predivide_factor != 1.0 and reduce_op is not ReduceOp.AVERAGE:
        raise ValueError("gradient_predivide_factor is only supported with op=Average")
    if num_groups and groups is None:
        groups = num_groups
    comm = make_communicator(backend, process_set)
    if reduce_op is ReduceOp.ADASUM and comm.name != "horovod":
        raise ValueError(f"op=Adasum needs backend='horovod', got backend={comm.name!r}")

    base = type(optimizer)
    cls = type(base.__name__, (base,), dict(_SSDSGDOptimizer.__dict__))
    cls._ssd_base = base
    optimizer.__class__ = cls
    # hvd.broadcast_optimizer_state() initialises an empty optimizer state by calling the wrapped
    # class's own step() when `optimizer.__module__` is Horovod's optimizer module; otherwise it
    # would call our step() and count a training step. Only this instance says so; the class's
    # module stays ssd_allreduce.optimizer.
    optimizer.__dict__["__module__"] = "horovod.torch.optimizer"
    optimizer._ssd_setup(
        named_parameters=named_parameters, named_buffers=named_buffers, comm=comm,
        schedule=schedule, glu_beta=float(glu_beta), compensation=compensation,
        compression=compression, op=reduce_op,
        prescale=1.0 / gradient_predivide_factor if reduce_op is ReduceOp.AVERAGE else 1.0,
        postscale=gradient_predivide_factor if reduce_op is ReduceOp.AVERAGE else 1.0,
        backward_passes_per_step=backward_passes_per_step, groups=groups,
        sparse_as_dense=sparse_as_dense, nonfinite=nonfinite)
    return optimizer


def finish() -> None:
    """Land the window still in flight of every SSD-SGD optimizer of this process.

    Every rank must call it at the same point of training (it is a no-op where nothing is in
    flight). It also runs at interpreter exit, so no rank leaves while another waits on it.
    """
    for opt in list(_live_optimizers):
        opt.finish()


def _finish_at_exit() -> None:
    try:
        finish()
    except Exception as exc:  # the backend may already be shut down; nothing left to protect
        warnings.warn(f"ssd_allreduce: could not land the last window at exit: {exc}")


_exit_hook_registered = False


def _register_exit_hook() -> None:
    # Registered at the first optimizer, i.e. after hvd.init(): atexit runs last-in first-out,
    # so the window lands before Horovod's own shutdown.
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_finish_at_exit)
        _exit_hook_registered = True


def _resolve_op(op: Any) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str):
        try:
            return ReduceOp(op.lower())
        except ValueError:
            raise ValueError(f"op must be one of {[o.value for o in ReduceOp]}, got {op!r}") from None
    try:
        import horovod.torch as hvd
    except ImportError:
        raise ValueError(f"op {op!r} is not a ReduceOp or one of 'average', 'sum', 'adasum'") from None
    by_value = {hvd.Average: ReduceOp.AVERAGE, hvd.Sum: ReduceOp.SUM, hvd.Adasum: ReduceOp.ADASUM}
    if op not in by_value:
        raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
    return by_value[op]


def _named(named: Optional[Iterable[tuple[str, Tensor]]], what: str) -> list[tuple[str, Tensor]]:
    items = list(named) if named is not None else []
    if any(not (isinstance(x, tuple) and len(x) == 2) for x in items):
        raise ValueError(f"named_{what} should be a sequence of (name, tensor) tuples, usually "
                         f"produced by model.named_{what}()")
    names = [n for n, _ in items]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"names in named_{what} must be unique; duplicates: {', '.join(dups)}")
    return items


class _SSDSGDOptimizer(torch.optim.Optimizer):
    """Methods copied into the class made by ``DistributedOptimizer`` (a subclass of the user's
    optimizer class); ``self._ssd_base`` is that user class."""

    _ssd_base: type
    # GradScaler then always calls step() and tells it about non-finite gradients, so every rank
    # takes part in the window schedule even when its own step is skipped.
    _step_supports_amp_scaling = True

    def _ssd_setup(self, *, named_parameters: Optional[Iterable[tuple[str, Tensor]]],
                   named_buffers: Optional[Iterable[tuple[str, Tensor]]], comm: Communicator,
                   schedule: Schedule, glu_beta: float, compensation: str, compression: Any,
                   op: ReduceOp, prescale: float, postscale: float, backward_passes_per_step: int,
                   groups: Optional[Union[int, list[list[Tensor]]]], sparse_as_dense: bool,
                   nonfinite: str) -> None:
        opt_params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if named_parameters is None:
            named = [(f"param.{i}.{j}", p) for i, g in enumerate(self.param_groups)
                     for j, p in enumerate(g["params"])]
        else:
            named = _named(named_parameters, "parameters")
        name_of = {id(p): n for n, p in named}
        unnamed = [p for p in opt_params if id(p) not in name_of]
        if unnamed:
            raise ValueError(f"{len(unnamed)} parameter(s) of the optimizer (shapes "
                             f"{[tuple(p.shape) for p in unnamed[:3]]}) are not in named_parameters: "
                             "pass named_parameters=model.named_parameters() of the model the "
                             "optimizer was built on")
        self._ssd_params = sorted(opt_params, key=lambda p: name_of[id(p)])
        self._ssd_param_names = [name_of[id(p)] for p in self._ssd_params]
        buffers = sorted((nb for nb in _named(named_buffers, "buffers") if nb[1].is_floating_point()),
                         key=lambda nb: nb[0])
        self._ssd_buffer_names = [n for n, _ in buffers]
        self._ssd_buffers = [b for _, b in buffers]

        self._ssd_comm = comm
        self._ssd_schedule = schedule
        self._ssd_glu_beta = glu_beta
        self._ssd_compensation = compensation
        self._ssd_compression = compression
        self._ssd_op, self._ssd_prescale, self._ssd_postscale = op, prescale, postscale
        self.backward_passes_per_step = backward_passes_per_step
        self._ssd_grad_groups = self._ssd_make_groups(groups)
        self.sparse_as_dense = sparse_as_dense
        self._ssd_nonfinite = nonfinite

        self._ssd_step = 0
        self._ssd_checked = False
        self._ssd_warned_scaler = False
        self._ssd_global: Optional[FlatSpace] = None
        self._ssd_snapshot: Optional[FlatSpace] = None
        self._ssd_delta: Optional[FlatSpace] = None
        self._ssd_window: Optional[_Window] = None
        self.ssd_stats = SSDStats()
        self._synchronized = False
        self._should_synchronize = True
        self._ssd_backward_passes = {p: 0 for p in self._ssd_params}
        this = weakref.ref(self)  # hooks must not keep a discarded optimizer alive

        def count_backward(p: Tensor) -> None:
            opt = this()
            if opt is not None:
                opt._ssd_count_backward(p)

        for p in self._ssd_params:
            p.register_post_accumulate_grad_hook(count_backward)
        _live_optimizers.add(self)
        _register_exit_hook()

    def _ssd_make_groups(self, groups: Optional[Union[int, list[list[Tensor]]]]) -> list[list[Tensor]]:
        params = self._ssd_params
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

    # ------------------------------------------------------------------ Horovod protocol
    def _ssd_count_backward(self, p: Tensor) -> None:
        self._ssd_backward_passes[p] += 1
        if self._ssd_backward_passes[p] > self.backward_passes_per_step:
            raise RuntimeError("Gradients were computed more than backward_passes_per_step times "
                               "before call to step(). Increase backward_passes_per_step to "
                               "accumulate gradients locally.")

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes

    def synchronize(self) -> None:
        """Average the gradients across ranks during warm-up (after it, SSD-SGD steps on local
        gradients and this only marks the step as synchronised)."""
        if self._ssd_schedule.in_warmup(self._ssd_step):
            self._ssd_allreduce_gradients()
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Make ``step()`` skip the gradient synchronisation, after an explicit ``synchronize()``
        (for gradient clipping or ``GradScaler.unscale_`` on averaged gradients)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def _ssd_allreduce_gradients(self) -> None:
        with record_function("ssd_allreduce.warmup_allreduce"):
            sparse = []
            for p in self._ssd_params:
                if p.grad is None:
                    # another rank may have a gradient for it (dynamic graphs): send zeros
                    p.grad = torch.zeros_like(p)
                elif p.grad.is_sparse:
                    if not self.sparse_as_dense:
                        raise ValueError("sparse gradients cannot be averaged in place: pass "
                                         "sparse_as_dense=True")
                    p.grad = p.grad.to_dense()
                    sparse.append(p)
            t0 = time.perf_counter()
            pending = []
            for i, group in enumerate(self._ssd_grad_groups):
                wire, contexts = self._ssd_compress([p.grad for p in group])
                handle = self._ssd_comm.allreduce_async_(
                    wire, name=f"ssd.grad.{i}", op=self._ssd_op,
                    prescale_factor=self._ssd_prescale, postscale_factor=self._ssd_postscale)
                self.ssd_stats.bytes_allreduced += payload_bytes(wire)
                pending.append((group, handle, wire, contexts))
            for group, handle, wire, contexts in pending:
                self._ssd_comm.synchronize(handle)
                self._ssd_decompress_into([p.grad for p in group], wire, contexts)
            for p in sparse:
                p.grad = p.grad.to_sparse()
            self.ssd_stats.comm_wait_seconds += time.perf_counter() - t0
            self.ssd_stats.warmup_allreduces += 1

    def _ssd_compress(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Any]]:
        pairs = [self._ssd_compression.compress(t) for t in tensors]
        return [w for w, _ in pairs], [c for _, c in pairs]

    def _ssd_decompress_into(self, targets: Sequence[Tensor], wire: Sequence[Tensor],
                             contexts: Sequence[Any]) -> None:
        with torch.no_grad():
            for t, w, c in zip(targets, wire, contexts):
                if w is not t:
                    t.copy_(self._ssd_compression.decompress(w, c))

    # ------------------------------------------------------------------ the step
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One training step: synchronous SGD during warm-up, then a local step plus the window
        schedule (land the window due now, launch the one ending now)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(p.grad is None for p in self._ssd_params):
            raise RuntimeError("optimizer.step() was called but no parameter has a gradient: "
                               "call loss.backward() before optimizer.step()")
        if not self._ssd_checked:
            self._ssd_check_ranks()
        t = self._ssd_step
        sched = self._ssd_schedule
        if sched.in_warmup(t):
            if self._should_synchronize:
                if self._synchronized:
                    warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                                  "after optimizer.synchronize(); the gradients are averaged once.")
                else:
                    self.synchronize()
            self._ssd_local_update(averaged=True)
        else:
            if self._ssd_global is None:
                self._ssd_enter_delay_stage()
            self._ssd_local_update(averaged=False)
            self._ssd_poll()
            if sched.lands_at(t):
                self._ssd_land(elapsed=sched.delay)
            if sched.launches_at(t):
                self._ssd_launch(t)
                if sched.delay == 0:
                    self._ssd_land(elapsed=0)
        self._synchronized = False
        for p in self._ssd_backward_passes:
            self._ssd_backward_passes[p] = 0
        self._ssd_step += 1
        self.ssd_stats.steps = self._ssd_step
        return loss

    def _ssd_local_update(self, averaged: bool) -> None:
        grads = [p.grad for p in self._ssd_params if p.grad is not None]
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler (see _step_supports_amp_scaling)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None:
            if averaged and grad_scale is not None and not self._ssd_warned_scaler:
                warnings.warn("GradScaler.step() during warm-up without optimizer.synchronize() and "
                              "scaler.unscale_(optimizer) first: each rank's scaler then sees only its own "
                              "overflows and the loss scales can drift apart; use Horovod's pattern "
                              "(synchronize, unscale_, then scaler.step inside skip_synchronize())")
                self._ssd_warned_scaler = True
            if averaged:  # decide on the averaged gradients, identical on every rank
                skip = not all(bool(torch.isfinite(g).all()) for g in grads)
            else:
                skip = bool(found_inf.item())
            if skip:
                return
            if grad_scale is not None:
                with torch.no_grad():
                    torch._foreach_mul_(grads, 1.0 / float(grad_scale))
            # hide them from a wrapped optimizer that would read them itself (fused Adam): done here
            hidden = {"grad_scale": grad_scale, "found_inf": found_inf}
            self.grad_scale = self.found_inf = None
        else:
            hidden = {}
        try:
            with record_function("ssd_allreduce.local_step"):
                self._ssd_base.step(self)
        finally:
            for name, value in hidden.items():
                setattr(self, name, value)

    def _ssd_local_tensors(self) -> list[Tensor]:
        return self._ssd_params + self._ssd_buffers

    def _ssd_check_ranks(self) -> None:
        """Fail at the first step, on every rank, if ranks disagree on the model or the schedule."""
        sched = self._ssd_schedule
        mine = {
            "config": (sched.sync_every, sched.delay, sched.warmup_steps, self._ssd_glu_beta,
                       self._ssd_compensation, self._ssd_nonfinite, self._ssd_compression.__name__
                       if isinstance(self._ssd_compression, type) else type(self._ssd_compression).__name__),
            "tensors": [(n, tuple(t.shape), str(t.dtype)) for n, t in zip(
                self._ssd_param_names + self._ssd_buffer_names, self._ssd_local_tensors())],
        }
        everyone = self._ssd_comm.allgather_object(mine)
        ref = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs["config"] != ref["config"]:
                raise ValueError(f"rank {rank} runs SSD-SGD with (sync_every, delay, warmup_steps, "
                                 f"glu_beta, compensation, nonfinite, compression) = {theirs['config']}, rank 0 with "
                                 f"{ref['config']}: pass the same settings on every rank")
            a, b = ref["tensors"], theirs["tensors"]
            for i in range(max(len(a), len(b))):
                x = a[i] if i < len(a) else None
                y = b[i] if i < len(b) else None
                if x != y:
                    raise ValueError(f"rank {rank}'s model differs from rank 0's at tensor #{i}: "
                                     f"rank 0 has {x}, rank {rank} has {y} (name, shape, dtype); "
                                     "every rank must build the same model")
        self._ssd_checked = True

    def _ssd_allocate(self) -> None:
        local = self._ssd_local_tensors()
        self._ssd_global = FlatSpace(local)
        self._ssd_snapshot = FlatSpace(local)
        self._ssd_delta = FlatSpace(local)

    def _ssd_enter_delay_stage(self) -> None:
        """End of warm-up: W = rank 0's weights, bit-identical everywhere, and w = W."""
        self._ssd_allocate()
        local = self._ssd_local_tensors()
        self._ssd_global.copy_from_(local)
        self._ssd_comm.broadcast_(self._ssd_global.buffers, root_rank=0, name="ssd.global_weights")
        with torch.no_grad():
            torch._foreach_copy_(local, self._ssd_global.views)

    def _ssd_launch(self, step: int) -> None:
        with record_function("ssd_allreduce.launch"):
            launch_window(self._ssd_local_tensors(), self._ssd_global, self._ssd_snapshot, self._ssd_delta)
            wire, contexts = self._ssd_compress(self._ssd_delta.buffers)
            handle = self._ssd_comm.allreduce_async_(wire, name="ssd.delta", op=ReduceOp.AVERAGE)
            self._ssd_window = _Window(step, handle, wire, contexts)
            self.ssd_stats.windows_launched += 1
            self.ssd_stats.bytes_allreduced += payload_bytes(wire)

    def _ssd_poll(self) -> None:
        window = self._ssd_window
        if window is not None and window.handle is not None:
            if not self._ssd_comm.poll(window.handle):
                self.ssd_stats.polls_pending += 1

    def _ssd_wait(self) -> None:
        window = self._ssd_window
        if window is None or window.handle is None:
            return
        with record_function("ssd_allreduce.wait"):
            t0 = time.perf_counter()
            self._ssd_comm.synchronize(window.handle)
            self._ssd_decompress_into(self._ssd_delta.buffers, window.wire, window.contexts)
            window.handle, window.wire = None, []
            self.ssd_stats.comm_wait_seconds += time.perf_counter() - t0

    def _ssd_land(self, elapsed: int) -> None:
        window = self._ssd_window
        if window is None:
            return
        self._ssd_wait()
        with record_function("ssd_allreduce.land"):
            self._ssd_window = None
            if not self._ssd_delta.is_finite():
                message = (f"the averaged model delta of the window launched at step "
                           f"{window.launched_at} is not finite (NaN or Inf on some rank)")
                if self._ssd_nonfinite == "raise":
                    raise FloatingPointError(
                        message + ": lower the learning rate or clip gradients, or pass "
                        "nonfinite='skip' to skip such windows; the global weights were not updated")
                warnings.warn(message + "; window skipped, global weights unchanged")
                self.ssd_stats.windows_skipped += 1
                return
            n = len(self._ssd_params)
            local = self._ssd_local_tensors()
            apply_global_update_(self._ssd_global, self._ssd_delta)
            compensate_local_(local[:n], local[n:], self._ssd_global, self._ssd_snapshot,
                              self._ssd_delta, glu_beta=self._ssd_glu_beta, elapsed=elapsed,
                              sync_every=self._ssd_schedule.sync_every,
                              compensation=self._ssd_compensation)
            self.ssd_stats.windows_landed += 1

    def finish(self) -> None:
        """Land the window in flight now (all ranks together: end of training, or before an
        evaluation that should see the latest global progress)."""
        window = self._ssd_window
        if window is not None:
            self._ssd_land(elapsed=self._ssd_step - 1 - window.launched_at)

    @property
    def global_weights(self) -> Optional[list[Tensor]]:
        """W, shaped like the parameters then the buffers (None during warm-up)."""
        return None if self._ssd_global is None else self._ssd_global.views

    @property
    def extra_state_bytes(self) -> int:
        """Memory SSD-SGD holds beyond the wrapped optimizer: W, the snapshot and the in-flight
        buffer (zero during warm-up, three copies of the parameters and buffers after it)."""
        spaces = (self._ssd_global, self._ssd_snapshot, self._ssd_delta)
        return sum(space.nbytes for space in spaces if space is not None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus all SSD-SGD state under ``"ssd_sgd"``. A window in
        flight is waited for (not landed), so a resumed run lands it at the same step."""
        state = self._ssd_base.state_dict(self)
        self._ssd_wait()
        sched = self._ssd_schedule
        window = self._ssd_window
        state[STATE_KEY] = {
            "version": STATE_VERSION,
            "step": self._ssd_step,
            "schedule": {"sync_every": sched.sync_every, "delay": sched.delay,
                         "warmup_steps": sched.warmup_steps},
            "glu_beta": self._ssd_glu_beta,
            "compensation": self._ssd_compensation,
            "names": self._ssd_param_names + self._ssd_buffer_names,
            "global_weights": None if self._ssd_global is None else list(self._ssd_global.buffers),
            "window": None if window is None else {
                "launched_at": window.launched_at,
                "snapshot": list(self._ssd_snapshot.buffers),
                "delta": list(self._ssd_delta.buffers)},
            "stats": self.ssd_stats.as_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` saved; a plain optimizer state starts SSD-SGD at step 0."""
        if self._ssd_window is not None and self._ssd_window.handle is not None:
            raise RuntimeError("load_state_dict() while a window is in flight: call finish() first")
        state_dict = dict(state_dict)
        ssd = state_dict.pop(STATE_KEY, None)
        self._ssd_base.load_state_dict(self, state_dict)
        self._synchronized = False
        self._ssd_global = self._ssd_snapshot = self._ssd_delta = self._ssd_window = None
        if ssd is None:
            logger.warning("optimizer state has no SSD-SGD part: starting at step 0 (warm-up)")
            self._ssd_step, self.ssd_stats = 0, SSDStats()
            return
        if ssd.get("version") != STATE_VERSION:
            raise ValueError(f"SSD-SGD state version {ssd.get('version')!r} is not {STATE_VERSION}: it was "
                             "written by another ssd_allreduce release; resume with that release or start anew")
        names = self._ssd_param_names + self._ssd_buffer_names
        if ssd["names"] != names:
            first = next(i for i in range(max(len(names), len(ssd["names"])))
                         if i >= len(names) or i >= len(ssd["names"]) or names[i] != ssd["names"][i])
            raise ValueError(f"the checkpoint's model differs from this one at tensor #{first} "
                             f"({ssd['names'][first] if first < len(ssd['names']) else None!r} vs "
                             f"{names[first] if first < len(names) else None!r}): load it into the same model")
        sched = self._ssd_schedule
        mine = {"sync_every": sched.sync_every, "delay": sched.delay, "warmup_steps": sched.warmup_steps,
                "glu_beta": self._ssd_glu_beta, "compensation": self._ssd_compensation}
        theirs = dict(ssd["schedule"], glu_beta=ssd["glu_beta"], compensation=ssd["compensation"])
        if theirs != mine:
            raise ValueError(f"the checkpoint was written with {theirs}, this optimizer has "
                             f"{mine}: build the optimizer with the checkpoint's settings to resume")
        self._ssd_step = int(ssd["step"])
        self.ssd_stats = SSDStats(**ssd["stats"])
        if ssd["global_weights"] is not None:
            self._ssd_allocate()
            _copy_buffers(self._ssd_global.buffers, ssd["global_weights"], "global_weights")
        if ssd["window"] is not None:
            _copy_buffers(self._ssd_snapshot.buffers, ssd["window"]["snapshot"], "snapshot")
            _copy_buffers(self._ssd_delta.buffers, ssd["window"]["delta"], "delta")
            self._ssd_window = _Window(int(ssd["window"]["launched_at"]), None, [], [])

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an SSD-SGD optimizer is saved with optimizer.state_dict(), which carries "
                        "the global weights and the window in flight; pickling the optimizer "
                        "object itself is not supported")


def _copy_buffers(dst: list[Tensor], src: Sequence[Tensor], what: str) -> None:
    if len(dst) != len(src) or any(d.shape != s.shape for d, s in zip(dst, src)):
        raise ValueError(f"the checkpoint's {what} do not match this model's tensors (same names, other "
                         "shapes or dtypes): load it into the same model built the same way")
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)
