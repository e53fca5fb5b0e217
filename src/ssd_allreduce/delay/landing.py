"""The math of a window that lands (SPEC, "Landing"): the drift estimate, the outer step on the
averaged delta, ``W += G``, the moments that travel, and the GLU compensation of the local tensors.
The delay stage decides when a window lands and whether its verdict lets it; this is what follows."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..algorithm import apply_global_update_, carry_moments_, compensate_local_, estimate_drift_, outer_step_
from ..moments import OptimizerMoments
from ..settings import SSDSettings
from .state import DelayState, Window


def land_window_(state: DelayState, settings: SSDSettings, params: Sequence[Tensor], buffers: Sequence[Tensor],
                 moments: Optional[OptimizerMoments], window: Window, elapsed: int) -> None:
    """Land ``window``, whose average sits in ``state.delta``, ``elapsed`` steps after its launch:
    ``params``, ``buffers`` and the travelling ``moments`` are this rank's local tensors."""
    n = len(params)
    if state.correction is not None and state.drift_known:
        estimate_drift_(state.correction.leading(n), state.correction_before.leading(n), state.delta.leading(n),
                        state.snapshot.leading(n), state.global_.leading(n), window.sync_every, state.clock.delay)
    elif state.correction is not None:
        state.keep_drift()
    outer_step_(state.delta.leading(n), None if state.momentum is None else state.momentum.leading(n),
                lr=settings.outer_lr, mu=settings.outer_momentum, nesterov=settings.outer_nesterov)
    apply_global_update_(state.global_, state.delta)
    if moments is not None:
        m = n + len(buffers)
        carry_moments_(moments.tensors(), moments.floors(elapsed), state.global_.views[m:], state.snapshot.views[m:])
    compensate_local_(params, buffers, state.global_, state.snapshot, state.delta, glu_beta=settings.beta_for(elapsed),
                      elapsed=elapsed, sync_every=window.sync_every, compensation=settings.compensation)
