"""The gradient noise of a synchronous step, read from the ranks' own gradients and their average
(the two-batch estimator of McCandlish et al., "An Empirical Model of Large-Batch Training",
2018): with N ranks each on a batch of b samples drawn alike, ``E|g_i|^2 = |G|^2 + tr(S)/b`` and
``E|mean g|^2 = |G|^2 + tr(S)/(N b)``, so both the signal ``|G|^2`` and a rank's noise ``tr(S)/b``
follow from the two norms, and their ratio r is the gradient noise scale in units of a rank's
batch. Where the ranks' shards differ, the spread of their own gradients counts as noise.

What r says about local steps: Adam divides a step by the square root of the running mean of its
squared gradient, and that mean on one rank is (1 + r) / (1 + r/N) times the average's. Local
steps at sqrt(N) times the learning rate (the library's scale for Adam's family) match
synchronous ones where r >> N; while r is below N the ranks' gradients mostly agree and the scaled
local steps are longer than synchronous AdamW's, by up to sqrt(N) where r << 1. The library's
``warmup_steps="auto"`` (``warmup_end``) ends where r reaches N: there the scaled local step is sqrt(2N/(N+1))
times the synchronous one (1.26 at 4 ranks, under sqrt(2) at any number).
"""
from __future__ import annotations

import math

SMOOTHING = 0.9   # the weight of the past in both running means (about 10 steps)
MIN_STEPS = 10    # steps seen before the ratio is read: the running means' horizon


def signal_and_noise(local_sq: float, mean_sq: float, ranks: int) -> tuple[float, float]:
    """Unbiased estimates of ``|G|^2`` and of one rank's ``tr(S)/b`` from ``local_sq``, the ranks'
    mean of their own gradients' squared norms, and ``mean_sq``, the squared norm of the ranks'
    average gradient."""
    if ranks < 2:
        raise ValueError(f"the gradient noise needs at least 2 ranks, got {ranks}")
    return (ranks * mean_sq - local_sq) / (ranks - 1), (local_sq - mean_sq) * ranks / (ranks - 1)


class GradientNoise:
    """Running means of the signal and the noise over the synchronous steps seen, and their
    ratio: one rank's gradient noise over the signal."""

    def __init__(self, ranks: int, smoothing: float = SMOOTHING) -> None:
        self.ranks, self.smoothing = ranks, smoothing
        self.signal = self.noise = 0.0
        self.steps = 0

    def update(self, local_sq: float, mean_sq: float) -> None:
        signal, noise = signal_and_noise(local_sq, mean_sq, self.ranks)
        keep = self.smoothing if self.steps else 0.0
        self.signal = keep * self.signal + (1 - keep) * signal
        self.noise = keep * self.noise + (1 - keep) * noise
        self.steps += 1

    @property
    def ratio(self) -> float:
        """``tr(S)/b`` over ``|G|^2`` (infinite where the signal is gone; 0 before any step)."""
        if not self.steps:
            return 0.0
        return self.noise / self.signal if self.signal > 0 else math.inf

    @property
    def saturated(self) -> bool:
        """The averaged gradient is as much noise as signal (the ratio has reached the ranks),
        read once the running means have seen ``MIN_STEPS`` steps."""
        return self.steps >= MIN_STEPS and self.ratio >= self.ranks
