"""The steps-delay stage on one rank: launch, poll, land and finish windows in the clock's order
(SPEC: land the window due at a step before launching the one ending there).

The math is ``algorithm``'s (what a landing computes, ``landing``'s), the state ``state``'s, how a
delta crosses the ranks ``transport``'s, what a landing decides ``verdict``'s; this module owns the
order of operations.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from ..algorithm import correct_drift_, launch_window
from ..comm import Communicator
from ..moments import OptimizerMoments
from ..settings import AUTO, SSDSettings
from ..stats import SSDStats
from ..topology import Hierarchy
from . import tuner as tuning
from .clock import WindowClock
from .landing import land_window_
from .layout import TensorLayout
from .link import WindowLink
from .rehearsal import rehearse
from .state import DelayState, Position, Window
from .transport import GatherTransport, NodeShards, make_transport
from .verdict import Verdicts


class DelayStage:
    """SSD-SGD after the warm-up for the local tensors ``params`` then ``buffers`` (in an order
    every rank shares). Nothing is allocated until ``start()``. Collectives are named after
    ``name``, the same on every rank and different for each optimizer of a process.

    With a ``hierarchy`` the windows run between nodes: each rank of a node carries its shard of
    the node's delta across nodes (``hierarchy.cross``) and the node gathers them at the landing.
    ``moments``: the optimizer's moments that travel with the windows, after the buffers."""

    def __init__(self, comm: Communicator, settings: SSDSettings, params: Sequence[Tensor],
                 buffers: Sequence[Tensor], compression: Any, stats: SSDStats, name: str = "ssd",
                 tensor_names: Optional[Sequence[str]] = None, hierarchy: Optional[Hierarchy] = None,
                 moments: Optional[OptimizerMoments] = None) -> None:
        self.comm, self.settings, self.compression, self.stats, self.name = comm, settings, compression, stats, name
        self.params, self.buffers, self.moments = list(params), list(buffers), moments
        self.layout = TensorLayout(self.local, tensor_names)
        node = hierarchy.node if hierarchy is not None and hierarchy.node.size > 1 else None
        self.shards = NodeShards(hierarchy.shard if hierarchy is not None else (0, 1), node, name)
        self.transport = make_transport(hierarchy.cross if hierarchy is not None else comm, compression, name)
        self.state = DelayState(self.params + self.buffers, moments, self.shards.shard, settings.outer_momentum > 0,
                                settings.drift_correction)
        self.verdicts = Verdicts(settings, stats, self.state, self.transport.comm.size,
                                 "ranks" if hierarchy is None else "nodes")
        self.tuner = (tuning.WindowTuner(comm, None if settings.sync_every == AUTO else settings.sync_every,
                                         settings.max_sync_every, settings.delay == AUTO) if settings.auto else None)
        self.link = WindowLink(self.state, self.transport, self.shards, compression, stats, self.tuner,
                               len(self.params), name, len(self.buffers))
        self.steps_without_gradients = 0   # on this rank, since the last launch

    @property
    def local(self) -> list[Tensor]:
        """Parameters, buffers, then the moments that travel (once fixed)."""
        moments = self.moments.tensors() if self.moments is not None and self.moments.fixed else []
        return self.params + self.buffers + moments

    @property
    def started(self) -> bool:
        return self.state.started

    @property
    def in_flight(self) -> bool:
        return self.state.window is not None

    @property
    def clock(self) -> Optional[WindowClock]:
        return self.state.clock

    def start(self, step: int) -> None:
        """End of warm-up, at ``step``: ``W`` = rank 0's weights, bit-identical everywhere, and
        ``w = W``; the window is chosen now where it is "auto"."""
        self._allocate()
        self.layout.check(self.local)
        state = self.state
        state.global_.copy_from_(self.local)
        self.comm.broadcast_(state.global_.buffers, root_rank=0, name=f"{self.name}.global_weights")
        self.reset_local_to_global()
        if self.tuner is None:
            self._set_clock(WindowClock.starting(self.settings.sync_every, self.settings.delay, step))
            return
        # a window's host cost before the first: a launch timed on the scratch buffers, the landing 1.5 launches
        dry = 2.5 * tuning.timed(lambda: launch_window(self.local, state.global_, state.snapshot, state.delta))
        self._set_clock(self.tuner.first_clock(step, self.link.wire_bytes(), dry))

    def _allocate(self) -> None:
        self.state.allocate()
        self._rehearse()

    def _rehearse(self) -> None:
        rehearse(self.state.like(), len(self.params), self.compression, isinstance(self.transport, GatherTransport),
                 self.settings)

    def reset_local_to_global(self) -> None:
        """``w = W``: parameters, buffers and the moments that travel."""
        with torch.no_grad():
            torch._foreach_copy_(self.local, self.state.global_.views)

    def step_done(self) -> None:
        """The end of a training step (the tuner times steps)."""
        if self.tuner is not None:
            self.tuner.step_done(time.perf_counter(), self.stats)

    def after_local_step(self, step: int, without_gradients: bool = False) -> bool:
        """The schedule at ``step``, after the local update: poll, land what is due, launch.
        True when a skipped window brought non-finite local weights back to ``W``. A step
        ``without_gradients`` is reported to every rank with the window and raises there."""
        self.steps_without_gradients += without_gradients
        state, clock = self.state, self.state.clock
        if state.correction is not None:
            correct_drift_(self.params, state.correction.views[:len(self.params)])
        self.link.poll()
        reset = False
        if state.window is not None and step == state.window.lands_at:
            reset = self.land(elapsed=step - state.window.launched_at)
        if clock.launches_at(step):
            covers = clock.sync_every
            self.verdicts.check_deferred(before=step)
            if clock.check_due():
                self.tuner.recheck(clock, step)
                self._set_clock(clock)
            self._launch(step, covers)
            clock.advance()
            if clock.delay == 0:
                reset = self.land(elapsed=0) or reset
        return reset

    def finish(self, steps_done: int) -> bool:
        """Land the window in flight now, ``steps_done`` steps into training (see ``land``)."""
        if self.tuner is not None:
            self.tuner.pause()   # an evaluation, a checkpoint or a commit follows: not a step's time
        window = self.state.window
        if window is None:
            self.verdicts.check_deferred()
            return False
        return self.land(elapsed=steps_done - 1 - window.launched_at)

    def _launch(self, step: int, covers: int) -> None:
        """Launch the window that ends at ``step`` (``covers`` local steps); it lands ``d`` later."""
        self.layout.check(self.local)
        state = self.state
        with record_function("ssd_allreduce.launch"):
            launch_window(self.local, state.global_, state.snapshot, state.delta)
            self.link.node_mean_buffers()
            self.stats.windows_launched += 1
            state.window = Window(step, step + state.clock.delay, covers, launch_time=time.perf_counter())
            missing, self.steps_without_gradients = self.steps_without_gradients > 0, 0
            self.link.send(state.window, missing)

    def discard_window(self) -> None:
        """Forget the window in flight without waiting for it (its collective died with a lost rank)."""
        self.state.window = self.verdicts.pending = None

    def wait(self) -> None:
        """Block until the window in flight has arrived in the delta (it is not landed)."""
        self.link.receive()

    def land(self, elapsed: int) -> bool:
        """``W += G`` (``G`` the outer step on the average ``D``, ``D`` itself by default) and the
        GLU compensation of the local tensors, unless the verdict skips the window: then a rank
        whose own weights are not finite goes back to ``W`` and True is returned."""
        window, state = self.state.window, self.state
        if window is None:
            return False
        self.wait()
        self.layout.check(self.local)
        with record_function("ssd_allreduce.land"):
            self.shards.gather_(state.delta)   # here, where every rank of the node is at the same step
            state.window = None
            if not self.verdicts.judge(window.launched_at, window.lands_at, state.delta, window.missing):
                state.keep_drift()
                return self._back_to_global_if_nonfinite()
            self.link.update_residual()
            land_window_(state, self.settings, self.params, self.buffers, self.moments, window, elapsed)
            self.stats.windows_landed += 1
            return False

    def _back_to_global_if_nonfinite(self) -> bool:
        # a node's ranks share their parameters, not their buffers: they decide alike on the former
        judged = self.params if self.shards.node_comm is not None else self.local
        with torch.no_grad():
            if all(bool(torch.isfinite(t).all()) for t in judged):
                return False
        self.reset_local_to_global()
        return True

    def position(self, step: int) -> Position:
        return self.state.position(step)

    def adopt_root_state(self, root: Position) -> None:
        """Every rank takes rank 0's SSD-SGD state (collective; rank 0's window has arrived)."""
        if not root.started:
            self.load_state_dict({})
            return
        if root.window is not None and self.shards.node_comm is not None:   # the same verdict on every rank
            raise ValueError("rank 0's SSD-SGD state has a window in flight whose averaged delta is spread over "
                             "its node's ranks (hierarchical SSD-SGD): load every rank's own checkpoint on every "
                             "rank, or save after optimizer.finish() on every rank")
        if not self.state.started:
            if self.moments is not None and root.moments is not None:   # rank 0's, not the ones held here
                self.moments.restore(root.moments)
            self._allocate()
        self.state.adopt(self.comm, root, self.name)
        self._set_clock(self.state.clock)

    def state_dict(self) -> dict[str, Any]:
        """The state, with a window in flight waited for, not landed: a resumed run lands it at
        the same step."""
        self.wait()
        self.verdicts.check_deferred()
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ``{}`` resets to before ``start()``. A deferred
        check still unread is read first: a failed landing is reported, not forgotten."""
        if self.state.window is not None and self.state.window.inflight is not None:
            raise RuntimeError("load_state_dict() while a window is in flight: call finish() first")
        self.verdicts.check_deferred()
        self.state.load_state_dict(state)
        if self.state.started:
            self._rehearse()
            self._set_clock(self.state.clock)

    def _set_clock(self, clock: WindowClock) -> None:
        """Use ``clock``; ``stats`` shows its window."""
        self.state.clock = clock
        self.stats.sync_every, self.stats.delay = clock.sync_every, clock.delay
