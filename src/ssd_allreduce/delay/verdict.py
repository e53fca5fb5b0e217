"""The checks a landing makes (a finite average, no rank without gradients) and the errors they
raise; on CUDA read on the host a few steps later, so the device's queue never drains for them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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
