"""The self-tuning window (``sync_every="auto"``, ``delay="auto"``): measure the compute time of a
step, the time a window's collective takes and what a window costs the host (its launch and
landing), agree on them across ranks, and choose the window (SPEC, "Self-tuning window").

A window must hide its collective behind d local steps (with ``MARGIN`` to spare), and its own
cost, paid once per window, must not slow the steps by more than ``TOLERANCE`` compared with the
widest window allowed: the smallest k meeting both is taken, and (with a fixed k too, where
``delay="auto"``, the default) the fewest steps d <= k that hide the collective. The first choice
is made at the end of the warm-up, from its steps, its gradients' collectives (scaled to the
delta's bytes: nothing is sent to measure) and a timed dry launch; it is re-checked every
``RETUNE_EVERY`` windows from what the windows took. Changes take effect at a launch, on every rank
at the same step; when the next re-check is due is the clock's (``WindowClock.next_check``), so
every rank, a joining or resumed one too, makes the same collective at the same launch.

A window's cost to the host can be more than its launch and landing steps show: on shared cores
the collective's own work slows every step around it. So each re-check also records the mean time
of a step, less its communication wait, over the period just run at its window (a table agreed
across ranks; a step after an evaluation, a checkpoint or a commit is left out), and where
two windows have been run it fits ``step = c + cost / k`` and uses that cost where it is larger.
Where only one window has run and the choice would keep it or widen it by less than ``PROBE``
times, the next period runs a window ``PROBE`` times wider; a window not run yet (the first
choice's too) is re-checked after ``PROBE_WINDOWS`` windows.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from typing import Callable, Optional

from ..comm import Communicator
from ..stats import SSDStats
from .clock import WindowClock

logger = logging.getLogger(__name__)

MARGIN = 1.5          # the collective must fit in d steps of compute with this much to spare
RETUNE_EVERY = 20     # windows between re-checks (each is one small blocking collective)
TOLERANCE = 0.03      # the step time a window's own cost may add, against the widest window
SAMPLES = 64          # the most recent step and window times a choice is made from
MIN_SAMPLES = 4       # steps every rank must have timed before a choice is made
PROVISIONAL = 5       # the window used until then (a resume at the end of the warm-up)
PROBE = 2             # a probe's window, times the one run so far
PROBE_WINDOWS = 5     # windows a probe runs before the next re-check


def choose_window(compute_s: float, collective_s: float, window_s: float, *, sync_every: Optional[int],
                  max_sync_every: int, auto_delay: bool) -> tuple[int, int]:
    """``(k, d)`` for steps of ``compute_s``, a collective of ``collective_s`` and a per-window
    host cost of ``window_s``. With ``sync_every`` None: the smallest ``k <= max_sync_every``
    whose steps hide the collective with ``MARGIN`` to spare and whose predicted step time is
    within ``TOLERANCE`` of the widest window's; then (and with a fixed ``k`` and ``auto_delay``)
    the smallest ``d <= k`` that hides the collective. The delay is what costs quality (the gap to
    synchronous training grows with d at a fixed k), the width only host time, so the two are
    chosen apart."""
    hide = math.ceil(MARGIN * collective_s / compute_s) if compute_s > 0 else max_sync_every

    def delay(k: int) -> int:
        # d >= 1: where no collective time was measured the window still overlaps a step
        return max(1, min(hide, k))

    if sync_every is not None:
        return sync_every, delay(sync_every) if auto_delay else sync_every

    def step_time(k: int) -> float:
        return compute_s + (window_s + max(0.0, MARGIN * collective_s - k * compute_s)) / k

    best = step_time(max_sync_every)
    k = next((k for k in range(max(hide, 1), max_sync_every) if step_time(k) <= (1 + TOLERANCE) * best),
             max_sync_every)
    return k, delay(k)


def measuring_windows() -> int:
    """Windows until the re-check of a window not run yet (the first choice's too)."""
    return min(PROBE_WINDOWS, RETUNE_EVERY)


def fitted_window_cost(measured: dict[int, float]) -> Optional[float]:
    """A window's cost from the mean step times measured at two or more windows (``{k: seconds}``):
    the slope of ``step = c + cost / k`` by least squares (at least 0); None with fewer than two."""
    if len(measured) < 2:
        return None
    xs, ys = [1.0 / k for k in measured], list(measured.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, slope)


class WindowTuner:
    """Step and collective times of this rank, and the choices made from everyone's."""

    def __init__(self, comm: Communicator, sync_every: Optional[int], max_sync_every: int, auto_delay: bool) -> None:
        self.comm, self.sync_every, self.max_sync_every = comm, sync_every, max_sync_every
        self.auto_delay = auto_delay
        self.compute: deque[float] = deque(maxlen=SAMPLES)          # steps without a launch or landing
        self.window_steps: deque[float] = deque(maxlen=SAMPLES)     # steps with one
        self.gradient_rate: deque[float] = deque(maxlen=SAMPLES)    # warm-up collectives, seconds per byte
        self.in_flight: deque[float] = deque(maxlen=SAMPLES)
        self._last: Optional[tuple[float, float]] = None   # (end of the last step, comm wait by then)
        self._windows_seen = 0   # launches + landings by the last step's end: a step with one is a window step
        self.window_estimate = 0.0   # a window's host cost, from the dry launch
        self.last_compute: Optional[float] = None   # the compute time the last choice was made from
        self.measured: dict[int, float] = {}   # window -> mean step seconds (less waits) over a period at it, agreed
        self._period = (0, 0.0)   # steps and their seconds (less waits) since the last choice
        self.log: list[dict[str, float]] = []

    def first_clock(self, step: int, delta_bytes: int, window_s: float) -> WindowClock:
        """The clock of a delay stage entered at ``step``: the first choice, or the provisional
        window with a re-check at the first launch where some rank timed too few steps."""
        chosen = self.initial(step, delta_bytes, window_s)
        self._period, self._last = (0, 0.0), None   # the windows' periods start here, chosen or not
        k, d = chosen or self.provisional
        return WindowClock.starting(k, d, step, measuring_windows() if chosen else 0)

    def recheck(self, clock: WindowClock, step: int) -> None:
        """At a launch where ``clock`` says a re-check is due (every rank alike): the new window
        from the next launch on, and the next re-check's launch."""
        chosen = self.retune(step, clock.sync_every, clock.delay)
        if chosen is None:
            clock.next_check = clock.launches + 1
            return
        clock.sync_every, clock.delay = chosen
        # a probe, or a window not run yet: measured soon
        clock.next_check = clock.launches + (RETUNE_EVERY if chosen[0] in self.measured else measuring_windows())

    def step_done(self, now: float, stats: SSDStats) -> None:
        """A step ended at ``now``; the time since the last one, less what was spent waiting on
        communication, is a step's compute (with its window's launch or landing, if it had one)."""
        windows = stats.windows_launched + stats.windows_landed
        if self._last is not None:
            sample = max((now - self._last[0]) - (stats.comm_wait_seconds - self._last[1]), 0.0)
            (self.window_steps if windows != self._windows_seen else self.compute).append(sample)
            # less the waits, which the choice charges itself (what the collective hides not)
            self._period = (self._period[0] + 1, self._period[1] + sample)
        self._last = (now, stats.comm_wait_seconds)
        self._windows_seen = windows

    def pause(self) -> None:
        """Something that is not a training step runs until the next step ends (an evaluation, a
        checkpoint, a commit): that step is not timed."""
        self._last = None

    def window_arrived(self, seconds: float) -> None:
        """A window's collective was seen complete ``seconds`` after its launch (an upper bound
        when it was seen by a poll between steps)."""
        self.in_flight.append(seconds)

    def warmup_collective(self, seconds: float, nbytes: int) -> None:
        """A warm-up step's gradients took ``seconds`` from the first bucket's start to the last
        one's arrival, carrying ``nbytes``."""
        if nbytes:
            self.gradient_rate.append(seconds / nbytes)

    def initial(self, step: int, delta_bytes: int, window_s: float) -> Optional[tuple[int, int]]:
        """The first choice, at the end of the warm-up: its steps' compute, its gradients'
        collectives scaled to the delta's bytes (nothing is sent only to measure), and a timed
        dry launch. None where some rank timed too few steps (a resume at the end of the
        warm-up): the caller uses ``provisional`` and asks again at the next launch."""
        self.window_estimate = window_s
        rate = statistics.median(self.gradient_rate) if self.gradient_rate else 0.0
        plain = list(self.compute)
        return self._choose(step, statistics.median(plain) if plain else 0.0, rate * delta_bytes, window_s,
                            len(plain))

    @property
    def provisional(self) -> tuple[int, int]:
        """The window used until a choice can be made (d = k: nothing is known of the collective)."""
        k = self.sync_every or min(PROVISIONAL, self.max_sync_every)
        return k, k

    def retune(self, step: int, sync_every: int, delay: int) -> Optional[tuple[int, int]]:
        """A re-check from the recent steps and windows (every rank calls it at the same launch):
        the new window, or None while some rank has timed too few steps. A window's cost is what
        its launch and landing steps took beyond the others (medians), and at least the dry
        launch's estimate. Where every step launches or lands a window (k = 1, or k = 2 with
        d = 1) there are no plain steps: the compute time is the last choice's, or the window
        steps' less the window's estimated cost."""
        steps_per_window = 1 if delay in (0, sync_every) else 2   # launch and landing at one step or two
        plain, busy = list(self.compute), list(self.window_steps)
        if plain:
            compute = statistics.median(plain)
        elif self.last_compute is not None:
            compute = self.last_compute
        else:
            compute = max(0.0, statistics.median(busy) - self.window_estimate / steps_per_window) if busy else 0.0
        window = self.window_estimate
        if busy:
            window = max(window, steps_per_window * (statistics.median(busy) - compute))
        collective = statistics.median(self.in_flight) if self.in_flight else 0.0
        return self._choose(step, compute, collective, window, len(plain) + len(busy), running=sync_every)

    def _choose(self, step: int, compute_s: float, collective_s: float, window_s: float,
                samples: int, running: Optional[int] = None) -> Optional[tuple[int, int]]:
        """The agreed choice; ``running``: the window of the period that ends here (a re-check)."""
        steps, seconds = self._period
        mine = (compute_s, collective_s, window_s, samples, seconds / steps if steps else 0.0, self.measured)
        everyone = self.comm.allgather_object(mine) if self.comm.size > 1 else [mine]
        # the slowest rank's numbers decide, and the fewest samples: every rank gets the same
        compute_s, collective_s, window_s, _, period_s = (max(e[i] for e in everyone) for i in range(5))
        if min(e[3] for e in everyone) < MIN_SAMPLES:
            return None
        # every rank's table merged (a joining rank has none), then this period's: the same everywhere
        self.measured = {k: max(e[5][k] for e in everyone if k in e[5]) for e in everyone for k in e[5]}
        if running is not None and period_s > 0:
            self.measured[running] = period_s
        fitted = fitted_window_cost(self.measured)
        window_s = max(window_s, fitted or 0.0)
        k, d = choose_window(compute_s, collective_s, window_s, sync_every=self.sync_every,
                             max_sync_every=self.max_sync_every, auto_delay=self.auto_delay)
        if self.sync_every is None and running is not None and list(self.measured) == [running] \
                and running <= k < PROBE * running and running < self.max_sync_every:
            # a second window, far enough to fit from, landing as any window of its width would
            probe = min(PROBE * running, self.max_sync_every)
            k, d = choose_window(compute_s, collective_s, window_s, sync_every=probe,
                                 max_sync_every=self.max_sync_every, auto_delay=True)
        entry = {"step": step, "compute_ms": 1e3 * compute_s, "collective_ms": 1e3 * collective_s,
                 "window_ms": 1e3 * window_s, "sync_every": k, "delay": d}
        if running is not None:
            entry["period_ms"] = 1e3 * period_s   # the mean step of the period at ``running``
        if not self.log or (self.log[-1]["sync_every"], self.log[-1]["delay"]) != (k, d):
            logger.info("SSD-SGD window at step %d: k=%d, d=%d (step compute %.2f ms, delta collective "
                        "%.2f ms, window cost %.2f ms, slowest rank)", step, k, d, entry["compute_ms"],
                        entry["collective_ms"], entry["window_ms"])
        self.log.append(entry)
        self.last_compute = compute_s
        self.in_flight.clear()
        self.compute.clear()
        self.window_steps.clear()
        self._last = None   # the step that chose (the agreement) is not a typical step
        self._period = (0, 0.0)
        return k, d


def timed(run: Callable[[], None]) -> float:
    """Seconds ``run`` takes."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0
