"""What the delay stage holds on one rank, and how it is saved and restored: ``W``, the snapshot
and the delta (three copies of the model), the residual of a lossy wire format, the outer
optimizer's momentum, the drift correction, the window launched, the clock, and the windows
skipped in a row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..comm import Communicator
from ..moments import OptimizerMoments
from ..tensors import FlatSpace
from .clock import WindowClock
from .transport import InFlight


@dataclass
class Window:
    """A launched window: in flight while ``inflight`` is set, then its average sits in the delta.
    ``missing``: the share of ranks that stepped without gradients in it (once arrived)."""

    launched_at: int
    lands_at: int
    sync_every: int        # the local steps its delta covers
    inflight: Optional[InFlight] = None
    missing: Optional[Tensor] = None
    launch_time: float = 0.0
    seen_arrived: bool = False

    def describe(self) -> tuple[int, int, int]:
        return self.launched_at, self.lands_at, self.sync_every


@dataclass(frozen=True)
class Position:
    """Where a rank is in SSD-SGD, compared across ranks at the first step: they must agree, or
    those at the very start take rank 0's (Horovod's resume: load on rank 0, then broadcast)."""

    step: int = 0
    started: bool = False
    window: Optional[tuple[int, int, int]] = None   # launched at, lands at, steps it covers
    skipped_in_a_row: int = 0
    clock: Optional[tuple] = None
    moments: Optional[tuple] = None   # the (parameter index, state key) pairs of the moments that travel
    warmup: Optional[tuple] = None    # an "auto" warm-up's reading (warmup_end.WarmupEnd.position)

    @property
    def fresh(self) -> bool:
        return self == Position()


class DelayState:
    """One rank's delay-stage state for the ``local`` tensors (parameters, then buffers) and the
    optimizer's ``moments`` that travel after them, of which it carries ``shard`` across nodes.
    Nothing is allocated before ``allocate()``."""

    def __init__(self, local: Sequence[Tensor], moments: Optional[OptimizerMoments] = None,
                 shard: tuple[int, int] = (0, 1), outer_momentum: bool = False, drift_correction: bool = False) -> None:
        self.local, self.moments, self.shard, self.outer_momentum = list(local), moments, shard, outer_momentum
        self.drift_correction = drift_correction
        self.global_: Optional[FlatSpace] = None
        self.snapshot: Optional[FlatSpace] = None
        self.delta: Optional[FlatSpace] = None
        self.residual: Optional[FlatSpace] = None   # error feedback of a lossy wire format
        self.momentum: Optional[FlatSpace] = None   # the outer optimizer's
        self.correction: Optional[FlatSpace] = None   # this rank's drift correction (its own, never shared)
        self.correction_before: Optional[FlatSpace] = None   # the one the last landing replaced
        self.drift_known = True   # False: the window in flight is rank 0's, adopted (not this rank's drift)
        self.window: Optional[Window] = None
        self.clock: Optional[WindowClock] = None
        self.skipped_in_a_row = 0

    @property
    def started(self) -> bool:
        return self.global_ is not None

    @property
    def nbytes(self) -> int:
        spaces = (self.global_, self.snapshot, self.delta, self.residual, self.momentum, self.correction,
                  self.correction_before)
        return sum(s.nbytes for s in spaces if s is not None)

    def like(self) -> list[Tensor]:
        """Tensors shaped as the flat spaces' contents: the local ones, then the moments'."""
        return self.local + ([] if self.moments is None else self.moments.like())

    def allocate(self) -> None:
        """W, the snapshot, the delta, and the outer momentum and drift correction where they are
        kept (zeros); the moments that travel are fixed now if no checkpoint named them."""
        if self.moments is not None and not self.moments.fixed:   # the optimizer has stepped (or was synced)
            self.moments.fix()
        like = self.like()
        self.global_, self.snapshot, self.delta = FlatSpace(like), FlatSpace(like), FlatSpace(like)
        self.momentum = FlatSpace(like) if self.outer_momentum else None
        self.correction = FlatSpace(like) if self.drift_correction else None
        self.correction_before = FlatSpace(like) if self.drift_correction else None

    def keep_drift(self) -> None:
        """A landing that does not estimate the correction (a skipped window, an adopted one):
        the correction stays, and so it is the one the next window's steps all added."""
        for b, c in zip([] if self.correction is None else self.correction_before.buffers,
                        [] if self.correction is None else self.correction.buffers):
            b.copy_(c)
        self.drift_known = True

    def forget_drift(self) -> None:
        """Start the drift correction again from zero (the ranks it summed to zero over changed)."""
        for space in (self.correction, self.correction_before):
            for b in [] if space is None else space.buffers:
                b.zero_()

    def ensure_residual(self) -> FlatSpace:
        if self.residual is None:
            self.residual = FlatSpace(self.like())
        return self.residual

    def position(self, step: int) -> Position:
        moments = self.moments is not None and self.moments.fixed
        return Position(step, self.started, None if self.window is None else self.window.describe(),
                        self.skipped_in_a_row, None if self.clock is None else self.clock.as_tuple(),
                        tuple(self.moments.keys) if moments else None)

    def adopt(self, comm: Communicator, root: Position, name: str) -> None:
        """Take rank 0's ``W``, outer momentum, window (arrived on rank 0) and clock: collective,
        on an allocated state. A drift correction is a rank's own: it starts again from zero, and
        the adopted window (rank 0's snapshot) does not estimate one."""
        mine, self.window = self.window, None
        self.forget_drift()
        self.drift_known = root.window is None
        self.skipped_in_a_row = root.skipped_in_a_row
        shared = self.global_.buffers + ([] if self.momentum is None else self.momentum.buffers)
        comm.broadcast_(shared, root_rank=0, name=f"{name}.adopt.global_weights")
        self.clock = WindowClock(*root.clock)
        if root.window is not None:
            missing = torch.zeros(1, device=self.delta.buffers[0].device)
            if mine is not None and mine.missing is not None:   # rank 0's is the one broadcast
                missing.copy_(mine.missing.reshape(1))
            comm.broadcast_(self.snapshot.buffers + self.delta.buffers + [missing], root_rank=0,
                            name=f"{name}.adopt.window")
            self.window = Window(*root.window, missing=missing)

    def state_dict(self) -> dict[str, Any]:
        """Everything above; the window must have arrived (its average is saved)."""
        window = self.window
        assert window is None or window.inflight is None, "wait for the window before saving"
        return {
            "skipped_in_a_row": self.skipped_in_a_row,
            "shard": list(self.shard),   # hierarchical: the residual and the window's average are this shard's
            "residual": _buffers(self.residual),
            "global_weights": _buffers(self.global_),
            "outer_momentum": _buffers(self.momentum),
            "drift_correction": _buffers(self.correction),
            "drift_correction_before": _buffers(self.correction_before),
            "drift_known": self.drift_known,
            "moments": None if self.moments is None else [list(key) for key in self.moments.keys],
            "clock": None if self.clock is None else list(self.clock.as_tuple()),
            "window": None if window is None else {
                "launched_at": window.launched_at, "lands_at": window.lands_at, "sync_every": window.sync_every,
                "missing": None if window.missing is None else float(window.missing),
                "snapshot": list(self.snapshot.buffers), "delta": list(self.delta.buffers)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ``{}`` resets to before the delay stage."""
        self.global_ = self.snapshot = self.delta = self.residual = self.momentum = None
        self.correction = self.correction_before = None
        self.drift_known = bool(state.get("drift_known", True))
        self.window = self.clock = None
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        if self.moments is not None:   # the settings match: saved with them (none before the delay stage)
            self.moments.restore(state.get("moments") or [])
        shard = tuple(state.get("shard", self.shard))
        if shard != self.shard and (state.get("residual") is not None or state.get("window") is not None):
            raise ValueError(
                f"the checkpoint was saved by a rank carrying shard {list(shard)} of its node's delta, this rank "
                f"carries shard {list(self.shard)} (another number of ranks per node): its error-feedback residual "
                "and window in flight are a shard's. Resume with as many ranks per node as before, or from a "
                "checkpoint saved after optimizer.finish() with compression none")
        if state.get("residual") is not None:
            self.ensure_residual().load_(state["residual"], "residual")
        if state.get("global_weights") is None:
            return
        self.allocate()
        self.global_.load_(state["global_weights"], "global weights")
        if self.momentum is not None and state.get("outer_momentum") is not None:
            self.momentum.load_(state["outer_momentum"], "outer momentum")
        if self.correction is not None and state.get("drift_correction") is not None:
            self.correction.load_(state["drift_correction"], "drift correction")
            self.correction_before.load_(state["drift_correction_before"], "drift correction")
        self.clock = WindowClock(*state["clock"])
        window = state.get("window")
        if window is not None:
            self.snapshot.load_(window["snapshot"], "snapshot")
            self.delta.load_(window["delta"], "delta")
            missing = window.get("missing")
            self.window = Window(int(window["launched_at"]), int(window["lands_at"]), int(window["sync_every"]),
                                 missing=None if missing is None else _scalar(missing, self.delta))


def _buffers(space: Optional[FlatSpace]) -> Optional[list[Tensor]]:
    return None if space is None else list(space.buffers)


def _scalar(value: float, like: FlatSpace) -> Tensor:
    return torch.full((1,), float(value), device=like.buffers[0].device if like.buffers else "cpu")
