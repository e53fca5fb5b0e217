"""Wire formats of the collectives. ``none`` and ``fp16`` are interchangeable with
``horovod.torch.Compression``'s; ``bf16`` and ``int8`` are this library's."""
from __future__ import annotations

import math
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


class BF16Compressor(FP16Compressor):
    """Send floating-point tensors as bfloat16 (half the bytes, float32's range)."""

    @staticmethod
    def compress(tensor: Tensor) -> tuple[Tensor, Any]:
        if tensor.dtype.is_floating_point and tensor.dtype != torch.bfloat16:
            return tensor.to(torch.bfloat16), tensor.dtype
        return tensor, None


class Int8Compressor:
    """Send model deltas as int8 with one float32 scale per chunk of ``CHUNK`` elements (a quarter
    of float32's bytes). Quantized values cannot be summed, so ranks gather each other's (an
    allgather, ``reduces_by_gather``) and every rank dequantizes and sums them in rank order: the
    same bytes and the same operations give the same result everywhere. Warm-up gradients, which
    have no error feedback, go as ``gradient_compressor`` (float16)."""

    CHUNK = 1024
    GATHER_LIMIT = 8   # from this many ranks a gather moves more bytes than a float32 allreduce
    reduces_by_gather = True
    gradient_compressor = FP16Compressor

    @classmethod
    def compress(cls, tensor: Tensor) -> tuple[Tensor, Any]:
        """One int8 tensor: the rounded values, then the chunks' scales' bytes."""
        flat = tensor.detach().reshape(-1).float()
        chunks = -(-flat.numel() // cls.CHUNK)
        padded = torch.zeros(chunks * cls.CHUNK, device=flat.device)
        padded[:flat.numel()] = flat
        padded = padded.view(chunks, cls.CHUNK)
        scales = padded.abs().amax(dim=1) / 127.0
        q = torch.round(padded / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
        packed = torch.cat([q.to(torch.int8).reshape(-1), scales.view(torch.int8)])
        return packed, (tensor.shape, tensor.dtype)

    @classmethod
    def decompress(cls, packed: Tensor, ctx: Any) -> Tensor:
        shape, dtype = ctx
        numel = math.prod(shape)
        chunks = -(-numel // cls.CHUNK)
        q = packed[:chunks * cls.CHUNK].view(chunks, cls.CHUNK).float()
        scales = packed[chunks * cls.CHUNK:].view(torch.float32)
        return (q * scales[:, None]).reshape(-1)[:numel].to(dtype).reshape(shape)

    @classmethod
    def mean_of_gathered(cls, gathered: Tensor, ranks: int, ctx: Any) -> Tensor:
        """The mean of ``ranks`` packed tensors laid end to end, summed in rank order."""
        parts = gathered.view(ranks, -1)
        total = cls.decompress(parts[0], ctx).float()
        for part in parts[1:]:
            total += cls.decompress(part, ctx)
        return (total / ranks).to(ctx[1])


class Compression:
    """``none``, ``fp16``, ``bf16`` and ``int8`` (model deltas; see ``Int8Compressor``); Horovod's
    classes work too."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
    int8 = Int8Compressor


def wire_bytes(compression: Any, numel: int, dtype: torch.dtype) -> int:
    """About the bytes ``numel`` values of ``dtype`` take on the wire in ``compression``'s format,
    from a sample of one int8 chunk's length (no model-sized tensor is made)."""
    sample, _ = compression.compress(torch.zeros(Int8Compressor.CHUNK, dtype=dtype))
    return round(numel * sample.numel() * sample.element_size() / Int8Compressor.CHUNK)


def reduces_by_gather(compression: Any) -> bool:
    """True for a wire format whose values cannot be summed: ranks gather them instead."""
    return bool(getattr(compression, "reduces_by_gather", False))


def gradient_compression(compression: Any) -> Any:
    """The format of warm-up gradients (allreduced, no error feedback) for ``compression``."""
    return getattr(compression, "gradient_compressor", compression)


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
