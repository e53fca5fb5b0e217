"""Wire compression for allreduces, interchangeable with ``horovod.torch.Compression``."""
from __future__ import annotations

from typing import Any

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
