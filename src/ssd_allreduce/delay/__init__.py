"""The steps-delay stage, in rooms: ``clock`` (when windows launch and land, fixed or self-tuned,
with ``tuner``), ``transport`` (how a delta crosses the ranks), ``feedback`` (a lossy format's
residual), ``state`` (what is held and checkpointed), ``verdict`` (what a landing checks) and
``stage`` (the order of operations)."""
from .clock import WindowClock
from .stage import DelayStage
from .state import Position

__all__ = ["DelayStage", "Position", "WindowClock"]
