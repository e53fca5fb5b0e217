"""SSD-SGD's knobs as one frozen value: validated once, compared across ranks and checkpoints."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Optional, Union

from .algorithm import COMPENSATIONS, Schedule
from .autotune import MIN_WARMUP_STEPS

DEFAULT_GLU_BETA = 0.5
NONFINITE_POLICIES = ("raise", "skip")
AUTO = "auto"


@dataclass(frozen=True)
class SSDSettings:
    """What every rank and every resume must agree on.

    ``delay`` defaults to ``sync_every``; either may be ``"auto"`` (chosen from measured times,
    ``sync_every`` at most ``max_sync_every``; see ``autotune``); ``compression`` is the name of
    the wire format; ``max_skipped_windows``: with ``nonfinite="skip"``, how many windows in a
    row may be skipped before training stops; ``local_sync``: hierarchical SSD-SGD (gradients
    averaged inside each node every step, the windows between nodes), as resolved for this job.
    """

    sync_every: Union[int, str] = 5
    delay: Optional[Union[int, str]] = None
    warmup_steps: int = 500
    glu_beta: float = DEFAULT_GLU_BETA
    compensation: str = "glu"
    nonfinite: str = "raise"
    compression: str = "none"
    max_skipped_windows: int = 3
    max_sync_every: int = 16
    local_sync: bool = False

    def __post_init__(self) -> None:
        for name in ("sync_every", "delay"):
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise ValueError(f"{name} must be an integer or 'auto', got {value!r}")
        if self.sync_every == AUTO and self.delay not in (None, AUTO):
            raise ValueError(f"with sync_every='auto' the delay is chosen with it (d = k): leave delay out, got "
                             f"delay={self.delay!r}")
        if self.delay is None:
            object.__setattr__(self, "delay", self.sync_every)
        if isinstance(self.max_sync_every, bool) or not isinstance(self.max_sync_every, int) \
                or self.max_sync_every < 1:
            raise ValueError(f"max_sync_every must be an integer >= 1, got {self.max_sync_every!r}")
        self.schedule  # validates sync_every, delay and warmup_steps
        if self.auto and self.warmup_steps < MIN_WARMUP_STEPS:
            raise ValueError(f"sync_every='auto' and delay='auto' time the warm-up's steps: warmup_steps must "
                             f"be >= {MIN_WARMUP_STEPS}, got {self.warmup_steps}")
        beta = self.glu_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or not 0 <= beta <= 1:
            raise ValueError(f"glu_beta must be a number in [0, 1], got {beta!r}")
        object.__setattr__(self, "glu_beta", float(beta))
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if isinstance(self.max_skipped_windows, bool) or not isinstance(self.max_skipped_windows, int) \
                or self.max_skipped_windows < 1:
            raise ValueError(f"max_skipped_windows must be an integer >= 1, got {self.max_skipped_windows!r}")

    @property
    def auto(self) -> bool:
        """The window (k or d) is chosen from measured times."""
        return AUTO in (self.sync_every, self.delay)

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    @cached_property
    def schedule(self) -> Schedule:
        """The fixed schedule; with "auto", the widest one allowed (a validation of the bounds)."""
        k = self.max_sync_every if self.sync_every == AUTO else self.sync_every
        d = 0 if self.delay == AUTO else self.delay
        return Schedule(k, d, self.warmup_steps)  # type: ignore[arg-type]

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
