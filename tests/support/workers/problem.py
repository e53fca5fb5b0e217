"""The small deterministic problem every multi-rank test and its single-process oracle share."""
from __future__ import annotations

import torch
from torch import Tensor, nn

BATCH = 8
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4


class Ballast(nn.Module):
    """``size`` parameters that cost no compute: they make the allreduce slow, not the step."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.0 * self.weight[0]


def make_model(big: int = 0) -> nn.Module:
    """A CNN with BatchNorm (its running statistics travel with the delta); ``big`` adds that many
    idle parameters to make the allreduce slow relative to compute."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                               nn.Linear(4 * 6 * 6, 10)]
    if big:
        layers.append(Ballast(big))
    return nn.Sequential(*layers)


def make_sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def make_adamw(params) -> torch.optim.Optimizer:
    # The conv bias before BatchNorm has a gradient of float noise (~1e-8); with the default eps
    # Adam would blow it up to steps of ~lr whose sign depends on the summation order of the
    # average, so no two correct implementations would agree. eps = 1e-3 keeps such steps tiny.
    return torch.optim.AdamW(params, lr=0.01, weight_decay=WEIGHT_DECAY, eps=1e-3)


OPTIMIZERS = {"sgd": make_sgd, "adamw": make_adamw}


def batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


loss_fn = nn.CrossEntropyLoss()


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters then floating-point buffers, each sorted by name (the optimizer's order)."""
    params = [p.detach().cpu().clone() for _, p in sorted(model.named_parameters())]
    buffers = [b.detach().cpu().clone() for _, b in sorted(model.named_buffers()) if b.is_floating_point()]
    return params + buffers
