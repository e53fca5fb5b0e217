"""Ranks compared at the first step (and the first after a load or a change of ranks): the same
model, settings and parameter order everywhere, or every rank stops naming the difference; ranks
at the very start take rank 0's SSD-SGD state (Horovod's resume: load on rank 0, then broadcast)."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from .delay import Position

if TYPE_CHECKING:
    from .comm import Communicator
    from .delay import DelayStage
    from .settings import SSDSettings
    from .stats import SSDStats
    from .warmup import GradientAverager
    from .warmup_end import WarmupEnd

logger = logging.getLogger(__name__)


def check_moments_held(root: Position, held: list[Optional[list[tuple[int, str]]]]) -> None:
    """Raise (on every rank) unless every rank's optimizer holds the moments rank 0's windows carry
    (``average_moments``): a rank without them could not send its share."""
    if root.moments is None:
        return
    for rank, mine in enumerate(held):
        missing = set(root.moments) - set(mine or [])
        if missing:
            raise ValueError(f"rank {rank}'s optimizer holds no state for {len(missing)} of the {len(root.moments)} "
                             "moments rank 0's windows carry (average_moments): load the optimizer's state on every "
                             "rank, or load it on rank 0 alone and call hvd.broadcast_optimizer_state(optimizer, "
                             "root_rank=0)")


def check_same_optimizer(ref: dict[str, Any], theirs: dict[str, Any], rank: int) -> None:
    """Raise, naming what differs, where rank ``rank`` built another optimizer than rank 0."""
    if theirs["name"] != ref["name"]:
        raise ValueError(f"this optimizer is SSD-SGD optimizer #{ref['name'].split('.')[1]} built on "
                         f"rank 0 but #{theirs['name'].split('.')[1]} on rank {rank}: build the "
                         "optimizers in the same order on every rank")
    diff = ref["settings"].differences(theirs["settings"])
    if diff:
        raise ValueError(f"rank {rank} runs SSD-SGD with other settings than rank 0 (rank 0 vs "
                         f"rank {rank}: {'; '.join(diff)}): pass the same settings on every rank")
    a, b = ref["tensors"], theirs["tensors"]
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            raise ValueError(f"rank {rank}'s model differs from rank 0's at tensor #{i}: "
                             f"rank 0 has {x}, rank {rank} has {y} (name, shape, dtype); "
                             "every rank must build the same model")
    if ref["buckets"] != theirs["buckets"]:
        raise ValueError(f"rank {rank} lists the optimizer's parameters in another order than rank 0 (its "
                         "warm-up allreduces would not match): build the parameter groups alike on every rank")


class RankAgreement:
    """Methods of the optimizer made by ``DistributedOptimizer`` (see ``optimizer``)."""

    _ssd_engine: "DelayStage"
    _ssd_comm: "Communicator"
    _ssd_name: str
    _ssd_settings: "SSDSettings"
    _ssd_warmup: "WarmupEnd"
    _ssd_params: list[Tensor]
    _ssd_buffers: list[Tensor]
    _ssd_param_names: list[str]
    _ssd_buffer_names: list[str]
    _ssd_averager: "GradientAverager"
    _ssd_checked: bool
    _ssd_step: int
    ssd_stats: "SSDStats"

    def _ssd_check_ranks(self) -> None:
        """At the first step (and the first after ``load_state_dict``), on every rank: fail if ranks
        disagree on the model or the settings; where only rank 0 loaded a checkpoint (Horovod's
        resume: load on rank 0, then ``hvd.broadcast_optimizer_state``), take its SSD-SGD state."""
        try:
            self._ssd_engine.layout.check(self._ssd_engine.local)
            moved = None
        except RuntimeError as exc:
            moved = str(exc)
        tensors = self._ssd_params + self._ssd_buffers
        mine = {"moved": moved, "name": self._ssd_name, "settings": self._ssd_settings,
                "position": replace(self._ssd_engine.position(self._ssd_step), warmup=self._ssd_warmup.position()),
                "tensors": [(n, tuple(t.shape), str(t.dtype)) for n, t in
                            zip(self._ssd_param_names + self._ssd_buffer_names, tensors)],
                "buckets": [[tuple(p.shape) for p in bucket] for bucket in self._ssd_averager.buckets],
                "moments_held": None if self._ssd_engine.moments is None else self._ssd_engine.moments.held()}
        everyone = self._ssd_comm.allgather_object(mine)
        moved = [(r, e["moved"]) for r, e in enumerate(everyone) if e["moved"]]
        if moved:   # raised on every rank, not only where the model moved
            raise RuntimeError("; ".join(f"rank {r}: {m}" if len(everyone) > 1 else m for r, m in moved))
        ref = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            check_same_optimizer(ref, theirs, rank)
        check_moments_held(everyone[0]["position"], [e["moments_held"] for e in everyone])
        self._ssd_agree_on_position([e["position"] for e in everyone])
        self._ssd_checked = True

    def _ssd_agree_on_position(self, positions: list[Position]) -> None:
        root = positions[0]
        strays = [r for r, p in enumerate(positions) if p != root]
        if not strays:
            return
        if any(not positions[r].fresh for r in strays):
            where = ", ".join(f"rank {r}: {p}" for r, p in enumerate(positions))
            raise ValueError(f"ranks are at different SSD-SGD positions: {where}. Load the same checkpoint on "
                             "every rank, or load it on rank 0 alone and call "
                             "hvd.broadcast_optimizer_state(optimizer, root_rank=0)")
        if self._ssd_comm.rank in strays:
            logger.warning("SSD-SGD state taken from rank 0 (step %d): this rank started afresh, as after "
                           "hvd.broadcast_optimizer_state of a checkpoint loaded on rank 0", root.step)
        self._ssd_engine.adopt_root_state(root)
        self._ssd_warmup.adopt(root.warmup)
        self._ssd_step = root.step
        self.ssd_stats.steps = root.step
