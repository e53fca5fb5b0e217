"""SSD-SGD's math on tensors: the launch snapshot, the outer step on the window's average, and the
GLU landing. When windows launch and land is ``delay.clock``'s.

No communication happens here. The optimizer (real ranks) and the simulator (N workers in one
process) both drive these functions, so the algorithm is written once.

Notation (see SPEC): ``w`` local weights, ``W`` global weights of the last landed sync, ``s``
snapshot of ``w`` at launch, ``D`` mean over ranks of ``s - W``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .moments import is_adaptive
from .tensors import FlatSpace

COMPENSATIONS = ("glu", "overwrite")


def glu_beta_for(delay: int) -> float:
    """GLU's ``beta`` for a window in flight ``delay`` steps (``glu_beta="auto"``): 0.75 up to a
    delay of two steps, falling by 1/8 a step to 0.5 from four steps on. Over a short delay the
    global estimate (beta < 1) enters the next window's delta, so W moves by an average over
    windows that lags the steps: with shuffled shards, beta 0.5 ended 4.5-8 % above synchronous
    training at d = 1-2, 0.75 within 1 %. Keeping more of this rank's own progress lets the ranks'
    weights drift apart, which costs where their data differ (label- or target-skewed shards:
    0.75 at d = 1 lost 5 % where 0.5 lost 2 %, and 1 lost 11 %); over long delays 0.5 is best
    with both kinds of shards (the GLU ablation). Measured in docs/BENCHMARKS.md, "Quality"."""
    return max(0.5, min(0.75, 0.75 - (delay - 2) / 8))


def local_lr_scale_for(optimizer: torch.optim.Optimizer, ranks: int) -> float:
    """The delay stage's learning-rate factor for ``optimizer``'s local steps (``local_lr_scale=
    "auto"``): sqrt(``ranks``) for Adam's family, 1 otherwise. An Adam step is normalised by the
    gradient's own noise: a rank's gradient on its batch is ``ranks`` times noisier than the
    average synchronous training steps on, so where noise dominates, the average of the ranks'
    local steps is sqrt(ranks) shorter than the synchronous step (the square-root rule of Adam's
    batch size). SGD's step is linear in the gradient: its average is the synchronous step
    (larger local rates for SGD are measured in docs/BENCHMARKS.md's ``quality-gpt-*sgd*``
    sections)."""
    return math.sqrt(ranks) if is_adaptive(optimizer) else 1.0


@contextmanager
def scaled_lr(param_groups: Sequence[dict], factor: float) -> Iterator[None]:
    """The groups' learning rates times ``factor`` for the duration (an LR scheduler's own values
    are back afterwards)."""
    if factor == 1.0:
        yield
        return
    saved = [g["lr"] for g in param_groups]
    for g in param_groups:
        g["lr"] = g["lr"] * factor
    try:
        yield
    finally:
        for g, lr in zip(param_groups, saved):
            g["lr"] = lr


def launch_window(local: Sequence[Tensor], global_: FlatSpace, snapshot: FlatSpace,
                  delta: FlatSpace) -> None:
    """Window end: ``s = w`` and ``delta = s - W`` (what the allreduce will average)."""
    snapshot.copy_from_(local)
    for s, w_global, d in zip(snapshot.buffers, global_.buffers, delta.buffers):
        torch.sub(s, w_global, out=d)


def outer_step_(delta: Sequence[Tensor], momentum: Optional[Sequence[Tensor]], *, lr: float,
                mu: float, nesterov: bool = True) -> None:
    """The outer optimizer on the window's average (DiLoCo's, SPEC "Outer optimizer"): ``delta``
    holds ``D`` and becomes the global step ``G``: with ``m = mu * m + D``, ``G = lr * (D + mu * m)``
    (Nesterov) or ``lr * m``. ``lr = 1, mu = 0`` leaves ``D`` as it is (the core algorithm)."""
    with torch.no_grad():
        if mu and momentum is not None:
            torch._foreach_mul_(momentum, mu)
            torch._foreach_add_(momentum, delta)
            if nesterov:
                torch._foreach_add_(delta, momentum, alpha=mu)
            else:
                torch._foreach_copy_(delta, momentum)
        if lr != 1.0:
            torch._foreach_mul_(delta, lr)


def estimate_drift_(correction: Sequence[Tensor], before: Sequence[Tensor], delta: Sequence[Tensor],
                    snapshot: Sequence[Tensor], global_: Sequence[Tensor], sync_every: int, delay: int) -> None:
    """Landing, before ``W`` moves and the outer step: the correction ``c`` becomes
    ``(a + D - (s - W)) / k`` and ``before`` the one it replaces, where ``a`` is what the
    corrections added over the window's ``k`` steps: ``d`` steps of ``before`` and ``k - d`` of
    ``c`` (a landing replaces the correction after its step's local update, ``d`` steps into the
    next window). ``(D - (s - W)) / k`` is the window's average step less this rank's own, its own
    corrections included, so the new ``c`` is the average step less this rank's uncorrected one:
    SCAFFOLD's control variates, read off the window's own average (nothing more is sent; they
    sum to zero over the ranks). Flat parameter parts."""
    with torch.no_grad():
        for c, b, d, s, w in zip(correction, before, delta, snapshot, global_):
            new = torch.sub(s, w).neg_().add_(d)   # D - (s - W): s and W are close, so s - W first
            new.add_(b, alpha=delay).add_(c, alpha=sync_every - delay).div_(sync_every)
            b.copy_(c)
            c.copy_(new)


def correct_drift_(params: Sequence[Tensor], correction: Sequence[Tensor]) -> None:
    """After each local step: ``w += c``, so a rank whose data pull it away from the others'
    moves, on average, as they all do together."""
    with torch.no_grad():
        torch._foreach_add_(list(params), list(correction))


def apply_global_update_(global_: FlatSpace, delta: FlatSpace) -> None:
    """Landing, shared part: ``W += D`` (the same on every rank)."""
    with torch.no_grad():
        for w_global, d in zip(global_.buffers, delta.buffers):
            w_global.add_(d)


def carry_moments_(moments: Sequence[Tensor], floors: Sequence[Optional[float]], global_: Sequence[Tensor],
                   snapshot: Sequence[Tensor]) -> None:
    """Landing, after ``apply_global_update_`` and before ``compensate_local_`` (which spends the
    snapshot), for the optimizer's moments that travel (``moments``): each ``m`` becomes
    ``M + (m - s)``, the ranks' mean at the launch plus this rank's change since (GLU with beta =
    1). A second moment (its ``floors`` entry not None) lands at ``floor * M`` at least: a rank
    whose own was far above the mean has decayed by more than the mean is worth, and a second
    moment near zero would divide Adam's step by nearly nothing."""
    with torch.no_grad():
        moments = list(moments)
        torch._foreach_sub_(moments, list(snapshot))
        torch._foreach_add_(moments, list(global_))
        for m, mean, floor in zip(moments, global_, floors):
            if floor is not None:
                torch.maximum(m, mean * floor, out=m)


