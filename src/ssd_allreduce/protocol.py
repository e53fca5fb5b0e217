"""Horovod's protocol on an SSD-SGD optimizer: gradients averaged during the warm-up (and inside a
node after it, hierarchical), each bucket started from backward as Horovod does;
``synchronize()``/``skip_synchronize()`` and ``backward_passes_per_step``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from torch import Tensor

from .delay.verdict import missing_gradients
from .warmup import GradientAverager

if TYPE_CHECKING:
    from .delay import DelayStage
    from .topology import Hierarchy
    from .warmup_end import WarmupEnd
    from .comm import Communicator


class HorovodProtocol:
    """Methods of the optimizer made by ``DistributedOptimizer`` (see ``optimizer``)."""

    _ssd_averager: GradientAverager
    _ssd_node_averager: Optional[GradientAverager]
    _ssd_engine: "DelayStage"
    _ssd_check_ranks: Callable[[], None]   # agreement.RankAgreement's
    _ssd_warmup: "WarmupEnd"
    _ssd_hierarchy: Optional["Hierarchy"]
    _ssd_comm: "Communicator"
    _ssd_params: list[Tensor]
    _ssd_step: int
    _ssd_checked: bool
    _ssd_warned_scaler: bool
    _ssd_erred: int
    _ssd_backward_passes: dict[Tensor, tuple[int, int]]
    _synchronized: bool
    _should_synchronize: bool
    backward_passes_per_step: int

    def _ssd_count_backward(self, p: Tensor) -> None:
        step, passes = self._ssd_backward_passes.get(p, (-1, 0))
        passes = passes + 1 if step == self._ssd_step else 1
        self._ssd_backward_passes[p] = (self._ssd_step, passes)
        if passes > self.backward_passes_per_step:
            raise RuntimeError("Gradients were computed more than backward_passes_per_step times "
                               "before call to step(). Increase backward_passes_per_step to "
                               "accumulate gradients locally.")
        # no collective from backward before the ranks were compared (the first step after a build,
        # a load or a change of ranks), nor where GradScaler may rewrite gradients in flight
        averager = self._ssd_averager_at(self._ssd_step)
        if (passes == self.backward_passes_per_step and self._ssd_comm.member and self._ssd_checked
                and not self._ssd_warned_scaler and averager is not None):
            averager.grad_ready(p)

    @property
    def _ssd_windows(self) -> bool:
        """Windows run, unless the hierarchy has one node: then every step stays synchronous."""
        return self._ssd_hierarchy is None or self._ssd_hierarchy.cross.size > 1

    def _ssd_averager_at(self, step: int) -> Optional[GradientAverager]:
        """Who averages the gradients of ``step``: everyone in the warm-up, the node after it
        (hierarchical), nobody after it (flat: the windows do)."""
        return self._ssd_averager if self._ssd_warmup.covers(step) else self._ssd_node_averager

    def set_backward_passes_per_step(self, passes: int) -> None:
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {passes!r}")
        self.backward_passes_per_step = passes

    def synchronize(self) -> None:
        """Average the gradients across ranks during warm-up (after it, SSD-SGD steps on local
        gradients and this only marks the step as synchronised)."""
        self._ssd_synchronize(all(p.grad is None for p in self._ssd_params))

    def _ssd_synchronize(self, without_gradients: bool) -> None:
        """``synchronize()``; a rank that steps without gradients makes every rank raise (at once,
        or where the windows carry the news to the other nodes, when the window lands)."""
        if self._ssd_comm.member and not self._ssd_checked:
            self._ssd_check_ranks()   # first: a rank at the very start takes rank 0's position (step, warm-up)
        averager = self._ssd_averager_at(self._ssd_step) if self._ssd_comm.member else None
        if averager is not None:
            erred = averager.average_(without_gradients)
            if averager is self._ssd_averager:
                self._ssd_warmup.observe(self._ssd_step, averager.comm.size, averager.last_norms)
                if self._ssd_engine.tuner is not None:
                    self._ssd_engine.tuner.warmup_collective(averager.last_seconds, averager.last_bytes)
            self._ssd_erred = erred
            if erred and (averager is self._ssd_averager or not self._ssd_windows):
                raise RuntimeError(missing_gradients(erred, averager.comm.size, self._ssd_step))
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Make ``step()`` skip the gradient synchronisation, after an explicit ``synchronize()``
        (for gradient clipping or ``GradScaler.unscale_`` on averaged gradients)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True
