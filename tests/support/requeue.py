"""Starting a requeued Slurm job at once instead of after Slurm's hold, without racing its last run."""
from __future__ import annotations

import time

SETTLE_SECONDS = 3.0


class RequeueRelease:
    """Says when a requeued job may be given StartTime=now. Slurm holds a requeued job back (BeginTime)
    until its last run is surely over. Released too soon, the launch reaches a slurmd that revoked the job's
    credential in the same second ("Job N already killed, do not launch batch job") and the job FAILS.
    So release only once it has been pending for SETTLE_SECONDS."""

    def __init__(self, settle_seconds: float = SETTLE_SECONDS) -> None:
        self.settle_seconds = settle_seconds
        self.pending_since: float | None = None

    def due(self, state: str) -> bool:
        """True when a job seen in `state` now should be started at once."""
        if state != "PENDING":
            self.pending_since = None
            return False
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        return time.monotonic() - self.pending_since >= self.settle_seconds
