"""The drop-in optimizer: SSD-SGD behind the API of ``horovod.torch.DistributedOptimizer``.

Example::

    import horovod.torch as hvd
    import ssd_allreduce

    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9, weight_decay=1e-4)
    opt = ssd_allreduce.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(),
        sync_every=5, warmup_steps=500)   # delay="auto": the fewest steps that hide the allreduce
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.finish()   # land the window still in flight (also done at interpreter exit)

This module is the Horovod-compatible shell (arguments, ``synchronize``/``skip_synchronize``,
``backward_passes_per_step``, AMP, checkpoints); the warm-up's gradient averaging is
``warmup.GradientAverager`` and the delay stage is ``delay.DelayStage``.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import warnings
import weakref
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from .comm import Communicator, ReduceOp, make_communicator
from .compression import Compression, compression_name
from .delay import DelayStage
from .algorithm import local_lr_scale_for
from .moments import OptimizerMoments, check_averageable
from .settings import AUTO, DEFAULT_GLU_BETA, DEFAULT_LOCAL_LR_SCALE, SSDSettings
from .stats import SSDStats
from .topology import Hierarchy, resolve_hierarchy
from .warmup import GradientAverager, Groups
from .warmup_end import WarmupEnd
from .agreement import RankAgreement
from .amp import ScaledLocalStep
from .protocol import HorovodProtocol
from .saved_state import SavedState

logger = logging.getLogger(__name__)

NO_GRADIENTS = ("optimizer.step() was called but no parameter has a gradient: call loss.backward() "
                "before optimizer.step()")
_live_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
# Two optimizers of one process (a GAN, multi-task) must not share collective names: Horovod
# refuses a name still in flight. Ranks build their optimizers in the same order, so a count of
# them (per job a process is in) names each the same everywhere (the first step's check compares).
_optimizers_built: dict[Any, "itertools.count[int]"] = {}

__all__ = ["DEFAULT_GLU_BETA", "DistributedOptimizer", "SSDStats", "finish"]


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[tuple[str, Tensor]]] = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = ReduceOp.AVERAGE,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Groups = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
    *,
    sync_every: Union[int, str] = 5,
    delay: Optional[Union[int, str]] = None,
    warmup_steps: Union[int, str] = SSDSettings.warmup_steps,   # settings.DEFAULT_WARMUP_STEPS
    glu_beta: Union[float, str] = DEFAULT_GLU_BETA,
    compensation: str = "glu",
    named_buffers: Optional[Iterable[tuple[str, Tensor]]] = None,
    backend: Union[str, Communicator] = "horovod",
    nonfinite: str = "raise",
    max_skipped_windows: int = 3,
    max_sync_every: int = 16,
    local_sync: Optional[bool] = None,
    outer_lr: float = 1.0,
    outer_momentum: float = 0.0,
    outer_nesterov: bool = True,
    local_lr_scale: Union[float, str] = DEFAULT_LOCAL_LR_SCALE,
    drift_correction: bool = False,
    average_moments: bool = False,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` (in place) so it trains with SSD-SGD; returns the same object, still an
    instance of its class.

    The first block of arguments means what it means for ``hvd.DistributedOptimizer``; they
    govern the warm-up's gradient allreduce (``gradient_predivide_factor``, ``groups``,
    ``sparse_as_dense``), and ``compression`` also applies to the model-delta allreduce. ``op``
    must be Average: SSD-SGD averages (Sum and Adasum raise, naming the alternative). SSD-SGD's own knobs:

    - ``sync_every`` (k): a window of k local steps ends with a non-blocking allreduce of the
      model delta; ``delay`` (d): local steps it overlaps before it lands, by default "auto" (the
      fewest that hide the allreduce; k where the warm-up is too short to time, or k = 1);
      ``sync_every="auto"`` chooses both from the step and allreduce times measured in the
      warm-up (the smallest k, at most ``max_sync_every``, whose steps hide the allreduce and its
      own cost, and d the fewest steps that hide the allreduce); "auto" re-checks its choice every
      20 windows;
    - ``warmup_steps``: steps of exact synchronous SGD first; "auto": until the ranks' gradient
      noise reaches their number (``warmup_end``; one more gather of two numbers per warm-up
      step, at most ``warmup_end.MAX_AUTO_WARMUP_STEPS``; where the ranks' data differ their
      spread counts as noise and can end it sooner), read back as ``optimizer.warmup_end``;
    - ``glu_beta``: how a landing keeps this rank's own progress (1) versus the global estimate
      (0); ``compensation="overwrite"`` replaces the local weights by the global ones (ablation);
    - ``named_buffers``: floating-point buffers (BatchNorm statistics) averaged with the delta;
    - ``backend``: "horovod", "torch" (torch.distributed) or "mpi" (mpi4py), or a Communicator;
      with ``process_set``, ranks outside the set step alone, as with Horovod;
    - ``nonfinite``: "raise" (default) or "skip" a window whose averaged delta is not finite; a
      skip brings a rank whose weights are not finite back to the global weights (its non-finite
      optimizer state is zeroed), and more than ``max_skipped_windows`` skips in a row raise;
    - ``local_sync``: hierarchical SSD-SGD: after the warm-up, gradients are still averaged every
      step inside each node (the fast link) and the windows run between nodes only (one node:
      synchronous SGD throughout). None (default): on where the job spans several nodes with
      several ranks on each. A rank's node is ``$SSD_NODE``, else its host name;
    - ``outer_lr``, ``outer_momentum``, ``outer_nesterov``: an outer optimizer on each window's
      average (DiLoCo's: ``m = mu m + D``, the global step ``lr (D + mu m)``, Nesterov, or ``lr m``);
      1 and 0 (the default): none; 0.7 and 0.5 with ``sync_every=5, delay=1`` ended lower than
      without it over every run of 600 and 2,000 steps measured, not over 300 (docs/BENCHMARKS.md,
      "Quality": it costs early in the delay stage and gains later);
    - ``local_lr_scale``: the local steps' learning rate after the warm-up, relative to the one
      the optimizer (or its scheduler) sets; "auto": sqrt(ranks) for Adam's family, 1 for SGD
      (``algorithm.local_lr_scale_for`` says why);
    - ``drift_correction``: where the ranks' data differ (shards by class, by source), each local
      step also moves by the last window's average step less this rank's own (SCAFFOLD's
      correction from the window's own average: no extra communication, two more copies of the
      weights); for windows of at most 2 steps (wider ones warn: there it was measured to hurt);
    - ``average_moments``: Adam's family only: its moments travel with the windows and each rank
      lands on their average plus its own change since the launch, so where the ranks' data differ every rank normalises its steps by
      the same statistics (``moments`` says why); triples the window's bytes; compression none or
      bf16; for strongly skewed shards (on mildly skewed ones it was measured to cost).
    """
    if hasattr(optimizer, "_ssd_base"):
        raise ValueError("this optimizer is already wrapped by ssd_allreduce.DistributedOptimizer")
    settings = SSDSettings(sync_every=sync_every, delay=delay, warmup_steps=warmup_steps, glu_beta=glu_beta,
                           compensation=compensation, nonfinite=nonfinite, compression=compression_name(compression),
                           max_skipped_windows=max_skipped_windows, max_sync_every=max_sync_every,
                           outer_lr=outer_lr, outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                           local_lr_scale=local_lr_scale, drift_correction=drift_correction,
                           average_moments=average_moments)
    if average_moments:
        check_averageable(optimizer)
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    _check_op(_resolve_op(op))
    comm = make_communicator(backend, process_set)
    device = next((p.device.type for g in optimizer.param_groups for p in g["params"]), "cpu")
    hierarchy = resolve_hierarchy(local_sync, comm, device)
    if hierarchy is not None:
        settings = dataclasses.replace(settings, local_sync=True)
    if num_groups and groups is None:
        groups = num_groups

    _become_ssd(optimizer)
    name = f"ssd.{next(_optimizers_built.setdefault(comm.job_key, itertools.count()))}"
    optimizer._ssd_setup(named_parameters, named_buffers, comm, settings, compression,
                         backward_passes_per_step, name, hierarchy)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def averager(over: Communicator, counts: str, label: str) -> GradientAverager:
        return GradientAverager(over, params, groups=groups, gradient_predivide_factor=gradient_predivide_factor,
                                compression=compression, sparse_as_dense=sparse_as_dense,
                                stats=optimizer.ssd_stats, name=label, counts=counts)
    optimizer._ssd_averager = averager(comm, "warmup", name)
    # one node (hierarchical) runs no windows: nothing for the warm-up's end to decide
    optimizer._ssd_averager.read_noise = optimizer._ssd_warmup.auto and optimizer._ssd_windows
    # hierarchical: inside the node every step after the warm-up (one node: everyone, no windows)
    optimizer._ssd_node_averager = None if hierarchy is None else averager(hierarchy.node, "node", f"{name}.node")
    optimizer.sparse_as_dense = sparse_as_dense
    return optimizer


