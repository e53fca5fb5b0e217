"""Counters a user reads as ``optimizer.ssd_stats``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class SSDStats:
    """What SSD-SGD did so far on this rank.

    ``comm_wait_seconds`` is host time blocked on communication; on CUDA with the torch backend
    the wait is enqueued on the GPU stream instead and does not show here."""

    steps: int = 0
    warmup_allreduces: int = 0
    warmup_allreduces_in_backward: int = 0   # gradient buckets sent while backward still ran
    windows_launched: int = 0
    windows_landed: int = 0
    windows_skipped: int = 0
    bytes_allreduced: int = 0
    warmup_bytes_allreduced: int = 0
    node_allreduces: int = 0             # hierarchical: gradients averaged inside the node after the warm-up
    node_allreduces_in_backward: int = 0
    node_bytes_allreduced: int = 0
    comm_wait_seconds: float = 0.0
    polls_pending: int = 0
    sync_every: int = 0      # the window in use (k, d): set at the end of the warm-up
    delay: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Every counter as ``values`` has it (a checkpoint's ``as_dict()``), zero where absent."""
        for f in fields(self):
            setattr(self, f.name, values.get(f.name, f.default))