def compensate_local_(local_params: Sequence[Tensor], local_buffers: Sequence[Tensor],
                      global_: FlatSpace, snapshot: FlatSpace, delta: FlatSpace, *,
                      glu_beta: float, elapsed: int, sync_every: int,
                      compensation: str = "glu") -> None:
    """Landing, per-rank part, after ``apply_global_update_``.

    Parameters become ``W + glu_beta * (w - s) + (1 - glu_beta) * elapsed/k * D`` (GLU: keep this
    rank's own progress since the launch and add the estimated progress all ranks made together
    over the ``elapsed`` steps the allreduce was in flight); with ``compensation="overwrite"`` (an
    ablation baseline) they become ``W``. Buffers (BatchNorm running statistics) take ``W``.
    ``local_params`` then ``local_buffers`` are ordered as the flat spaces are (moments may follow:
    ``carry_moments_``). ``snapshot`` is used as scratch space (it is dead after a landing).
    """
    n = len(local_params)
    params = list(local_params)
    beta = glu_beta
    with torch.no_grad():
        if params and compensation == "overwrite":
            torch._foreach_copy_(params, global_.views[:n])
        elif params and any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
            # 16-bit weights: the fused target below grows as 1/(1 - beta); the plain formula
            torch._foreach_sub_(params, snapshot.views[:n])
            torch._foreach_mul_(params, beta)
            torch._foreach_add_(params, global_.views[:n])
            if elapsed and beta != 1.0:
                torch._foreach_add_(params, delta.views[:n], alpha=(1.0 - beta) * elapsed / sync_every)
        elif params:
            # Work on the flat buffers is cheap; a pass over the model's own tensors costs a kernel
            # per tensor, so there is one: w' = lerp(w, t, 1 - beta) = beta * w + (1 - beta) * t
            # with t = (W - beta * s + (1 - beta) * elapsed/k * D) / (1 - beta); beta = 1: w' = w + W - s.
            for s, w_global, d in zip(snapshot.buffers, global_.buffers, delta.buffers):
                torch.add(w_global, s, alpha=-beta, out=s)
                if beta == 1.0:
                    continue
                if elapsed:
                    s.add_(d, alpha=(1.0 - beta) * elapsed / sync_every)
                s.div_(1.0 - beta)
            if beta == 1.0:
                torch._foreach_add_(params, snapshot.views[:n])
            else:
                torch._foreach_lerp_(params, snapshot.views[:n], 1.0 - beta)
        if local_buffers:
            torch._foreach_copy_(list(local_buffers), global_.views[n:n + len(local_buffers)])
