"""The tensors a delay stage was built on must stay the model's: moving or casting the model
after wrapping replaces them, which is refused with what to do instead."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class TensorLayout:
    """Each tensor's name, dtype and device when the optimizer was built."""

    def __init__(self, tensors: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> None:
        self.names = list(names or (f"tensor #{i}" for i in range(len(tensors))))
        self.layout: list[tuple[torch.dtype, torch.device]] = [(t.dtype, t.device) for t in tensors]

    def check(self, tensors: Sequence[Tensor]) -> None:
        """Raise if a tensor changed dtype or device since the optimizer was built."""
        for name, t, (dtype, device) in zip(self.names, tensors, self.layout):
            if (t.dtype, t.device) != (dtype, device):
                raise RuntimeError(
                    f"{name} is now {t.dtype} on {t.device}, it was {dtype} on {device} when the optimizer "
                    "was built: the model was moved or cast after wrapping (model.cuda(), .to(), .half()), "
                    "which replaces its buffers. Move or cast the model first, then build the optimizer, "
                    "as Horovod's examples do")
