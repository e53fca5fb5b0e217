"""SSD-SGD's knobs as one frozen value: validated once, compared across ranks and checkpoints."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from .algorithm import COMPENSATIONS, glu_beta_for

DEFAULT_GLU_BETA = "auto"   # algorithm.glu_beta_for: by the delay
DEFAULT_LOCAL_LR_SCALE = "auto"   # algorithm.local_lr_scale_for: by the optimizer family
NONFINITE_POLICIES = ("raise", "skip")
AUTO = "auto"
MIN_WARMUP_STEPS = 5   # "auto" times this many warm-up steps at least
# Steps of exact synchronous SGD before the delay stage: the paper's authors warmed up for 500
# iterations, about one epoch of their training, so that the fast early changes of the weights,
# which a delayed average would land stale, are averaged every step. The optimizer's and
# SSDSettings' default; the driver's `--warmup-steps epoch` is one epoch, at most this.
DEFAULT_WARMUP_STEPS = 500
# The widest window the drift correction was measured to help SGD at (docs/BENCHMARKS.md, "Drift
# correction"): from k = d = 5 on it lost more than it corrected. With averaged moments (AdamW) it
# helped on skewed shards at every window measured, up to 10 ("Averaged moments").
DRIFT_CORRECTION_MAX_WINDOW = 2
# The largest steady-state outer step, outer_lr / (1 - outer_momentum) times the window's average,
# measured safe with a delayed landing (docs/BENCHMARKS.md, "An outer optimizer"): 1 (0.5/0.5) was
# within noise of no outer optimizer, 1.4 (0.7/0.5) ended up to 34 % above synchronous training at
# k = d = 5, and DiLoCo's 7 (0.7/0.9) diverged at every window measured. With windows of 5 steps
# landing 1 step late (k = 5 measured; the exemption takes k >= 5), 1.4 (0.7/0.5) ended lower than
# without it on every run of the regression's 600 steps and the GPT's 2,000 (scripts/bench.sh
# quality-outer-delay1, quality-gpt-long-sgd-outer, -ranks-sgd-outer, -adamw-outer), though not
# over 300 GPT steps (quality-gpt-outer: it costs early in the delay stage); with windows of 2 it
# ended higher on shuffled shards.
OUTER_STEP_MAX_DELAYED = 1.0
OUTER_STEP_MAX_DELAY_1 = 1.4      # delay=1 with sync_every >= OUTER_STEP_MIN_WINDOW
OUTER_STEP_MIN_WINDOW = 5
# Wire formats that lose Adam's small second moments (fp16 underflows, int8 rounds to its chunk's scale)
LOSSY_FOR_MOMENTS = ("fp16", "int8")


@dataclass(frozen=True)
class SSDSettings:
    """What every rank and every resume must agree on.

    ``delay`` defaults to ``"auto"``: the fewest steps that hide the window's allreduce, timed in
    the warm-up (the quality study: the gap to synchronous training grows with the delay), or to
    ``sync_every`` where the warm-up is too short to time (under ``MIN_WARMUP_STEPS``) or k = 1;
    ``sync_every`` may be ``"auto"`` too (at most ``max_sync_every``; see ``delay.tuner``);
    ``compression`` is the name of the wire format; ``max_skipped_windows``: with
    ``nonfinite="skip"``, how many windows in a row may be skipped before training stops;
    ``local_sync``: hierarchical SSD-SGD (gradients averaged inside each node every step, the
    windows between nodes), as resolved for this job;
    ``outer_lr``, ``outer_momentum``, ``outer_nesterov``: the outer optimizer on each window's
    average (1, 0: none, the core algorithm); ``glu_beta="auto"``: chosen by the window's delay
    (``algorithm.glu_beta_for``); ``local_lr_scale``: the local steps' learning rate in the
    delay stage, relative to the user's ("auto": ``algorithm.local_lr_scale_for``);
    ``drift_correction``: each local step also moves by the last window's difference between the
    average step and this rank's own (``algorithm.estimate_drift_``; for shards whose data differ);
    ``average_moments``: Adam's moments travel with the windows (``moments``).
    """

    sync_every: Union[int, str] = 5
    delay: Optional[Union[int, str]] = None
    warmup_steps: Union[int, str] = DEFAULT_WARMUP_STEPS
    glu_beta: Union[float, str] = DEFAULT_GLU_BETA
    compensation: str = "glu"
    nonfinite: str = "raise"
    compression: str = "none"
    max_skipped_windows: int = 3
    max_sync_every: int = 16
    local_sync: bool = False
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    outer_nesterov: bool = True
    local_lr_scale: Union[float, str] = DEFAULT_LOCAL_LR_SCALE
    drift_correction: bool = False
    average_moments: bool = False

    def __post_init__(self) -> None:
        for name in ("sync_every", "delay"):
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise ValueError(f"{name} must be an integer or 'auto', got {value!r}")
        if self.sync_every == AUTO and self.delay not in (None, AUTO):
            raise ValueError(f"with sync_every='auto' the delay is chosen with it (the fewest steps that hide the "
                             f"allreduce): leave delay out, got delay={self.delay!r}")
        if self.delay is None:
            # k = 1 leaves "auto" no choice but d = 1; a warm-up under MIN_WARMUP_STEPS, nothing to time
            timed = self.warmup_steps == AUTO or (_is_int(self.warmup_steps) and self.warmup_steps >= MIN_WARMUP_STEPS)
            object.__setattr__(self, "delay", AUTO if timed and self.sync_every != 1 else self.sync_every)
        if not _is_int(self.max_sync_every) or self.max_sync_every < 1:
            raise ValueError(f"max_sync_every must be an integer >= 1, got {self.max_sync_every!r}")
        widest = self.max_sync_every if self.sync_every == AUTO else self.sync_every
        if not _is_int(widest) or widest < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        if self.delay != AUTO and (not _is_int(self.delay) or not 0 <= self.delay <= widest):
            raise ValueError(f"delay must be an integer in [0, sync_every={widest}], got {self.delay!r}")
        if self.warmup_steps != AUTO and (not _is_int(self.warmup_steps) or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0 or 'auto' (until the gradient noise reaches "
                             f"the ranks), got {self.warmup_steps!r}")
        # an "auto" warm-up lasts noise.MIN_STEPS (10) steps at least
        if self.auto and self.warmup_steps != AUTO and self.warmup_steps < MIN_WARMUP_STEPS:
            raise ValueError(f"sync_every='auto' and delay='auto' time the warm-up's steps: warmup_steps must "
                             f"be >= {MIN_WARMUP_STEPS}, got {self.warmup_steps}")
        beta = self.glu_beta
        if beta != AUTO:
            if not _is_number(beta) or not 0 <= beta <= 1:
                raise ValueError(f"glu_beta must be a number in [0, 1], got {beta!r}, or 'auto' (chosen by the delay)")
            object.__setattr__(self, "glu_beta", float(beta))
        scale = self.local_lr_scale
        if scale != AUTO:
            if not _is_number(scale) or scale <= 0:
                raise ValueError(f"local_lr_scale must be a number > 0, got {scale!r}, or 'auto' (by the optimizer)")
            object.__setattr__(self, "local_lr_scale", float(scale))
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if not _is_int(self.max_skipped_windows) or self.max_skipped_windows < 1:
            raise ValueError(f"max_skipped_windows must be an integer >= 1, got {self.max_skipped_windows!r}")
        if not _is_number(self.outer_lr) or self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be a number > 0, got {self.outer_lr!r}")
        if not _is_number(self.outer_momentum) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be a number in [0, 1), got {self.outer_momentum!r}")
        object.__setattr__(self, "outer_lr", float(self.outer_lr))
        object.__setattr__(self, "outer_momentum", float(self.outer_momentum))
        for name in ("outer_nesterov", "drift_correction", "average_moments"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.average_moments and self.warmup_steps == 0:
            raise ValueError("average_moments carries the optimizer's moments, which exist after its first step: "
                             f"warmup_steps must be >= 1, got {self.warmup_steps}")
        wire = self.compression.removesuffix("Compressor").lower()   # "fp16" or the class's name
        if self.average_moments and wire in LOSSY_FOR_MOMENTS:
            raise ValueError(f"average_moments with compression {wire}: Adam's second moments (squared gradients, "
                             "often below 1e-8) round to zero there, and a zero divides the step. Use compression "
                             "none or bf16")
        self._warn_where_measured_harmful(widest)

    def _warn_where_measured_harmful(self, widest: int) -> None:
        """Options that the library accepts but the quality study measured to hurt (docs/BENCHMARKS.md)."""
        outer_step = self.outer_lr / (1 - self.outer_momentum)
        measured = self.delay == 1 and _is_int(self.sync_every) and self.sync_every >= OUTER_STEP_MIN_WINDOW
        largest = OUTER_STEP_MAX_DELAY_1 if measured else OUTER_STEP_MAX_DELAYED
        if outer_step > largest + 1e-9 and self.delay != 0:
            warnings.warn(f"outer_lr={self.outer_lr:g} with outer_momentum={self.outer_momentum:g} takes "
                          f"{outer_step:.2g}x each window's average in steady state; with sync_every="
                          f"{self.sync_every!r} and delay={self.delay!r} it was measured safe up to {largest:g}x: "
                          "1.4x ended up to 34 % above synchronous training at delay=5 and DiLoCo's 0.7 and 0.9 "
                          "diverged, while 0.7 and 0.5 (1.4x) with sync_every=5 and delay=1 ended lower than "
                          "without it over every 600- and 2,000-step run measured (not over 300 steps). Lower "
                          f"outer_lr or outer_momentum, or use delay=1 with sync_every >= {OUTER_STEP_MIN_WINDOW} "
                          f"(up to {OUTER_STEP_MAX_DELAY_1:g}x) or delay=0", stacklevel=4)
        if self.drift_correction and widest > DRIFT_CORRECTION_MAX_WINDOW and not self.average_moments:
            warnings.warn(f"drift_correction with windows of up to {widest} steps: with SGD it was measured to help "
                          f"up to {DRIFT_CORRECTION_MAX_WINDOW} (sync_every, or max_sync_every with 'auto'); at 5 and "
                          "10 it ended 10-290 % above synchronous training on skewed shards, worse than without it "
                          "(with AdamW and average_moments it helped up to 10)", stacklevel=4)

    @property
    def auto(self) -> bool:
        """The window (k or d) is chosen from measured times."""
        return AUTO in (self.sync_every, self.delay)

    def beta_for(self, delay: int) -> float:
        """GLU's beta for a window that landed ``delay`` steps after its launch."""
        return glu_beta_for(delay) if self.glu_beta == AUTO else self.glu_beta

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SSDSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SSD-SGD settings {unknown}: written by another ssd_allreduce release")
        return cls(**values)

    def differences(self, other: "SSDSettings") -> list[str]:
        """``"name: mine vs theirs"`` for every setting that differs."""
        mine, theirs = self.as_dict(), other.as_dict()
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
