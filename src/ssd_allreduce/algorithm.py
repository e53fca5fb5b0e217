"""SSD-SGD's math on tensors: the window schedule, the launch snapshot, the GLU landing.

No communication happens here. The optimizer (real ranks) and the simulator (N workers in one
process) both drive these functions, so the algorithm is written once.

Notation (see SPEC): ``w`` local weights, ``W`` global weights of the last landed sync, ``s``
snapshot of ``w`` at launch, ``D`` mean over ranks of ``s - W``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

COMPENSATIONS = ("glu", "overwrite")


@dataclass(frozen=True)
class Schedule:
    """When SSD-SGD averages, launches and lands.

    Steps ``t < warmup_steps`` are synchronous SGD. After that, step ``t`` has window position
    ``j = t - warmup_steps``; a window ends (and its allreduce is launched) when
    ``(j + 1) % sync_every == 0``, and lands ``delay`` steps later.
    """

    sync_every: int = 5
    delay: int = 5
    warmup_steps: int = 500

    def __post_init__(self) -> None:
        if not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        if not isinstance(self.delay, int) or not 0 <= self.delay <= self.sync_every:
            raise ValueError(
                f"delay must be an integer in [0, sync_every={self.sync_every}], got {self.delay!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def launches_at(self, step: int) -> bool:
        """True when a window ends at ``step`` and its allreduce starts."""
        j = step - self.warmup_steps
        return j >= 0 and (j + 1) % self.sync_every == 0

    def lands_at(self, step: int) -> bool:
        """True when the window launched ``delay`` steps earlier lands at ``step`` (before any
        launch at the same step). With ``delay == 0`` a window lands right after its launch,
        which callers handle; this returns False then."""
        return self.delay > 0 and self.launches_at(step - self.delay)


class FlatSpace:
    """Contiguous storage shaped like a list of tensors: one flat buffer per (device, dtype).

    ``buffers`` are what a collective moves in one call; ``views[i]`` aliases the slice that
    mirrors ``like[i]``, so element-wise work on model tensors needs no packing copies.
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(like):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.buffers: list[Tensor] = []
        self.views: list[Tensor] = [torch.empty(0)] * len(like)
        for (device, dtype), members in groups.items():
            flat = torch.zeros(sum(like[i].numel() for i in members), device=device, dtype=dtype)
            offset = 0
            for i in members:
                n = like[i].numel()
                self.views[i] = flat[offset:offset + n].view_as(like[i])
                offset += n
            self.buffers.append(flat)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def copy_from_(self, tensors: Sequence[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.views, list(tensors))

    def all_finite(self) -> Tensor:
        """Every element finite, as a bool tensor on the device (read it when it is needed). One
        reduction pass per buffer: NaN and Inf reach the minimum or the maximum."""
        flags = [torch.isfinite(torch.stack(torch.aminmax(b))).all() for b in self.buffers if b.numel()]
        if not flags:
            return torch.ones((), dtype=torch.bool)
        return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()

    def is_finite(self) -> bool:
        return bool(self.all_finite())

    def zero_unless_finite_(self) -> Tensor:
        """Zero every buffer unless every element is finite, without reading anything on the host;
        returns the device's verdict (``all_finite``)."""
        finite = self.all_finite()
        for b in self.buffers:
            b.masked_fill_(~finite.to(b.device), 0)
        return finite


def launch_window(local: Sequence[Tensor], global_: FlatSpace, snapshot: FlatSpace,
                  delta: FlatSpace) -> None:
    """Window end: ``s = w`` and ``delta = s - W`` (what the allreduce will average)."""
    snapshot.copy_from_(local)
    for s, w_global, d in zip(snapshot.buffers, global_.buffers, delta.buffers):
        torch.sub(s, w_global, out=d)


def apply_global_update_(global_: FlatSpace, delta: FlatSpace) -> None:
    """Landing, shared part: ``W += D`` (the same on every rank)."""
    with torch.no_grad():
        for w_global, d in zip(global_.buffers, delta.buffers):
            w_global.add_(d)


def compensate_local_(local_params: Sequence[Tensor], local_buffers: Sequence[Tensor],
                      global_: FlatSpace, snapshot: FlatSpace, delta: FlatSpace, *,
                      glu_beta: float, elapsed: int, sync_every: int,
                      compensation: str = "glu") -> None:
    """Landing, per-rank part, after ``apply_global_update_``.

    Parameters become ``W + glu_beta * (w - s) + (1 - glu_beta) * elapsed/k * D`` (GLU: keep this
    rank's own progress since the launch and add the estimated progress all ranks made together
    over the ``elapsed`` steps the allreduce was in flight); with ``compensation="overwrite"`` (an
    ablation baseline) they become ``W``. Buffers (BatchNorm running statistics) take ``W``.
    ``local_params`` then ``local_buffers`` are ordered as the flat spaces are. ``snapshot`` is
    used as scratch space (it is dead after a landing).
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
            torch._foreach_copy_(list(local_buffers), global_.views[n:])
