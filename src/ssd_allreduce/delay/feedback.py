"""Error feedback for a lossy wire format (fp16, bf16, int8; SPEC's "Compressed deltas"): a rank
sends ``Q(x + e)`` and keeps ``e = (x + e) - Q^-1(Q(x + e))`` for its next window.

The residual changes only when the window lands. It is recomputed then from ``s - W + e``, which
are untouched while the window is in flight (the same operations on the same values, so the same
bits as what was sent): a window that is skipped, never reaching ``W``, leaves the residual as it
was, and a checkpoint with a window in flight holds the residual before it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..compression import Int8Compressor

# recomputed a chunk at a time (a multiple of int8's scale chunk, so its chunks are the ones sent)
CHUNK = 256 * Int8Compressor.CHUNK


def is_lossy(compression: Any, parts: Sequence[Tensor]) -> bool:
    """The format rounds ``parts`` (a lossless one sends the tensors themselves)."""
    samples = [p[:1] for p in parts if p.numel()]
    return any(compression.compress(v)[0] is not v for v in samples)


def add_residual_(parts: Sequence[Tensor], residual: Sequence[Tensor]) -> None:
    """``x + e``: what the window sends, in place of the delta."""
    with torch.no_grad():
        torch._foreach_add_(list(parts), list(residual))


def update_residual_(compression: Any, residual: Sequence[Tensor], snapshot: Sequence[Tensor],
                     global_: Sequence[Tensor]) -> None:
    """At a landing, before ``W`` moves: ``e = y - Q^-1(Q(y))`` with ``y = (s - W) + e``."""
    with torch.no_grad():
        for e, s, w in zip(residual, snapshot, global_):
            for lo in range(0, e.numel(), CHUNK):
                hi = min(lo + CHUNK, e.numel())
                y = torch.sub(s[lo:hi], w[lo:hi])
                y.add_(e[lo:hi])
                sent, ctx = compression.compress(y)
                torch.sub(y, compression.decompress(sent, ctx), out=e[lo:hi])
