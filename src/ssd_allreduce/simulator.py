"""N SSD-SGD workers in one process: the oracle of the multi-rank tests and the engine of
convergence studies at scale (``python -m ssd_allreduce.bench convergence``).

It drives the same clock and the same functions of ``algorithm`` as the real optimizer, with exact
means in place of allreduces, so a multi-rank run must match it to float tolerance.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .algorithm import (apply_global_update_, carry_moments_, compensate_local_, correct_drift_, estimate_drift_,
                        launch_window, local_lr_scale_for, outer_step_, scaled_lr)
from .delay.clock import WindowClock
from .moments import OptimizerMoments, check_averageable
from .noise import GradientNoise
from .settings import SSDSettings
from .warmup_end import WarmupEnd
from .tensors import FlatSpace, model_tensors

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Simulator:
    """``num_workers`` copies of ``model`` (identical start, like a broadcast), each with its own
    optimizer from ``make_optimizer``, trained with SSD-SGD's schedule and landing; ``options``
    are further ``SSDSettings`` (``outer_lr``, ``outer_momentum``, ...). With ``ranks_per_node``,
    hierarchical SSD-SGD: consecutive workers form nodes whose gradients are averaged every step,
    and the windows average the nodes' deltas (one node: synchronous SGD). ``warmup_steps="auto"``
    ends the warm-up where the gradient noise reaches the workers (``warmup_end``); with it, or
    with ``read_noise``, ``noise`` reads the gradient noise of the synchronous steps."""

    def __init__(self, model: nn.Module,
                 make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 num_workers: int, *, sync_every: int, delay: int, warmup_steps: Union[int, str],
                 glu_beta: Union[float, str], compensation: str = "glu", ranks_per_node: Optional[int] = None,
                 read_noise: bool = False, **options: Any) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if ranks_per_node is not None and (ranks_per_node < 1 or num_workers % ranks_per_node):
            raise ValueError(f"ranks_per_node must divide num_workers ({num_workers}), got {ranks_per_node}")
        every = list(range(num_workers))
        self.nodes = [every] if ranks_per_node is None else [
            every[i:i + ranks_per_node] for i in range(0, num_workers, ranks_per_node)]
        self.hierarchical = ranks_per_node is not None
        self.settings = SSDSettings(sync_every=sync_every, delay=delay, warmup_steps=warmup_steps,
                                    glu_beta=glu_beta, compensation=compensation, **options)
        if self.settings.auto:
            raise ValueError("the simulator runs a fixed window (it measures no time): give sync_every and delay "
                             "as integers, e.g. the (k, d) that sync_every='auto' chose on the ranks")
        self.models = [copy.deepcopy(model) for _ in range(num_workers)]
        self.optimizers = [make_optimizer(m.parameters()) for m in self.models]
        self.tensors = [model_tensors(m) for m in self.models]
        if self.settings.average_moments:
            check_averageable(self.optimizers[0])
        self.moments = ([OptimizerMoments(o, p) for o, (p, _) in zip(self.optimizers, self.tensors)]
                        if self.settings.average_moments else [])
        window_ranks = len(self.nodes) if self.hierarchical else num_workers
        self.local_lr_scale = (local_lr_scale_for(self.optimizers[0], window_ranks)
                               if self.settings.local_lr_scale == "auto" else self.settings.local_lr_scale)
        self.step_index = 0
        self.warmup = WarmupEnd(self.settings.warmup_steps)
        self._reads_noise = (read_noise or self.warmup.auto) and num_workers > 1
        self.clock: Optional[WindowClock] = None
        self.global_: Optional[FlatSpace] = None
        self.delta: Optional[FlatSpace] = None
        self.momentum: Optional[FlatSpace] = None
        self.snapshots: list[FlatSpace] = []
        self.corrections: list[FlatSpace] = []   # each worker's drift correction, where kept
        self.corrections_before: list[FlatSpace] = []   # the ones the last landing replaced
        self._own_delta: Optional[FlatSpace] = None
        self.launched_at: Optional[int] = None
        self.windows_landed = 0

    @property
    def noise(self) -> Optional[GradientNoise]:
        """The warm-up's gradient noise where read (the "auto" warm-up's rule reads it; otherwise
        nothing depends on it)."""
        return self.warmup.noise if self._reads_noise else None

    @property
    def num_workers(self) -> int:
        return len(self.models)

    def _local(self, i: int) -> list[Tensor]:
        params, buffers = self.tensors[i]
        return params + buffers + (self.moments[i].tensors() if self.moments else [])

    def step(self, batches: Sequence[Batch], loss_fn: LossFn) -> list[float]:
        """One step of every worker on its own batch; returns the workers' losses."""
        if len(batches) != self.num_workers:
            raise ValueError(f"need one batch per worker ({self.num_workers}), got {len(batches)}")
        losses = []
        for model, opt, (x, y) in zip(self.models, self.optimizers, batches):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            losses.append(float(loss.detach()))
        t = self.step_index
        warmup = self.warmup.covers(t)
        windows = not warmup and (not self.hierarchical or len(self.nodes) > 1)
        if windows and self.global_ is None:
            self._enter_delay_stage(t)
        if warmup:
            norms = self._average_gradients([list(range(self.num_workers))], self.noise is not None)
            self.warmup.observe(t, self.num_workers, norms)
        elif self.hierarchical:
            self._average_gradients(self.nodes)
        scale = self.local_lr_scale if windows else 1.0
        for opt in self.optimizers:
            with scaled_lr(opt.param_groups, scale):
                opt.step()
        if windows:
            for params, c in zip((p for p, _ in self.tensors), self.corrections):
                correct_drift_(params, c.views[:len(params)])
            clock = self.clock
            if self.launched_at is not None and t == self.launched_at + clock.delay:
                self._land(clock.delay)
            if clock.launches_at(t):
                self._launch(t)
                clock.advance()
                if clock.delay == 0:
                    self._land(0)
        self.step_index += 1
        return losses

    def finish(self) -> None:
        """Land the window in flight now, as ``DistributedOptimizer.finish()`` does."""
        if self.launched_at is not None:
            self._land(self.step_index - 1 - self.launched_at)

    def _average_gradients(self, groups: list[list[int]], read_norms: bool = False) -> Optional[tuple[float, float]]:
        """The mean gradient of every trainable parameter over each group of workers (zeros
        where a worker has none); with ``read_norms`` (one group of every worker) returns the
        workers' mean of their own squared norms and the mean's squared norm."""
        assert not read_norms or len(groups) == 1, "the noise is read over one group of every worker"
        grads = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                 for params, _ in self.tensors]
        local_sq = mean_sq = 0.0
        with torch.no_grad():
            for j in range(len(grads[0])):
                if not self.tensors[0][0][j].requires_grad:
                    continue
                for group in groups:
                    stacked = torch.stack([grads[i][j] for i in group])
                    mean = stacked.sum(0) / len(group)
                    if read_norms:
                        local_sq += float(stacked.double().square().sum()) / len(group)
                        mean_sq += float(mean.double().square().sum())
                    for i in group:
                        self.tensors[i][0][j].grad = mean.clone()
        return (local_sq, mean_sq) if read_norms else None

    def _enter_delay_stage(self, step: int) -> None:
        for moments in self.moments:
            moments.fix()
        local0 = self._local(0)
        self.global_ = FlatSpace(local0)
        self.global_.copy_from_(local0)
        self.delta = FlatSpace(local0)
        self.momentum = FlatSpace(local0) if self.settings.outer_momentum else None
        self.snapshots = [FlatSpace(local0) for _ in self.models]
        self._own_delta = FlatSpace(local0)
        self.corrections = [FlatSpace(local0) for _ in self.models] if self.settings.drift_correction else []
        self.corrections_before = [FlatSpace(local0) for _ in self.corrections]
        self.clock = WindowClock.starting(self.settings.sync_every, self.settings.delay, step)
        with torch.no_grad():
            for i in range(self.num_workers):
                torch._foreach_copy_(self._local(i), self.global_.views)

    def _launch(self, t: int) -> None:
        assert self.global_ is not None and self.delta is not None and self._own_delta is not None
        own = self._own_delta
        total = [torch.zeros_like(b) for b in self.delta.buffers]
        # hierarchical too: a node's workers share their parameters, and its buffers (running
        # statistics, their own per worker) are averaged inside the node first: the mean over nodes
        # of the nodes' deltas is the mean over workers
        for i in range(self.num_workers):
            launch_window(self._local(i), self.global_, self.snapshots[i], own)
            for acc, d in zip(total, own.buffers):
                acc.add_(d)
        for d, acc in zip(self.delta.buffers, total):
            d.copy_(acc / self.num_workers)
        self.launched_at = t

    def _land(self, elapsed: int) -> None:
        if self.launched_at is None:
            return
        assert self.global_ is not None and self.delta is not None
        s = self.settings
        n = len(self.tensors[0][0])
        for i, (c, before) in enumerate(zip(self.corrections, self.corrections_before)):
            estimate_drift_(c.leading(n), before.leading(n), self.delta.leading(n), self.snapshots[i].leading(n),
                            self.global_.leading(n), s.sync_every, self.clock.delay)
        outer_step_(self.delta.leading(n), None if self.momentum is None else self.momentum.leading(n),
                    lr=s.outer_lr, mu=s.outer_momentum, nesterov=s.outer_nesterov)
        apply_global_update_(self.global_, self.delta)
        for i, (params, buffers) in enumerate(self.tensors):
            if self.moments:
                m = len(params) + len(buffers)
                carry_moments_(self.moments[i].tensors(), self.moments[i].floors(elapsed), self.global_.views[m:],
                               self.snapshots[i].views[m:])
            compensate_local_(params, buffers, self.global_, self.snapshots[i], self.delta,
                              glu_beta=s.beta_for(elapsed), elapsed=elapsed, sync_every=s.sync_every,
                              compensation=s.compensation)
        self.launched_at = None
        self.windows_landed += 1

    def global_model(self) -> nn.Module:
        """A copy of the model holding ``W`` (worker 0's weights during warm-up)."""
        model = copy.deepcopy(self.models[0])
        if self.global_ is not None:
            params, buffers = model_tensors(model)
            with torch.no_grad():
                torch._foreach_copy_(params + buffers, self.global_.views[:len(params) + len(buffers)])
        return model
