"""A bounded stop when a peer dies or freezes.

A rank that is killed leaves the others blocked in their next collective; one that is frozen
(SIGSTOP, a hung node, a dead link) can leave them blocked for good: Gloo gives up after its
receive timeout only inside a collective, MPI never. The watchdog is a thread that ends this rank
when training has made no progress for ``timeout`` seconds, saying at which step and in which
phase, so the launcher (horovodrun, mpirun, torchrun, srun) ends the job. The backends' own
timeouts are set to the same bound (``backend_timeouts``) so that, where a backend notices first,
its message (Horovod's names the ranks that did not join a collective) is printed before. The
roll call (``rollcall``) names the rank that was lost.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .rollcall import RollCall

EXIT_STALLED = 75
ENV_TIMEOUT = "SSD_FAULT_TIMEOUT"
DEFAULT_TIMEOUT = 60.0


def fault_timeout(flag: Optional[float]) -> float:
    """Seconds without progress before stopping: ``--fault-timeout``, else $SSD_FAULT_TIMEOUT, else
    60; 0 disables the watchdog."""
    if flag is not None:
        return flag
    return float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT))


def set_backend_timeouts(timeout: float) -> None:
    """Horovod's stall check and shutdown and Gloo's timeout, for a job about to ``hvd.init()``
    (values the user set in the environment win)."""
    if timeout <= 0:
        return
    for name, value in (("HOROVOD_STALL_CHECK_TIME_SECONDS", max(1, int(timeout // 2))),
                        ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", max(2, int(timeout))),
                        ("HOROVOD_GLOO_TIMEOUT_SECONDS", max(2, int(timeout)))):
        os.environ.setdefault(name, str(value))


def stop_label(rank: int) -> str:
    """How a stopping rank starts its message: which rank, and when (to line up with node logs)."""
    return f"rank {rank} at {datetime.now().isoformat(timespec='milliseconds')}:"


def torch_timeout(timeout: float) -> Optional[timedelta]:
    """The ``init_process_group`` timeout for the same bound (None: torch's default)."""
    return timedelta(seconds=timeout) if timeout > 0 else None


class Watchdog:
    """Call ``progress(phase)`` whenever training moves on; ``stop()`` at the end. It watches from
    the first ``progress``: set-up (data, model, resume) may take as long as it needs. With a
    ``rollcall`` it names the lost rank, asked min(its longest answer, 3/4 of the bound) before the
    bound so it stops on time."""

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        self.phase = "start-up"
        self.rollcall: Optional["RollCall"] = None
        self._last: Optional[float] = None
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="ssd-watchdog", daemon=True)
            self._thread.start()

    def progress(self, phase: str) -> None:
        self.phase = phase
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        lost = ""
        asked_at: Optional[float] = None   # the progress mark the roll call was asked at
        while not self._done.wait(min(1.0, self.timeout / 10)):
            last = self._last
            if last is None:
                continue
            if self.rollcall is not None and asked_at != last:
                # seconds before the bound: the watch needs beats' time after rank 0's answer, which a
                # loaded machine delays
                ask = min(self.rollcall.longest_answer, 0.75 * self.timeout)
                if time.monotonic() - last > self.timeout - ask:
                    lost, asked_at = self._ask_rollcall(last + self.timeout - time.monotonic()), last
                    if self._done.wait(max(0.0, last + self.timeout - time.monotonic())):
                        return
            idle = time.monotonic() - last
            if idle > self.timeout and self._last == last:
                print(f"{stop_label(self.rank)} no progress for {idle:.0f} s during {self.phase}: another rank "
                      f"stopped or froze, or a link is down{lost}; stopping this rank (exit {EXIT_STALLED}). "
                      f"Rerun with --resume to continue from the last checkpoint; --fault-timeout "
                      f"(${ENV_TIMEOUT}) sets the bound", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)   # not sys.exit: exit hooks would block on the lost peer

    def _ask_rollcall(self, within: float) -> str:
        try:
            return self.rollcall.lost(within)
        except Exception as exc:   # naming the lost rank must never cost the bounded stop
            return f"; the roll call failed: {exc}"
