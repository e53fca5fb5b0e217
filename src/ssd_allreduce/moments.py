"""The wrapped optimizer's moments that travel with the windows (``average_moments``).

Adam's step divides each rank's first moment by its own second: where the ranks' data differ,
each rank's step is normalised by its own gradients, and the average of the ranks' steps is not
the step of the average (on target-sorted shards AdamW ended 66-260 % above synchronous training).
With ``average_moments`` Adam's ``exp_avg`` and ``exp_avg_sq`` (and AMSGrad's ``max_exp_avg_sq``)
ride in the window's delta like the weights, and land as the weights do with ``beta = 1``: the
mean of the ranks' moments at the launch plus this rank's own change since (``algorithm.
carry_moments_``). The window's bytes triple (four times with AMSGrad).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")   # floored after a landing (``floors``)


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Adam's family (AdamW, Adamax, NAdam, ...): the optimizers with ``betas``."""
    return "betas" in optimizer.defaults


def check_averageable(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer`` keeps moments ``average_moments`` can carry."""
    if not is_adaptive(optimizer):
        raise ValueError(f"average_moments carries Adam's moments (exp_avg, exp_avg_sq); "
                         f"{type(optimizer).__name__} has none: leave average_moments off (SGD's momentum "
                         "averaged with the window was measured to diverge at k = d = 10)")
    if isinstance(optimizer, torch.optim.Adamax):
        raise ValueError("average_moments needs Adam's second moments (exp_avg_sq); Adamax keeps an infinity norm "
                         "(exp_inf) instead: leave average_moments off")


class OptimizerMoments:
    """Which of ``optimizer``'s moments travel, as (index into ``params``, state key) pairs fixed
    once (``fix``, after the optimizer's first step, or from a checkpoint), the tensors looked up
    in the optimizer's state at each use (``load_state_dict`` replaces them)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
        self.optimizer, self.params = optimizer, list(params)
        self.keys: list[tuple[int, str]] = []

    @property
    def fixed(self) -> bool:
        return bool(self.keys)

    def held(self) -> list[tuple[int, str]]:
        """The (parameter index, state key) pairs of the moments the optimizer holds now."""
        state = self.optimizer.state
        return [(i, key) for i, p in enumerate(self.params) for key in MOMENT_KEYS
                if torch.is_tensor(state.get(p, {}).get(key))]

    def fix(self) -> None:
        """Take the moments the optimizer holds now."""
        self.keys = self.held()
        if not self.keys:
            raise RuntimeError("average_moments: the optimizer holds no moments at the end of the warm-up (it "
                               "has not stepped): give warmup_steps >= 1")
        if not any(key in SECOND_MOMENTS for _, key in self.keys):
            raise RuntimeError(f"average_moments needs Adam's second moments (exp_avg_sq); "
                               f"{type(self.optimizer).__name__} keeps none: leave average_moments off")

    def restore(self, keys: Sequence[Sequence]) -> None:
        """The pairs a checkpoint (or rank 0) saved."""
        self.keys = [(int(i), str(key)) for i, key in keys]

    def like(self) -> list[Tensor]:
        """Tensors shaped as the moments (their parameters): for laying out flat buffers."""
        return [self.params[i] for i, _ in self.keys]

    def tensors(self) -> list[Tensor]:
        state = self.optimizer.state
        try:
            return [state[self.params[i]][key] for i, key in self.keys]
        except KeyError:
            raise RuntimeError("average_moments: the optimizer's state lost moments it held when the delay stage "
                               "started: load a state saved by this optimizer with the same parameters") from None

    def floors(self, steps: int) -> list[Optional[float]]:
        """Per tensor of ``tensors()``: for a second moment, the factor ``beta2 ** steps`` of the
        ranks' mean below which it may not land (the mean decayed over ``steps`` steps with no
        gradient at all); None for a first moment."""
        beta2 = {id(p): group["betas"][1] for group in self.optimizer.param_groups for p in group["params"]}
        return [beta2[id(self.params[i])] ** steps if key in SECOND_MOMENTS else None for i, key in self.keys]
