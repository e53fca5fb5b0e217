"""Where the warm-up ends: after ``warmup_steps`` synchronous steps, or with ``"auto"`` after the
first step where the ranks' gradient noise reached their number (``noise.GradientNoise``).

From there a rank's gradient is as much noise as the average is signal, and the delay stage's
scaled local steps come within sqrt(2N/(N+1)) of synchronous ones (``noise`` says why); before
it, the ranks' gradients mostly agree and local AdamW steps run up to sqrt(N) too long. The rule
reads the ranks' own gradient norms and their average's, one gather of two numbers per warm-up
step. Every rank decides from the same gathered numbers, so all end the warm-up at the same step.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from .noise import MIN_STEPS, GradientNoise
from .settings import AUTO

# An "auto" warm-up's longest: twice the paper's 500 steps. The crossing was measured at 83-581
# steps on the GPT at 4 ranks (docs/BENCHMARKS.md, "Where the warm-up ends"); at more ranks, or with
# larger batches per rank, the noise may take long to reach the ranks' number.
MAX_AUTO_WARMUP_STEPS = 1000
_SAVED = ("end", "steps", "signal", "noise")   # position()'s fields, by name in a checkpoint


class WarmupEnd:
    """The warm-up's end for ``warmup_steps`` (an integer, or "auto"): ``end`` is the first step
    of the delay stage, None while an "auto" warm-up has not decided it."""

    def __init__(self, warmup_steps: Union[int, str]) -> None:
        self.auto = warmup_steps == AUTO
        self.end: Optional[int] = None if self.auto else int(warmup_steps)
        self.noise = GradientNoise(2)

    def covers(self, step: int) -> bool:
        """Step ``step`` is synchronous."""
        return self.end is None or step < self.end

    def observe(self, step: int, ranks: int, norms: Optional[tuple[float, float]]) -> None:
        """After synchronous step ``step`` over ``ranks``: ``norms`` are the ranks' mean of their
        own gradients' squared norms and the squared norm of their average (identical on every
        rank: every rank reads the same gathered numbers), read into ``noise`` with any warm-up.
        A reading that is not finite (a GradScaler overflow) or all zero says nothing and is
        passed over. One rank has no noise to read: its "auto" warm-up is ``noise.MIN_STEPS`` long."""
        alone = norms is None or ranks < 2
        if not alone and all(math.isfinite(x) for x in norms) and norms[0] > 0:
            self.noise.ranks = ranks   # Horovod elastic: the ranks of this step
            self.noise.update(*norms)
        if self.end is not None:
            return
        saturated = step + 1 >= MIN_STEPS if alone else self.noise.saturated
        if saturated or step + 1 >= MAX_AUTO_WARMUP_STEPS:
            self.end = step + 1

    def position(self) -> Optional[tuple]:
        """What ranks compare and a joining rank adopts: None where nothing was observed (a fixed
        warm-up, or an "auto" one before its first step); once the end is decided, that alone."""
        if not self.auto or (self.end is None and not self.noise.steps):
            return None
        if self.end is not None:
            return self.end, 0, 0.0, 0.0
        return self.end, self.noise.steps, self.noise.signal, self.noise.noise

    def adopt(self, position: Optional[tuple]) -> None:
        """Take ``position()`` of another rank (or a checkpoint)."""
        if not self.auto:
            return
        self.noise = GradientNoise(self.noise.ranks)
        self.end = None
        if position is not None:
            self.end, self.noise.steps, self.noise.signal, self.noise.noise = position

    def state_dict(self) -> Optional[dict[str, Any]]:
        position = self.position()
        if position is None:
            return None
        return dict(zip(_SAVED, position))

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        self.adopt(None if state is None else tuple(state[key] for key in _SAVED))
