"""Wire compression for allreduces, interchangeable with ``horovod.torch.Compression``."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


class NoneCompressor:
    """Send tensors as they are."""

    @staticmethod
    def compress(tensor: Tensor) -> tuple[Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: Tensor, ctx: Any) -> Tensor:
        return tensor


class FP16Compressor:
    """Send floating-point tensors as float16 (half the bytes)."""

    @staticmethod
    def compress(tensor: Tensor) -> tuple[Tensor, Any]:
        if tensor.dtype.is_floating_point and tensor.dtype != torch.float16:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: Tensor, ctx: Any) -> Tensor:
        return tensor if ctx is None else tensor.to(ctx)


class Compression:
    """``Compression.none`` and ``Compression.fp16``; Horovod's classes work too."""

    none = NoneCompressor
    fp16 = FP16Compressor


def compression_name(compression: Any) -> str:
    """A name that is the same on every rank for the same wire format (class or instance)."""
    return compression.__name__ if isinstance(compression, type) else type(compression).__name__


def compress(compression: Any, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Any]]:
    """The tensors to send and the contexts ``decompress_into_`` needs to restore them."""
    pairs = [compression.compress(t) for t in tensors]
    return [w for w, _ in pairs], [c for _, c in pairs]


def decompress_into_(compression: Any, targets: Sequence[Tensor], wire: Sequence[Tensor],
                     contexts: Sequence[Any]) -> None:
    """Write the received ``wire`` tensors back into ``targets`` (a no-op where they are the same)."""
    with torch.no_grad():
        for t, w, c in zip(targets, wire, contexts):
            if w is not t:
                t.copy_(compression.decompress(w, c))
