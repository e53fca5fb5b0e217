"""What a landing decides: land the window, skip it (``nonfinite="skip"``), or raise (a rank
stepped without gradients, a non-finite average). On CUDA with ``nonfinite="raise"`` the checks
are read on the host a few steps later, so the device's queue never drains for them."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..settings import SSDSettings
from ..stats import SSDStats
from ..tensors import FlatSpace

if TYPE_CHECKING:
    from .state import DelayState


NONFINITE_ADVICE = (": lower the learning rate or clip gradients, or pass nonfinite='skip' to skip such "
                    "windows; the global weights were not updated")


def nonfinite_message(launched_at: int) -> str:
    return (f"the averaged model delta of the window launched at step {launched_at} is not finite "
            "(NaN or Inf on some rank)")


def missing_gradients(n: int, size: int, step: int, among: str = "ranks") -> str:
    """The error when ``n`` of ``size`` ranks (or, hierarchical, nodes with such a rank) stepped
    without gradients."""
    who = f"{n} of {size} ranks" if among == "ranks" else f"a rank on {n} of {size} nodes"
    return (f"{who} called optimizer.step() without any gradient at or before step {step}: call "
            "loss.backward() before optimizer.step() on every rank")


class DeferredVerdict:
    """A landing's checks (finite delta, share of ranks without gradients) computed on the device
    and copied to the host without waiting: read once the copy has arrived, so the device's queue
    never drains for them."""

    def __init__(self, launched_at: int, landed_at: int, finite: Tensor, missing: Optional[Tensor]) -> None:
        self.launched_at, self.landed_at = launched_at, landed_at
        share = finite.new_zeros((), dtype=torch.float32) if missing is None else missing.reshape(()).float()
        values = torch.stack([finite.to(torch.float32), share.to(finite.device)])
        self.event: Optional[torch.cuda.Event] = None
        if values.is_cuda:
            self.host = torch.empty(2, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(values.device))
        else:
            self.host = values

    def read(self) -> tuple[bool, float]:
        """(delta finite, share of ranks that stepped without gradients); waits for the copy."""
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        return bool(self.host[0] > 0), float(self.host[1])


class Verdicts:
    """The landing checks of one delay stage, whose windows average over ``size`` ranks (or
    nodes, ``among="nodes"``); the windows skipped in a row are counted in its ``state``."""

    def __init__(self, settings: SSDSettings, stats: SSDStats, state: "DelayState", size: int,
                 among: str = "ranks") -> None:
        self.settings, self.stats, self.state, self.size, self.among = settings, stats, state, size, among
        self.defer: Optional[bool] = None   # None: on CUDA with nonfinite="raise" (``defers``)
        self.pending: Optional[DeferredVerdict] = None

    def defers(self, delta: FlatSpace) -> bool:
        """Read a landing's checks on the host later, not at the landing: on CUDA with
        ``nonfinite="raise"``, where reading them at once would drain the device's queue."""
        if self.defer is not None:
            return self.defer
        return self.settings.nonfinite == "raise" and bool(delta.buffers) and delta.buffers[0].is_cuda

    def judge(self, launched_at: int, landed_at: int, delta: FlatSpace, missing: Optional[Tensor]) -> bool:
        """True: land the averaged ``delta``. False: skip the window (``nonfinite="skip"``, a warning;
        too many in a row raise). Where checks are deferred, a non-finite ``delta`` is zeroed and
        lands, and the next ``check_deferred`` raises."""
        self.check_deferred()
        if self.defers(delta):
            self.pending = DeferredVerdict(launched_at, landed_at, delta.zero_unless_finite_(), missing)
        else:
            if missing is not None and float(missing) > 0:
                self._raise_missing(launched_at, float(missing))
            if not delta.is_finite():
                return self._skip(launched_at)
        self.state.skipped_in_a_row = 0
        return True

    def check_deferred(self, before: Optional[int] = None) -> None:
        """Raise if the last landing's deferred checks failed. Called where every rank is at the
        same point (a landing, a launch after the landing's step, finish, a save or a load), never
        when a rank's own device happens to be done, so ranks stop together; by then the result has
        long arrived. ``before``: only a landing made before that step."""
        verdict = self.pending
        if verdict is None or (before is not None and verdict.landed_at >= before):
            return
        self.pending = None
        finite, missing = verdict.read()
        if missing > 0:
            self._raise_missing(verdict.launched_at, missing)
        if not finite:
            raise FloatingPointError(nonfinite_message(verdict.launched_at) + NONFINITE_ADVICE)

    def _raise_missing(self, launched_at: int, share: float) -> None:
        raise RuntimeError(missing_gradients(round(share * self.size), self.size, launched_at, self.among))

    def _skip(self, launched_at: int) -> bool:
        message = nonfinite_message(launched_at)
        limit = self.settings.max_skipped_windows
        if self.settings.nonfinite == "raise":
            raise FloatingPointError(message + NONFINITE_ADVICE)
        self.state.skipped_in_a_row += 1
        self.stats.windows_skipped += 1
        if self.state.skipped_in_a_row > limit:
            raise FloatingPointError(f"{message}, and so were the {limit} windows before it: training "
                                     "diverges; lower the learning rate or clip gradients")
        warnings.warn(message + "; window skipped, global weights unchanged")
        return False
