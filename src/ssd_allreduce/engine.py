"""The steps-delay stage on one rank: the global weights ``W``, the snapshot ``s`` and the window in
flight. Launch, poll, land and finish a window; save and restore all of it.

The math is ``algorithm``'s; this module owns the state and the order of operations around the
communicator (SPEC: land the window due at a step before launching the one ending there).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from .algorithm import FlatSpace, apply_global_update_, compensate_local_, launch_window
from .autotune import WindowClock, WindowTuner, timed
from .comm import Communicator, ReduceOp, payload_bytes
from .compression import compress, decompress_into_, reduces_by_gather, wire_bytes
from .settings import AUTO, SSDSettings
from .stats import SSDStats
from .topology import Hierarchy
from .window import NONFINITE_ADVICE, DeferredVerdict, GatherHandles, Window, missing_gradients


class DelayStage:
    """SSD-SGD after the warm-up, for the local tensors ``params`` then ``buffers`` (in an order
    every rank shares). Nothing is allocated until ``start()``. Collectives are named
    ``{name}.delta`` and ``{name}.global_weights``: ``name`` must be the same on every rank and
    differ between the optimizers of one process.

    With a ``hierarchy`` the windows run between nodes: every rank of a node holds the same
    weights, so each carries its shard of the node's delta across nodes (``hierarchy.cross``) and
    the shards are gathered inside the node (``hierarchy.node``) when the window lands."""

    def __init__(self, comm: Communicator, settings: SSDSettings, params: Sequence[Tensor],
                 buffers: Sequence[Tensor], compression: Any, stats: SSDStats, name: str = "ssd",
                 tensor_names: Optional[Sequence[str]] = None, hierarchy: Optional[Hierarchy] = None) -> None:
        self.comm, self.settings, self.compression, self.stats = comm, settings, compression, stats
        self.window_comm = hierarchy.cross if hierarchy is not None else comm
        self.node_comm = hierarchy.node if hierarchy is not None and hierarchy.node.size > 1 else None
        self.shard = hierarchy.shard if hierarchy is not None else (0, 1)
        self.name = name
        self.params, self.buffers = list(params), list(buffers)
        self.tensor_names = list(tensor_names or (f"tensor #{i}" for i in range(len(self.local))))
        self.layout = [(t.dtype, t.device) for t in self.local]
        self.global_: Optional[FlatSpace] = None
        self.snapshot: Optional[FlatSpace] = None
        self.delta: Optional[FlatSpace] = None
        self.residual: Optional[FlatSpace] = None   # error feedback of a lossy wire format
        self.window: Optional[Window] = None
        self.clock: Optional[WindowClock] = None    # set by ``start()``
        self.tuner = (WindowTuner(comm, None if settings.sync_every == AUTO else settings.sync_every,
                                  settings.max_sync_every, settings.delay == AUTO) if settings.auto else None)
        self.verdict: Optional[DeferredVerdict] = None
        self._windows_seen = 0   # launches + landings by the last step's end (the tuner's window steps)
        self.defer_checks: Optional[bool] = None   # None: decided by ``defers_checks``
        self.skipped_in_a_row = 0
        self.steps_without_gradients = 0   # on this rank, since the last launch

    @property
    def local(self) -> list[Tensor]:
        return self.params + self.buffers

    @property
    def gathers(self) -> bool:
        """The wire format cannot be summed (int8): ranks gather each other's deltas."""
        return reduces_by_gather(self.compression)

    @property
    def started(self) -> bool:
        return self.global_ is not None

    @property
    def in_flight(self) -> bool:
        return self.window is not None

    @property
    def extra_state_bytes(self) -> int:
        """W, the snapshot and the in-flight buffer: 0 before ``start()``, then 3 model copies (4
        with a lossy wire format: its residual)."""
        spaces = (self.global_, self.snapshot, self.delta, self.residual)
        return sum(s.nbytes for s in spaces if s is not None)

    def check_layout(self) -> None:
        """Raise if a tensor changed dtype or device since the optimizer was built: moving or
        casting the model (``.cuda()``, ``.to()``, ``.half()``) replaces its buffers, so the ones
        held here would no longer be the model's."""
        for name, t, (dtype, device) in zip(self.tensor_names, self.local, self.layout):
            if (t.dtype, t.device) != (dtype, device):
                raise RuntimeError(
                    f"{name} is now {t.dtype} on {t.device}, it was {dtype} on {device} when the optimizer "
                    "was built: the model was moved or cast after wrapping (model.cuda(), .to(), .half()), "
                    "which replaces its buffers. Move or cast the model first, then build the optimizer, "
                    "as Horovod's examples do")

    def _allocate(self) -> None:
        """W, the snapshot and the delta (at the start, a resume or an adoption of rank 0's state)."""
        local = self.local
        self.global_, self.snapshot, self.delta = FlatSpace(local), FlatSpace(local), FlatSpace(local)
        self._rehearse()

    def start(self, step: int) -> None:
        """End of warm-up, at ``step``: ``W`` = rank 0's weights, bit-identical everywhere, and
        ``w = W``; the window is chosen now where it is "auto"."""
        self.check_layout()
        limit = getattr(self.compression, "GATHER_LIMIT", None)
        if self.gathers and limit and self.window_comm.size >= limit:
            warnings.warn(f"{self.window_comm.size} ranks gather each other's int8 deltas: from "
                          f"{limit} ranks on that moves more bytes than a float32 "
                          "allreduce; use compression=Compression.bf16 or fp16 at this scale")
        self._allocate()
        self.global_.copy_from_(self.local)
        self.comm.broadcast_(self.global_.buffers, root_rank=0, name=f"{self.name}.global_weights")
        with torch.no_grad():
            torch._foreach_copy_(self.local, self.global_.views)
        if self.tuner is not None:
            k, d = self.tuner.initial(step, self.wire_bytes(), self._dry_window_seconds())
        else:
            k, d = self.settings.sync_every, self.settings.delay
        self._set_clock(WindowClock(k, d, step + k - 1))

    def _rehearse(self) -> None:
        """Run a window's device work once on tiny stand-ins of the tensors (same dtypes and
        devices, so the same kernels, as far as they do not depend on sizes). CUDA loads a kernel
        at its first launch: unrehearsed, the first landing took 0.1 s longer on an H200, 3 % of a
        100-step benchmark."""
        if not any(t.is_cuda for t in self.local):
            return
        tiny = [t.new_zeros(4) for t in self.local]
        global_, snapshot, delta = FlatSpace(tiny), FlatSpace(tiny), FlatSpace(tiny)
        launch_window(tiny, global_, snapshot, delta)
        wire, contexts = compress(self.compression, delta.buffers)
        if self.gathers:   # what the landing of gathered deltas does with two ranks' copies
            for d, w, c in zip(delta.buffers, wire, contexts):
                d.copy_(self.compression.mean_of_gathered(torch.cat([w, w]), 2, c))
        else:
            decompress_into_(self.compression, delta.buffers, wire, contexts)
        DeferredVerdict(0, 0, delta.zero_unless_finite_(), None).read()
        apply_global_update_(global_, delta)
        n = len(self.params)
        compensate_local_(tiny[:n], tiny[n:], global_, snapshot, delta, glu_beta=self.settings.glu_beta,
                          elapsed=1, sync_every=2, compensation=self.settings.compensation)

    def wire_bytes(self) -> int:
        """Bytes a window's delta puts on the wire from this rank (its compressed payload); a
        gathered format receives ``size - 1`` times that, which a ring allreduce does not."""
        # hierarchical: the node's ranks send their shards through the node's one link
        sent = sum(wire_bytes(self.compression, b.numel(), b.dtype) for b in self.delta.buffers)
        return round(sent * max(1.0, self.window_comm.size / 2)) if self.gathers else sent

    def _part(self, space: FlatSpace) -> list[Tensor]:
        """The views of ``space``'s buffers this rank sends: all of them, or its shard of each
        (the last shards shorter; an empty one is left out, alike on every node)."""
        which, of = self.shard
        if of == 1:
            return space.buffers
        parts = []
        for b in space.buffers:
            lo, hi = _shard_bounds(b.numel(), which, of)
            if hi > lo:
                parts.append(b[lo:hi])
        return parts

    def _dry_window_seconds(self) -> float:
        """A window's host cost, estimated before the first: a launch timed on the scratch
        buffers (unused until then), and the landing's passes counted as 1.5 launches."""
        launch = timed(lambda: launch_window(self.local, self.global_, self.snapshot, self.delta))
        return 2.5 * launch

    def step_done(self) -> None:
        """The end of a training step (the tuner times steps)."""
        if self.tuner is not None:
            windows = self.stats.windows_launched + self.stats.windows_landed
            self.tuner.step_done(time.perf_counter(), self.stats.comm_wait_seconds, windows != self._windows_seen)
            self._windows_seen = windows

    def after_local_step(self, step: int, without_gradients: bool = False) -> bool:
        """The schedule at ``step``, after the local update: poll, land what is due, launch.
        True when a skipped window brought non-finite local weights back to ``W``. A step
        ``without_gradients`` is reported to every rank with the window and raises there."""
        self.steps_without_gradients += without_gradients
        self._poll()
        clock = self.clock
        reset = False
        if self.window is not None and step == self.window.lands_at:
            reset = self.land(elapsed=step - self.window.launched_at)
        if step == clock.next_launch:
            covers = clock.sync_every
            self.check_deferred(before=step)
            if self.tuner is not None and self.tuner.due(clock.launches):
                clock.sync_every, clock.delay = self.tuner.retune(step, clock.sync_every, clock.delay)
                self._set_clock(clock)
            self._launch(step, covers)
            clock.next_launch = step + clock.sync_every
            clock.launches += 1
            if clock.delay == 0:
                reset = self.land(elapsed=0) or reset
        return reset

    def finish(self, steps_done: int) -> bool:
        """Land the window in flight now, ``steps_done`` steps into training (see ``land``)."""
        if self.window is None:
            self.check_deferred()
            return False
        return self.land(elapsed=steps_done - 1 - self.window.launched_at)

    def _launch(self, step: int, covers: int) -> None:
        """Launch the window that ends at ``step`` (``covers`` local steps); it lands ``d`` later."""
        self.check_layout()
        with record_function("ssd_allreduce.launch"):
            launch_window(self.local, self.global_, self.snapshot, self.delta)
            if self.node_comm is not None and self.buffers:
                # a node's ranks share their parameters, not their buffers' running statistics:
                # the node's delta takes their mean (a small collective on the fast link)
                views = self.delta.views[len(self.params):]
                self.node_comm.synchronize(self.node_comm.allreduce_async_(views, name=f"{self.name}.node_buffers"))
            self.stats.windows_launched += 1
            lands_at = step + self.clock.delay
            if self.window_comm.size == 1:   # the delta is its own average: nothing to send or wait for
                self.window = Window(step, lands_at, covers)
                return
            wire, contexts = self._compress_with_feedback()
            like = wire[0] if wire else self.delta.buffers[0]
            flag = torch.full((1,), float(self.steps_without_gradients > 0), device=like.device,
                              dtype=torch.float32 if self.gathers or not wire else like.dtype)
            self.steps_without_gradients = 0
            name = f"{self.name}.delta"
            if self.gathers:   # values that cannot be summed: every rank gets every rank's
                comm = self.window_comm
                handle = GatherHandles([comm.allgather_async(w, name=f"{name}.{i}") for i, w in enumerate(wire)],
                                       comm.allreduce_async_([flag], name=f"{name}.flag", op=ReduceOp.AVERAGE))
            else:
                handle = self.window_comm.allreduce_async_(wire + [flag], name=name, op=ReduceOp.AVERAGE)
            self.window = Window(step, lands_at, covers, handle, wire, contexts, flag, time.perf_counter())
            self.stats.bytes_allreduced += payload_bytes(wire)

    def _compress_with_feedback(self) -> tuple[list[Tensor], list[Any]]:
        """The delta on the wire. A lossy format keeps what rounding lost in ``residual`` and adds
        it to the next window's delta (SPEC's error feedback: lost for one window, not for good)."""
        delta = self._part(self.delta)
        if self.residual is not None:
            torch._foreach_add_(delta, self._part(self.residual))
        wire, contexts = compress(self.compression, delta)
        if any(w is not d for w, d in zip(wire, delta)):
            if self.residual is None:
                self.residual = FlatSpace(self.local)
            with torch.no_grad():
                for e, d, w, c in zip(self._part(self.residual), delta, wire, contexts):
                    torch.sub(d, self.compression.decompress(w, c), out=e)
        return wire, contexts

    def discard_window(self) -> None:
        """Forget the window in flight without waiting for it (its collective died with a lost rank)."""
        self.window = self.verdict = None

    def _poll(self) -> None:
        handle = self.window.handle if self.window is not None else None
        if handle is None:
            return
        parts = handle.all if isinstance(handle, GatherHandles) else [handle]
        if not all([self.window_comm.poll(h) for h in parts]):   # a list: every part is polled (MPI progress)
            self.stats.polls_pending += 1
        elif self.tuner is not None and not self.window.seen_arrived:
            self.window.seen_arrived = True
            self.tuner.window_arrived(time.perf_counter() - self.window.launch_time)

    def wait(self) -> None:
        """Block until the window in flight has arrived in the delta (it is not landed)."""
        window = self.window
        if window is None or window.handle is None:
            return
        with record_function("ssd_allreduce.wait"):
            t0 = time.perf_counter()
            comm = self.window_comm
            if isinstance(window.handle, GatherHandles):
                for h in window.handle.all:
                    comm.synchronize(h)
                with torch.no_grad():
                    for d, h, c in zip(self._part(self.delta), window.handle.gathers, window.contexts):
                        d.copy_(self.compression.mean_of_gathered(comm.gathered(h), comm.size, c))
            else:
                comm.synchronize(window.handle)
                decompress_into_(self.compression, self._part(self.delta), window.wire, window.contexts)
            if self.tuner is not None and not window.seen_arrived:
                self.tuner.window_arrived(time.perf_counter() - window.launch_time)
            window.handle, window.wire = None, []
            self.stats.comm_wait_seconds += time.perf_counter() - t0

    def _gather_shards(self) -> None:
        """Every rank of the node takes the others' averaged shards: the whole averaged delta.
        Until then a rank's delta holds its own shard averaged (also in a checkpoint)."""
        which, of = self.shard
        comm = self.node_comm
        handles = []
        with torch.no_grad():
            for i, b in enumerate(self.delta.buffers):
                lo, hi = _shard_bounds(b.numel(), which, of)
                mine = b.new_zeros(-(-b.numel() // of))   # equal lengths for the gather
                mine[:hi - lo].copy_(b[lo:hi])
                handles.append((b, comm.allgather_async(mine, name=f"{self.name}.shards.{i}")))
            for b, h in handles:
                comm.synchronize(h)
                b.copy_(comm.gathered(h)[:b.numel()])

    def land(self, elapsed: int) -> bool:
        """``W += D`` and the GLU compensation of the local tensors. A non-finite ``D`` never
        reaches ``W``: it raises, or (``nonfinite="skip"``) the window is skipped and a rank whose
        own weights are not finite goes back to ``W``; returns True then. Where the check is
        deferred (``defers_checks``), a non-finite ``D`` lands as zero and raises a few steps later."""
        window = self.window
        if window is None:
            return False
        self.wait()
        self.check_layout()
        with record_function("ssd_allreduce.land"):
            if self.node_comm is not None:   # here, where every rank of the node is at the same step
                self._gather_shards()
            self.window = None
            self.check_deferred()
            if self.defers_checks:
                finite = self.delta.zero_unless_finite_()
                self.verdict = DeferredVerdict(window.launched_at, window.lands_at, finite, window.flag)
            else:
                if window.flag is not None and float(window.flag) > 0:
                    self._raise_missing_gradients(window.launched_at, float(window.flag))
                if not self.delta.is_finite():
                    return self._skip(window)
            self.skipped_in_a_row = 0
            apply_global_update_(self.global_, self.delta)
            compensate_local_(self.params, self.buffers, self.global_, self.snapshot, self.delta,
                              glu_beta=self.settings.glu_beta, elapsed=elapsed,
                              sync_every=window.sync_every,
                              compensation=self.settings.compensation)
            self.stats.windows_landed += 1
            return False

    @property
    def defers_checks(self) -> bool:
        """Read a landing's checks on the host later, not at the landing: on CUDA with
        ``nonfinite="raise"``, where reading them at once would drain the device's queue."""
        if self.defer_checks is not None:
            return self.defer_checks
        return self.settings.nonfinite == "raise" and self.global_.buffers[0].is_cuda

    def check_deferred(self, before: Optional[int] = None) -> None:
        """Raise if the last landing's deferred checks failed. Called where every rank is at the
        same point (a landing, a launch after the landing's step, finish, a save), never when a
        rank's own device happens to be done, so ranks stop together; by then the result has
        long arrived. ``before``: only a landing made before that step."""
        verdict = self.verdict
        if verdict is None or (before is not None and verdict.landed_at >= before):
            return
        self.verdict = None
        finite, missing = verdict.read()
        if missing > 0:
            self._raise_missing_gradients(verdict.launched_at, missing)
        if not finite:
            raise FloatingPointError(self._nonfinite_message(verdict.launched_at) + NONFINITE_ADVICE)

    def _raise_missing_gradients(self, launched_at: int, share: float) -> None:
        size = self.window_comm.size   # hierarchical: the flag is a node's
        raise RuntimeError(missing_gradients(round(share * size), size, launched_at,
                                             "ranks" if self.window_comm is self.comm else "nodes"))

    @staticmethod
    def _nonfinite_message(launched_at: int) -> str:
        return (f"the averaged model delta of the window launched at step {launched_at} is not "
                "finite (NaN or Inf on some rank)")

    def _skip(self, window: Window) -> bool:
        message = self._nonfinite_message(window.launched_at)
        limit = self.settings.max_skipped_windows
        if self.settings.nonfinite == "raise":
            raise FloatingPointError(message + NONFINITE_ADVICE)
        self.skipped_in_a_row += 1
        self.stats.windows_skipped += 1
        if self.skipped_in_a_row > limit:
            raise FloatingPointError(f"{message}, and so were the {limit} windows before it: training "
                                     "diverges; lower the learning rate or clip gradients")
        warnings.warn(message + "; window skipped, global weights unchanged")
        # a node's ranks share their parameters, not their buffers: they decide alike on the former
        judged = self.params if self.node_comm is not None else self.local
        with torch.no_grad():
            if all(bool(torch.isfinite(t).all()) for t in judged):
                return False
            torch._foreach_copy_(self.local, self.global_.views)
        return True

    @property
    def position(self) -> tuple[bool, Optional[tuple[int, int, int]], int, Optional[tuple[int, int, int]]]:
        """(delay stage started, the window in flight (launched at, lands at, steps it covers),
        windows skipped in a row, the clock (k, d, next launch)) for cross-rank checks."""
        return (self.started, None if self.window is None else self.window.describe(), self.skipped_in_a_row,
                None if self.clock is None else self.clock.as_tuple())

    def adopt_root_state(self, root_position: tuple) -> None:
        """Every rank takes rank 0's ``W``, window and clock (collective; rank 0's window has arrived)."""
        started, window, skipped_in_a_row, clock = root_position
        self.skipped_in_a_row = skipped_in_a_row
        if not started:
            self.load_state_dict({})
            return
        if window is not None and self.node_comm is not None:   # the same verdict on every rank
            raise ValueError("rank 0's SSD-SGD state has a window in flight whose averaged delta is spread over "
                             "its node's ranks (hierarchical SSD-SGD): load every rank's own checkpoint on every "
                             "rank, or save after optimizer.finish() on every rank")
        if not self.started:
            self._allocate()
        self.comm.broadcast_(self.global_.buffers, root_rank=0, name=f"{self.name}.adopt.global_weights")
        self.window = None
        self._set_clock(WindowClock(*clock))
        if window is not None:
            self.comm.broadcast_(self.snapshot.buffers + self.delta.buffers, root_rank=0,
                                 name=f"{self.name}.adopt.window")
            self.window = Window(*window)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``W``, the clock and the window (its snapshot and delta); a window in flight is waited
        for, not landed, so a resumed run lands it at the same step."""
        self.wait()
        self.check_deferred()
        window = self.window
        return {
            "skipped_in_a_row": self.skipped_in_a_row,
            "residual": None if self.residual is None else list(self.residual.buffers),
            "global_weights": None if self.global_ is None else list(self.global_.buffers),
            "clock": None if self.clock is None else list(self.clock.as_tuple()),
            "window": None if window is None else {
                "launched_at": window.launched_at,
                "lands_at": window.lands_at,
                "sync_every": window.sync_every,
                "snapshot": list(self.snapshot.buffers),
                "delta": list(self.delta.buffers),
                "shard": list(self.shard)},   # hierarchical: the delta's averaged part is this shard
        }

    def load_state_dict(self, state: dict[str, Any], step: int = 0) -> None:
        """Restore ``state_dict()``'s output at ``step``; ``{}`` (or None values) resets to before
        ``start()``. A state without the clock (an earlier release's, fixed k and d) gets the
        fixed schedule's."""
        if self.window is not None and self.window.handle is not None:
            raise RuntimeError("load_state_dict() while a window is in flight: call finish() first")
        self.global_ = self.snapshot = self.delta = self.window = self.residual = self.verdict = None
        self.clock = None
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        if state.get("residual") is not None:
            self.residual = FlatSpace(self.local)
            _copy_buffers(self.residual.buffers, state["residual"], "residual")
        if state.get("global_weights") is None:
            return
        self._allocate()
        _copy_buffers(self.global_.buffers, state["global_weights"], "global_weights")
        self._set_clock(WindowClock(*state["clock"]) if state.get("clock") else self._fixed_clock(step))
        k, d = self.clock.sync_every, self.clock.delay
        window = state.get("window")
        if window is not None:
            if tuple(window.get("shard", (0, 1))) != self.shard:
                raise ValueError(f"the checkpoint's window in flight was averaged as shard {window.get('shard')} of "
                                 f"its node's delta, this rank carries shard {list(self.shard)}: resume with as many "
                                 "ranks per node as before, or from a checkpoint saved after optimizer.finish()")
            _copy_buffers(self.snapshot.buffers, window["snapshot"], "snapshot")
            _copy_buffers(self.delta.buffers, window["delta"], "delta")
            launched_at = int(window["launched_at"])
            self.window = Window(launched_at, int(window.get("lands_at", launched_at + d)),
                                 int(window.get("sync_every", k)))

    def _set_clock(self, clock: WindowClock) -> None:
        """Use ``clock``; ``stats`` shows its window."""
        self.clock = clock
        self.stats.sync_every, self.stats.delay = clock.sync_every, clock.delay

    def _fixed_clock(self, step: int) -> WindowClock:
        """The fixed schedule's clock at ``step``: its next launch at or after it."""
        k, d, warmup = self.settings.sync_every, self.settings.delay, self.settings.warmup_steps
        first = warmup + k - 1
        return WindowClock(k, d, first + k * max(0, -(-(step - first) // k)))


def _copy_buffers(dst: list[Tensor], src: Sequence[Tensor], what: str) -> None:
    if len(dst) != len(src) or any(d.shape != s.shape or d.dtype != s.dtype for d, s in zip(dst, src)):
        raise ValueError(f"the checkpoint's {what} do not match this model's tensors (same names, other "
                         "shapes or dtypes): load it into the same model built the same way")
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


def _shard_bounds(numel: int, which: int, of: int) -> tuple[int, int]:
    """[lo, hi) of shard ``which`` of ``of`` equal shards (the last ones shorter or empty)."""
    chunk = -(-numel // of)
    lo = min(which * chunk, numel)
    return lo, min(lo + chunk, numel)
