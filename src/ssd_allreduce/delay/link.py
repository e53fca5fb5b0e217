"""How one window's delta leaves this rank and comes back averaged: the node's mean of the
buffers (hierarchical SSD-SGD), the error feedback of a lossy wire format, the transport's
collectives, polling them between steps and waiting for them at the landing."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch.profiler import record_function

from ..comm import ReduceOp
from ..stats import SSDStats
from . import feedback
from .state import DelayState, Window
from .transport import NodeShards, Transport
from .tuner import WindowTuner


class WindowLink:
    """The collectives of the window in ``state.window`` for the local tensors, ``params`` of them
    parameters: ``send`` at the launch, ``poll`` between steps, ``receive`` before the landing."""

    def __init__(self, state: DelayState, transport: Transport, shards: NodeShards, compression: Any,
                 stats: SSDStats, tuner: Optional[WindowTuner], params: int, name: str, buffers: int = 0) -> None:
        self.state, self.transport, self.shards, self.compression = state, transport, shards, compression
        self.stats, self.tuner, self.params, self.name, self.buffers = stats, tuner, params, name, buffers
        self._lossy: Optional[bool] = None   # the wire format rounds the delta (known at the first send)

    def wire_bytes(self) -> int:
        """Bytes a window's delta puts on the wire from this rank."""
        return self.transport.bytes_sent(self.shards.part(self.state.delta))

    def node_mean_buffers(self) -> None:
        """A node's ranks share their parameters, not their buffers' running statistics: the
        snapshot takes their mean (a small collective on the fast link) and the delta follows
        from it, so the residual recomputed from ``s - W`` at the landing is the node's. (Averaged
        moments follow the buffers; a node's ranks share them, as their gradients.)"""
        state, node, n, end = self.state, self.shards.node_comm, self.params, self.params + self.buffers
        if node is None or not self.buffers:
            return
        snapshot = state.snapshot.views[n:end]
        node.synchronize(node.allreduce_async_(snapshot, name=f"{self.name}.node_buffers", op=ReduceOp.AVERAGE))
        with torch.no_grad():
            for s, w, d in zip(snapshot, state.global_.views[n:end], state.delta.views[n:end]):
                torch.sub(s, w, out=d)

    def send(self, window: Window, missing_gradients: bool) -> None:
        """Start ``window``'s collectives on this rank's part of the delta (plus its residual)."""
        if self.transport.comm.size == 1:   # the delta is its own average: nothing to send
            return
        state = self.state
        parts = self.shards.part(state.delta)
        if self._lossy is None:
            self._lossy = feedback.is_lossy(self.compression, parts)
        if self._lossy:
            feedback.add_residual_(parts, self.shards.part(state.ensure_residual()))
        window.inflight = self.transport.send(parts, missing_gradients)
        self.stats.bytes_allreduced += self.transport.payload(window.inflight)

    def poll(self) -> None:
        """Look at the window in flight without blocking (the tuner learns when it arrived)."""
        window = self.state.window
        if window is None or window.inflight is None:
            return
        if not self.transport.arrived(window.inflight):
            self.stats.polls_pending += 1
        elif not window.seen_arrived:
            window.seen_arrived = True
            self._arrived(window)

    def receive(self) -> None:
        """Block until the window in flight has arrived in the delta (it is not landed)."""
        window = self.state.window
        if window is None or window.inflight is None:
            return
        with record_function("ssd_allreduce.wait"):
            t0 = time.perf_counter()
            self.transport.receive(window.inflight, self.shards.part(self.state.delta))
            if not window.seen_arrived:
                self._arrived(window)
            window.missing, window.inflight = window.inflight.flag, None
            self.stats.comm_wait_seconds += time.perf_counter() - t0

    def update_residual(self) -> None:
        """At a landing that reaches ``W``, before ``W`` moves: the residual becomes what the
        wire format lost of what this window sent."""
        state = self.state
        if state.residual is not None:
            part = self.shards.part
            feedback.update_residual_(self.compression, part(state.residual), part(state.snapshot),
                                      part(state.global_))

    def _arrived(self, window: Window) -> None:
        if self.tuner is not None:
            self.tuner.window_arrived(time.perf_counter() - window.launch_time)
