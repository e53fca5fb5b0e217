"""GradScaler with an SSD-SGD optimizer: the local step is skipped, not the schedule, when the
gradients are not finite (decided on averaged gradients where they are averaged), so every rank
takes part in every window; the pattern that cannot keep a node's ranks alike is refused."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from torch.profiler import record_function

from .algorithm import scaled_lr
from .tensors import group_indices

if TYPE_CHECKING:
    from .topology import Hierarchy


def unscale_and_find_nonfinite_(grads: list[Tensor], grad_scale: Optional[Tensor]) -> bool:
    """Divide ``grads`` by ``grad_scale`` (if any) and say whether any is not finite: one fused
    pass per device (GradScaler's own kernel) and one value read on the host."""
    values = [g._values() if g.is_sparse else g for g in grads]   # sparse: through its values, as GradScaler
    found = []
    with torch.no_grad():
        for members in group_indices(values, key=lambda t: t.device):
            group = [values[i] for i in members]
            device = group[0].device
            flag = torch.zeros(1, device=device)
            inv_scale = (torch.ones(1, device=device) if grad_scale is None
                         else grad_scale.double().reciprocal().float().reshape(1).to(device))
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv_scale)
            found.append(flag.to(grads[0].device))
    return bool(torch.cat(found).sum() > 0) if found else False


class ScaledLocalStep:
    """Methods of the optimizer made by ``DistributedOptimizer`` (see ``optimizer``)."""

    _ssd_base: type
    _ssd_params: list[Tensor]
    _ssd_hierarchy: Optional["Hierarchy"]
    _ssd_warned_scaler: bool
    state: Any

    def _ssd_local_update(self, averaged: bool, lr_scale: float = 1.0) -> None:
        """The wrapped optimizer's step, with GradScaler's unscale and skip handled here."""
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler (see _step_supports_amp_scaling)
        grad_scale = getattr(self, "grad_scale", None)
        hidden = {}
        if found_inf is not None:
            grads = [p.grad for p in self._ssd_params if p.grad is not None]
            if averaged and grad_scale is not None and self._ssd_hierarchy is not None:
                raise RuntimeError(
                    "GradScaler.step() without optimizer.synchronize() and scaler.unscale_(optimizer) first, "
                    "with hierarchical SSD-SGD (local_sync): each rank's scaler would see only its own overflows, "
                    "and a node's ranks, which must share their weights, would drift apart. Use Horovod's pattern: "
                    "optimizer.synchronize(); scaler.unscale_(optimizer); then scaler.step(optimizer) inside "
                    "optimizer.skip_synchronize()")
            if averaged and grad_scale is not None and not self._ssd_warned_scaler:
                warnings.warn("GradScaler.step() without optimizer.synchronize() and scaler.unscale_(optimizer) "
                              "first while gradients are averaged (the warm-up, or every step inside a node): "
                              "each rank's scaler then sees only its own overflows and the loss scales can drift "
                              "apart; use Horovod's pattern (synchronize, unscale_, then scaler.step inside "
                              "skip_synchronize())")
                self._ssd_warned_scaler = True
            if averaged:  # decide on the averaged gradients, identical on every rank
                if unscale_and_find_nonfinite_(grads, grad_scale):
                    return
            else:
                if bool(found_inf.item()):
                    return
                if grad_scale is not None:
                    unscale_and_find_nonfinite_(grads, grad_scale)
            # hide them from a wrapped optimizer that would read them itself (fused Adam): done here
            hidden = {"grad_scale": grad_scale, "found_inf": found_inf}
            self.grad_scale = self.found_inf = None
        try:
            with record_function("ssd_allreduce.local_step"), scaled_lr(self.param_groups, lr_scale):
                self._ssd_base.step(self)
        finally:
            for name, value in hidden.items():
                setattr(self, name, value)

    def _ssd_zero_nonfinite_state(self) -> None:
        """After a rank went back to ``W``: momentum (or Adam's moments) that went non-finite with
        its weights would make the next step non-finite again."""
        with torch.no_grad():
            for state in self.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        value.zero_()
