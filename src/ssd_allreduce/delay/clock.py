"""When windows launch and land: one clock for fixed and self-tuned windows, driven by the ranks'
delay stage and by the simulator alike.

The delay stage starts at the warm-up's end, step ``T``. A window of ``k`` local steps ends (its
allreduce is launched) at ``T + k - 1``, ``T + 2k - 1``, ...; it lands ``d`` steps after its
launch, before a launch at the same step. A self-tuned clock changes ``(k, d)`` at a launch, the
same on every rank; the clock is part of what ranks compare, adopt and checkpoint.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Optional


@dataclass
class WindowClock:
    """``(k, d)`` now, the next launch step, the windows launched so far, and (self-tuned) the
    launch count at which the window is re-checked (None: never, a fixed window)."""

    sync_every: int
    delay: int
    next_launch: int
    launches: int = 0
    next_check: Optional[int] = None

    @classmethod
    def starting(cls, sync_every: int, delay: int, step: int, next_check: Optional[int] = None) -> "WindowClock":
        """The clock of a delay stage entered at ``step``: the first window ends ``k - 1`` later."""
        return cls(sync_every, delay, step + sync_every - 1, 0, next_check)

    def launches_at(self, step: int) -> bool:
        return step == self.next_launch

    def check_due(self) -> bool:
        """A self-tuned window is re-checked at this launch."""
        return self.next_check is not None and self.launches >= self.next_check

    def advance(self) -> None:
        """Past a launch: the next window ends ``k`` steps later."""
        self.next_launch += self.sync_every
        self.launches += 1

    def as_tuple(self) -> tuple:
        return astuple(self)
