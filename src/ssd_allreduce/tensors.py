"""How a model's tensors are laid out for SSD-SGD: the order every rank shares, and flat buffers
(one per device and dtype) that collectives move whole while element-wise work runs on views."""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor


def ordered(named_parameters: Iterable[tuple[str, Tensor]],
            named_buffers: Iterable[tuple[str, Tensor]] = ()) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(parameters, floating-point buffers), each sorted by name: the order of every rank's flat
    buffers (integer buffers, such as BatchNorm's batch count, are not averaged)."""
    params = sorted(named_parameters, key=lambda nt: nt[0])
    buffers = sorted((nb for nb in named_buffers if nb[1].is_floating_point()), key=lambda nb: nb[0])
    return params, buffers


def model_tensors(model: torch.nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``model``'s (parameters, floating-point buffers) in the shared order."""
    params, buffers = ordered(model.named_parameters(), model.named_buffers())
    return [t for _, t in params], [t for _, t in buffers]


def group_indices(tensors: Sequence[Tensor],
                  key: Callable[[Tensor], Hashable] = lambda t: (t.device, t.dtype)) -> list[list[int]]:
    """Indices of ``tensors`` grouped by ``key`` (device and dtype: what one flat buffer can hold),
    groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(key(t), []).append(i)
    return list(groups.values())


def flatten(tensors: Sequence[Tensor]) -> tuple[list[list[int]], list[Tensor]]:
    """One contiguous buffer per device and dtype holding ``tensors``' values; a lone contiguous
    tensor is its own buffer (no copy)."""
    groups = group_indices(tensors)
    flats = []
    for members in groups:
        if len(members) == 1 and tensors[members[0]].is_contiguous():
            flats.append(tensors[members[0]].view(-1))
        else:
            flats.append(torch.cat([tensors[i].reshape(-1) for i in members]))
    return groups, flats


def unflatten_(tensors: Sequence[Tensor], groups: list[list[int]], flats: Sequence[Tensor]) -> None:
    """Copy ``flatten``'s buffers back into ``tensors`` (nothing to do where a buffer is the tensor)."""
    with torch.no_grad():
        for flat, members in zip(flats, groups):
            if len(members) == 1 and flat.data_ptr() == tensors[members[0]].data_ptr():
                continue
            offset = 0
            for i in members:
                t = tensors[i]
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class FlatSpace:
    """Contiguous storage shaped like a list of tensors: one flat buffer per (device, dtype).

    ``buffers`` are what a collective moves in one call; ``views[i]`` aliases the slice that
    mirrors ``like[i]``, so element-wise work on model tensors needs no packing copies.
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        self.buffers: list[Tensor] = []
        self.views: list[Tensor] = [torch.empty(0)] * len(like)
        self._members = group_indices(like)
        for members in self._members:
            first = like[members[0]]
            flat = torch.zeros(sum(like[i].numel() for i in members), device=first.device, dtype=first.dtype)
            offset = 0
            for i in members:
                n = like[i].numel()
                self.views[i] = flat[offset:offset + n].view_as(like[i])
                offset += n
            self.buffers.append(flat)

    def leading(self, n: int) -> list[Tensor]:
        """The part of each buffer that holds the first ``n`` tensors (the parameters, where the
        buffers follow them), non-empty parts only."""
        parts = []
        for flat, members in zip(self.buffers, self._members):
            end = sum(self.views[i].numel() for i in members if i < n)
            if end:
                parts.append(flat[:end])
        return parts

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def copy_from_(self, tensors: Sequence[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.views, list(tensors))

    def load_(self, values: Sequence[Tensor], what: str) -> None:
        """Copy saved ``values`` (a checkpoint's) into the buffers; refuse another layout."""
        if len(values) != len(self.buffers) or any(
                v.shape != b.shape or v.dtype != b.dtype for v, b in zip(values, self.buffers)):
            raise ValueError(f"the checkpoint's {what} do not match this model's tensors (same names, other "
                             "shapes or dtypes): load it into the same model built the same way")
        with torch.no_grad():
            for b, v in zip(self.buffers, values):
                b.copy_(v)

    def all_finite(self) -> Tensor:
        """Every element finite, as a bool tensor on the device (read it when it is needed). One
        reduction pass per buffer: NaN and Inf reach the minimum or the maximum."""
        flags = [torch.isfinite(torch.stack(torch.aminmax(b))).all() for b in self.buffers if b.numel()]
        if not flags:
            return torch.ones((), dtype=torch.bool)
        return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()

    def is_finite(self) -> bool:
        return bool(self.all_finite())

    def zero_unless_finite_(self) -> Tensor:
        """Zero every buffer unless every element is finite, without reading anything on the host;
        returns the device's verdict (``all_finite``)."""
        finite = self.all_finite()
        for b in self.buffers:
            b.masked_fill_(~finite.to(b.device), 0)
        return finite


def shard_bounds(numel: int, which: int, of: int) -> tuple[int, int]:
    """[lo, hi) of shard ``which`` of ``of`` equal shards (the last ones shorter or empty)."""
    chunk = -(-numel // of)
    lo = min(which * chunk, numel)
    return lo, min(lo + chunk, numel)


def shard_views(buffers: Sequence[Tensor], shard: tuple[int, int]) -> list[Tensor]:
    """Shard ``(which, of)`` of each buffer (all of them when ``of`` is 1); an empty shard is left
    out, alike on every rank holding that shard."""
    which, of = shard
    if of == 1:
        return list(buffers)
    views = []
    for b in buffers:
        lo, hi = shard_bounds(b.numel(), which, of)
        if hi > lo:
            views.append(b[lo:hi])
    return views