def _become_ssd(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer``'s class becomes a direct subclass of its own with SSD-SGD's methods."""
    base = type(optimizer)
    # The methods are copied into a direct subclass of the user's class (not mixed in), so that
    # super(type(opt), opt).step(), which hvd.broadcast_optimizer_state() calls, is the user's step.
    methods = {k: v for part in reversed(_SSDSGDOptimizer.__mro__[:-2]) for k, v in vars(part).items()
               if k not in ("__dict__", "__weakref__")}
    optimizer.__class__ = type(base.__name__, (base,), {**methods, "_ssd_base": base})
    # hvd.broadcast_optimizer_state() initialises an empty optimizer state by calling the wrapped
    # class's own step() when `optimizer.__module__` is Horovod's optimizer module; otherwise it
    # would call our step() and count a training step. Only this instance says so.
    optimizer.__dict__["__module__"] = "horovod.torch.optimizer"
    _rewrap_scheduler_step(optimizer)


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


def _rewrap_scheduler_step(optimizer: torch.optim.Optimizer) -> None:
    """An LR scheduler built before wrapping (legal with Horovod, whose wrapper is a new object)
    replaced this instance's ``step`` by a wrapper of the old class's step, which would bypass
    SSD-SGD: wrap the new class's step the same way instead."""
    patched = optimizer.__dict__.get("step")
    if patched is None:
        return
    if not getattr(patched, "_wrapped_by_lr_sched", False):
        raise ValueError("this optimizer's step() was replaced on the instance before wrapping, so SSD-SGD "
                         "would never run: wrap the optimizer first, then patch its step")
    this = weakref.ref(optimizer)

    def step(*args: Any, **kwargs: Any) -> Any:
        opt = this()
        opt._opt_called = True  # what the scheduler's own wrapper records
        return type(opt).step(opt, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


def _check_op(op: ReduceOp) -> None:
    """SSD-SGD averages: Sum and Adasum have no meaning for its delayed windows."""
    if op is ReduceOp.SUM:
        raise ValueError("op=Sum is not supported: after the warm-up SSD-SGD averages the model delta, "
                         "so summed warm-up gradients would change the effective learning rate N-fold "
                         "at the warm-up's end. Use op=Average (the default) and scale the learning "
                         "rate by the number of ranks, as Horovod's examples do (lr * hvd.size())")
    if op is ReduceOp.ADASUM:
        raise ValueError("op=Adasum is not supported: Adasum combines gradients every step, SSD-SGD "
                         "averages a model delta every k steps. Use op=Average (the default), or keep "
                         "hvd.DistributedOptimizer(op=hvd.Adasum) for Adasum")


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


class _SSDSGDOptimizer(HorovodProtocol, ScaledLocalStep, RankAgreement, SavedState, torch.optim.Optimizer):
    """Methods copied (with its parts') into the class made by ``DistributedOptimizer``, a subclass
    of the user's optimizer class ``self._ssd_base``, whose ``step`` makes the local update."""

    _ssd_base: type
    # GradScaler then always calls step() and tells it about non-finite gradients, so every rank
    # takes part in the window schedule even when its own step is skipped.
    _step_supports_amp_scaling = True

    def _ssd_setup(self, named_parameters: Optional[Iterable[tuple[str, Tensor]]],
                   named_buffers: Optional[Iterable[tuple[str, Tensor]]], comm: Communicator,
                   settings: SSDSettings, compression: Any, backward_passes_per_step: int,
                   name: str, hierarchy: Optional[Hierarchy] = None) -> None:
        self._ssd_order_tensors(named_parameters, named_buffers)
        self._ssd_name = name
        self._ssd_comm = comm
        self._ssd_settings = settings
        self._ssd_hierarchy = hierarchy
        self.backward_passes_per_step = backward_passes_per_step
        self.ssd_stats = SSDStats()
        self._ssd_engine = DelayStage(
            comm, settings, self._ssd_params, self._ssd_buffers, compression, self.ssd_stats, name,
            [f"parameter {n!r}" for n in self._ssd_param_names] + [f"buffer {n!r}" for n in self._ssd_buffer_names],
            hierarchy, OptimizerMoments(self, self._ssd_params) if settings.average_moments else None)
        self._ssd_warmup = WarmupEnd(settings.warmup_steps)
        self._ssd_step = 0
        self._ssd_erred = 0   # ranks that stepped without gradients, from this step's averaging
        self._ssd_checked = False
        self._ssd_warned_scaler = False
        self._synchronized = False
        self._should_synchronize = True
        # per parameter: (step, backward passes in it); a new step restarts the count, so no
        # per-step pass over every parameter resets them
        self._ssd_backward_passes: dict[Tensor, tuple[int, int]] = {}
        this = weakref.ref(self)  # hooks must not keep a discarded optimizer alive

        def count_backward(p: Tensor) -> None:
            opt = this()
            if opt is not None:
                opt._ssd_count_backward(p)

        # As Horovod's: alone (and not elastic) there is nothing to start from backward
        if comm.size > 1 or os.environ.get("HOROVOD_ELASTIC") == "1":
            for p in self._ssd_params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(count_backward)
        _live_optimizers.add(self)
        _register_exit_hook()

    def _ssd_order_tensors(self, named_parameters: Optional[Iterable[tuple[str, Tensor]]],
                           named_buffers: Optional[Iterable[tuple[str, Tensor]]]) -> None:
        """Trainable parameters, then floating-point buffers, each sorted by name: the order every
        rank's flat buffers share."""
        # frozen parameters too: one unfrozen later must join the windows (its delta is 0 till then)
        opt_params = [p for g in self.param_groups for p in g["params"]]
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_ssd_params"):   # torch's own __init__ adds the first groups
            raise ValueError("add_param_group() after wrapping: SSD-SGD keeps global copies of the parameters "
                             "it was built with. Add every parameter group before wrapping; a group that "
                             "should train later can be frozen (requires_grad=False) and unfrozen then")
        self._ssd_base.add_param_group(self, param_group)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One training step: synchronous SGD during warm-up, then a local step plus the window
        schedule (land the window due now, launch the one ending now)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        without_gradients = all(p.grad is None for p in self._ssd_params)
        if without_gradients and (self._ssd_comm.size == 1 or not self._ssd_comm.member):
            raise RuntimeError(NO_GRADIENTS)
        if not self._ssd_comm.member:   # outside the process set: a local step, as with Horovod
            self._ssd_local_update(averaged=False)
            self._ssd_end_step()
            return loss
        if not self._ssd_checked:
            self._ssd_check_ranks()
        t = self._ssd_step
        windows = self._ssd_windows and not self._ssd_warmup.covers(t)
        if windows and not self._ssd_engine.started:
            self._ssd_engine.start(t)
        if self._ssd_averager_at(t) is not None:
            if self._should_synchronize:
                if self._synchronized:
                    warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                                  "after optimizer.synchronize(); the gradients are averaged once.")
                else:
                    self._ssd_synchronize(without_gradients)
            self._ssd_local_update(averaged=True, lr_scale=self._ssd_lr_scale() if windows else 1.0)
            without_gradients = self._ssd_erred > 0   # the node's: the same on all its ranks
        else:
            self._ssd_local_update(averaged=False, lr_scale=self._ssd_lr_scale() if windows else 1.0)
        if windows and self._ssd_engine.after_local_step(t, without_gradients):
            self._ssd_zero_nonfinite_state()
        self._ssd_end_step()
        return loss

    def _ssd_end_step(self) -> None:
        self._ssd_engine.step_done()
        self._synchronized = False
        self._ssd_erred = 0
        self._ssd_step += 1
        self.ssd_stats.steps = self._ssd_step

    def finish(self) -> None:
        """Land the window in flight now (all ranks together: end of training, or before an
        evaluation that should see the latest global progress)."""
        if self._ssd_engine.finish(self._ssd_step):
            self._ssd_zero_nonfinite_state()

    def _ssd_lr_scale(self) -> float:
        """The local steps' learning-rate factor in the delay stage, for the ranks the windows
        average over now (a change of ranks under Horovod elastic changes it on every rank alike)."""
        if self._ssd_settings.local_lr_scale != AUTO:
            return self._ssd_settings.local_lr_scale
        hierarchy = self._ssd_hierarchy
        return local_lr_scale_for(self, hierarchy.cross.size if hierarchy is not None else self._ssd_comm.size)

    def discard_window(self) -> None:
        """Forget the window in flight without waiting for it: its collective failed with a lost
        rank, and the state is about to be restored from the last commit (``SSDState.restore``)."""
        self._ssd_engine.discard_window()

    def membership_changed(self) -> None:
        """After Horovod elastic re-initialised with other ranks: the window in flight is dropped,
        the local weights become ``W`` (the same on every rank: commits land windows) and a drift
        correction starts again from zero, the new
        rank and size are taken, and ranks are compared at the next step, where a rank that
        joined takes rank 0's SSD-SGD state (``SSDState`` calls it)."""
        self.discard_window()
        if self._ssd_engine.started:
            self._ssd_engine.reset_local_to_global()
            self._ssd_engine.state.forget_drift()   # it summed to zero over the ranks that were
        self._ssd_averager.discard()
        self._ssd_comm.refresh()
        self._ssd_checked = False
        self._synchronized = False
        self._ssd_backward_passes.clear()

    def adopt_root_state(self) -> None:
        """Compare ranks now (collective), a rank at the very start taking rank 0's SSD-SGD state,
        and set the local weights to ``W`` (after a change of ranks: ``SSDState.sync``)."""
        self._ssd_check_ranks()
        if self._ssd_engine.started:
            self._ssd_engine.reset_local_to_global()

    @property
    def node_layout(self) -> Optional[str]:
        """The nodes hierarchical SSD-SGD runs over ("2 node(s) x 4 rank(s)"); None when flat."""
        return None if self._ssd_hierarchy is None else self._ssd_hierarchy.layout.describe()

    @property
    def warmup_end(self) -> Optional[int]:
        """The delay stage's first step: ``warmup_steps``, or where an "auto" warm-up ended (None
        while it goes on)."""
        return self._ssd_warmup.end

    @property
    def window_in_flight(self) -> bool:
        """True between a window's launch and its landing."""
        return self._ssd_engine.in_flight

    @property
    def global_weights(self) -> Optional[list[Tensor]]:
        """W, shaped like the parameters then the buffers (None during warm-up)."""
        engine = self._ssd_engine
        return engine.state.global_.views[:len(engine.params) + len(engine.buffers)] if engine.started else None

    @property
    def extra_state_bytes(self) -> int:
        """Memory SSD-SGD holds beyond the wrapped optimizer: zero during the warm-up; after it W,
        the snapshot and the in-flight delta (three copies of the parameters and buffers), plus the
        error-feedback residual of a rounding wire format and the outer momentum where set, and
        the drift correction and the one it replaced (two copies) where it is on; with averaged
        moments every copy also holds Adam's two moments."""
        return self._ssd_engine.state.nbytes


