"""The steps-delay stage on one rank: the global weights ``W``, the snapshot ``s`` and the window in
flight. Launch, poll, land and finish a window; save and restore all of it.

The math is ``algorithm``'s; this module owns the state and the order of operations around the
communicator (SPEC: land the window due at a step before launching the one ending there).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from .algorithm import FlatSpace, apply_global_update_, compensate_local_, launch_window
from .comm import Communicator, Handle, ReduceOp, payload_bytes
from .compression import compress, decompress_into_
from .settings import SSDSettings
from .stats import SSDStats

@dataclass
class Window:
    """A launched window: in flight while ``handle`` is set, then its result sits in the delta.
    ``flag`` travels with it: the share of ranks that stepped without gradients in the window."""

    launched_at: int
    handle: Optional[Handle]
    wire: list[Tensor]
    contexts: list[Any]
    flag: Optional[Tensor] = None


MISSING_GRADIENTS = ("{n} of {size} ranks called optimizer.step() without any gradient at or before step "
                     "{step}: call loss.backward() before optimizer.step() on every rank")


class DelayStage:
    """SSD-SGD after the warm-up, for the local tensors ``params`` then ``buffers`` (in an order
    every rank shares). Nothing is allocated until ``start()``. Collectives are named
    ``{name}.delta`` and ``{name}.global_weights``: ``name`` must be the same on every rank and
    differ between the optimizers of one process."""

    def __init__(self, comm: Communicator, settings: SSDSettings, params: Sequence[Tensor],
                 buffers: Sequence[Tensor], compression: Any, stats: SSDStats, name: str = "ssd",
                 tensor_names: Optional[Sequence[str]] = None) -> None:
        self.comm, self.settings, self.compression, self.stats = comm, settings, compression, stats
        self.name = name
        self.params, self.buffers = list(params), list(buffers)
        self.tensor_names = list(tensor_names or (f"tensor #{i}" for i in range(len(self.local))))
        self.layout = [(t.dtype, t.device) for t in self.local]
        self.global_: Optional[FlatSpace] = None
        self.snapshot: Optional[FlatSpace] = None
        self.delta: Optional[FlatSpace] = None
        self.residual: Optional[FlatSpace] = None   # error feedback of a lossy wire format
        self.window: Optional[Window] = None
        self.skipped_in_a_row = 0
        self.steps_without_gradients = 0   # on this rank, since the last launch

    @property
    def local(self) -> list[Tensor]:
        return self.params + self.buffers

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
        local = self.local
        self.global_, self.snapshot, self.delta = FlatSpace(local), FlatSpace(local), FlatSpace(local)

    def start(self) -> None:
        """End of warm-up: ``W`` = rank 0's weights, bit-identical everywhere, and ``w = W``."""
        self.check_layout()
        self._allocate()
        self.global_.copy_from_(self.local)
        self.comm.broadcast_(self.global_.buffers, root_rank=0, name=f"{self.name}.global_weights")
        with torch.no_grad():
            torch._foreach_copy_(self.local, self.global_.views)

    def after_local_step(self, step: int, without_gradients: bool = False) -> bool:
        """The schedule at ``step``, after the local update: poll, land what is due, launch.
        True when a skipped window brought non-finite local weights back to ``W``. A step
        ``without_gradients`` is reported to every rank with the window and raises there."""
        sched = self.settings.schedule
        self.steps_without_gradients += without_gradients
        self._poll()
        reset = sched.lands_at(step) and self.land(elapsed=sched.delay)
        if sched.launches_at(step):
            self._launch(step)
            if sched.delay == 0:
                reset = self.land(elapsed=0) or reset
        return reset

    def finish(self, steps_done: int) -> bool:
        """Land the window in flight now, ``steps_done`` steps into training (see ``land``)."""
        if self.window is None:
            return False
        return self.land(elapsed=steps_done - 1 - self.window.launched_at)

    def _launch(self, step: int) -> None:
        self.check_layout()
        with record_function("ssd_allreduce.launch"):
            launch_window(self.local, self.global_, self.snapshot, self.delta)
            self.stats.windows_launched += 1
            if self.comm.size == 1:   # the delta is its own average: nothing to send or wait for
                self.window = Window(step, None, [], [])
                return
            wire, contexts = self._compress_with_feedback()
            flag = torch.full((1,), float(self.steps_without_gradients > 0), dtype=wire[0].dtype,
                              device=wire[0].device)
            self.steps_without_gradients = 0
            handle = self.comm.allreduce_async_(wire + [flag], name=f"{self.name}.delta", op=ReduceOp.AVERAGE)
            self.window = Window(step, handle, wire, contexts, flag)
            self.stats.bytes_allreduced += payload_bytes(wire)

    def _compress_with_feedback(self) -> tuple[list[Tensor], list[Any]]:
        """The delta on the wire. A lossy format keeps what rounding lost in ``residual`` and adds
        it to the next window's delta (SPEC's error feedback: lost for one window, not for good)."""
        if self.residual is not None:
            torch._foreach_add_(self.delta.buffers, self.residual.buffers)
        wire, contexts = compress(self.compression, self.delta.buffers)
        if any(w is not d for w, d in zip(wire, self.delta.buffers)):
            if self.residual is None:
                self.residual = FlatSpace(self.local)
            with torch.no_grad():
                for e, d, w, c in zip(self.residual.buffers, self.delta.buffers, wire, contexts):
                    torch.sub(d, self.compression.decompress(w, c), out=e)
        return wire, contexts

    def discard_window(self) -> None:
        """Forget the window in flight without waiting for it (its collective died with a lost rank)."""
        self.window = None

    def _poll(self) -> None:
        if self.window is not None and self.window.handle is not None:
            if not self.comm.poll(self.window.handle):
                self.stats.polls_pending += 1

    def wait(self) -> None:
        """Block until the window in flight has arrived in the delta (it is not landed)."""
        window = self.window
        if window is None or window.handle is None:
            return
        with record_function("ssd_allreduce.wait"):
            t0 = time.perf_counter()
            self.comm.synchronize(window.handle)
            decompress_into_(self.compression, self.delta.buffers, window.wire, window.contexts)
            window.handle, window.wire = None, []
            self.stats.comm_wait_seconds += time.perf_counter() - t0

    def land(self, elapsed: int) -> bool:
        """``W += D`` and the GLU compensation of the local tensors. A non-finite ``D`` never
        reaches ``W``: it raises, or (``nonfinite="skip"``) the window is skipped and a rank whose
        own weights are not finite goes back to ``W``; returns True then."""
        window = self.window
        if window is None:
            return False
        self.wait()
        with record_function("ssd_allreduce.land"):
            self.window = None
            if window.flag is not None and float(window.flag) > 0:
                raise RuntimeError(MISSING_GRADIENTS.format(n=round(float(window.flag) * self.comm.size),
                                                            size=self.comm.size, step=window.launched_at))
            if not self.delta.is_finite():
                return self._skip(window)
            self.skipped_in_a_row = 0
            apply_global_update_(self.global_, self.delta)
            compensate_local_(self.params, self.buffers, self.global_, self.snapshot, self.delta,
                              glu_beta=self.settings.glu_beta, elapsed=elapsed,
                              sync_every=self.settings.sync_every,
                              compensation=self.settings.compensation)
            self.stats.windows_landed += 1
            return False

    def _skip(self, window: Window) -> bool:
        message = (f"the averaged model delta of the window launched at step {window.launched_at} is not "
                   "finite (NaN or Inf on some rank)")
        limit = self.settings.max_skipped_windows
        if self.settings.nonfinite == "raise":
            raise FloatingPointError(message + ": lower the learning rate or clip gradients, or pass "
                                     "nonfinite='skip' to skip such windows; the global weights were not updated")
        self.skipped_in_a_row += 1
        self.stats.windows_skipped += 1
        if self.skipped_in_a_row > limit:
            raise FloatingPointError(f"{message}, and so were the {limit} windows before it: training "
                                     "diverges; lower the learning rate or clip gradients")
        warnings.warn(message + "; window skipped, global weights unchanged")
        with torch.no_grad():
            if all(bool(torch.isfinite(t).all()) for t in self.local):
                return False
            torch._foreach_copy_(self.local, self.global_.views)
        return True

    @property
    def position(self) -> tuple[bool, Optional[int], int]:
        """(delay stage started, step its window in flight was launched at, windows skipped in a
        row) for cross-rank checks."""
        return self.started, None if self.window is None else self.window.launched_at, self.skipped_in_a_row

    def adopt_root_state(self, root_position: tuple[bool, Optional[int], int]) -> None:
        """Every rank takes rank 0's ``W`` and window (collective; rank 0's window has arrived)."""
        started, launched_at, skipped_in_a_row = root_position
        self.skipped_in_a_row = skipped_in_a_row
        if not started:
            self.load_state_dict({})
            return
        if not self.started:
            self._allocate()
        self.comm.broadcast_(self.global_.buffers, root_rank=0, name=f"{self.name}.adopt.global_weights")
        self.window = None
        if launched_at is not None:
            self.comm.broadcast_(self.snapshot.buffers + self.delta.buffers, root_rank=0,
                                 name=f"{self.name}.adopt.window")
            self.window = Window(launched_at, None, [], [])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``W`` and the window (its snapshot and delta); a window in flight is waited for, not
        landed, so a resumed run lands it at the same step."""
        self.wait()
        window = self.window
        return {
            "skipped_in_a_row": self.skipped_in_a_row,
            "residual": None if self.residual is None else list(self.residual.buffers),
            "global_weights": None if self.global_ is None else list(self.global_.buffers),
            "window": None if window is None else {
                "launched_at": window.launched_at,
                "snapshot": list(self.snapshot.buffers),
                "delta": list(self.delta.buffers)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ``{}`` (or None values) resets to before ``start()``."""
        if self.window is not None and self.window.handle is not None:
            raise RuntimeError("load_state_dict() while a window is in flight: call finish() first")
        self.global_ = self.snapshot = self.delta = self.window = self.residual = None
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        if state.get("residual") is not None:
            self.residual = FlatSpace(self.local)
            _copy_buffers(self.residual.buffers, state["residual"], "residual")
        if state.get("global_weights") is None:
            return
        self._allocate()
        _copy_buffers(self.global_.buffers, state["global_weights"], "global_weights")
        window = state.get("window")
        if window is not None:
            _copy_buffers(self.snapshot.buffers, window["snapshot"], "snapshot")
            _copy_buffers(self.delta.buffers, window["delta"], "delta")
            self.window = Window(int(window["launched_at"]), None, [], [])


def _copy_buffers(dst: list[Tensor], src: Sequence[Tensor], what: str) -> None:
    if len(dst) != len(src) or any(d.shape != s.shape or d.dtype != s.dtype for d, s in zip(dst, src)):
        raise ValueError(f"the checkpoint's {what} do not match this model's tensors (same names, other "
                         "shapes or dtypes): load it into the same model built the same way")
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)
