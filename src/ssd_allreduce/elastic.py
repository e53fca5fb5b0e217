"""Horovod elastic training with SSD-SGD: the state object ``hvd.elastic.run`` needs.

    state = ssd_allreduce.elastic.SSDState(model, optimizer, epoch=0, batch=0)
    state.register_reset_callbacks([lambda: set_lr(base_lr * hvd.size())])

    @hvd.elastic.run
    def train(state):
        for state.batch in range(state.batch, steps):
            ...; optimizer.step()
            if state.batch % commit_every == 0:
                state.commit()

``commit()`` first lands the window in flight on every rank (``optimizer.finish()``), so what is
kept is the same global state everywhere. When a rank is lost, every survivor forgets its window in
flight and restores the last commit. After Horovod re-initialises, every rank's local weights
become ``W`` (SPEC, "Membership changes"): survivors at the reset, and where ranks joined, rank 0's
model, optimizer and SSD-SGD state are broadcast (``sync``). Windows then average over the new
world size.
"""
from __future__ import annotations

from typing import Any

import torch
from horovod.torch import broadcast_optimizer_state
from horovod.torch.elastic import TorchState


class SSDState(TorchState):
    """``hvd.elastic.TorchState`` for a model trained with ``ssd_allreduce.DistributedOptimizer``;
    ``kwargs`` are further state (epoch, batch, ...) committed and synchronised with it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        if not hasattr(optimizer, "membership_changed"):
            raise TypeError(f"SSDState needs an optimizer wrapped by ssd_allreduce.DistributedOptimizer, got "
                            f"{type(optimizer).__name__}; for hvd.DistributedOptimizer use hvd.elastic.TorchState")
        super().__init__(model=model, optimizer=optimizer, **kwargs)

    def sync(self) -> None:
        """Rank 0's state everywhere. The optimizer goes first: a rank that joined with an empty
        optimizer state steps it on zero gradients inside ``broadcast_optimizer_state`` (weight
        decay moves its weights), and the weights broadcast after it undo that. Then SSD-SGD's own
        state (``W``, the clock) goes from rank 0 to a rank that joined, and the local weights
        are ``W`` everywhere."""
        broadcast_optimizer_state(self.optimizer, root_rank=0)
        super().sync()
        self.optimizer.adopt_root_state()

    def commit(self) -> None:
        """Land the window in flight (collective), keep the state, check for host changes."""
        self.optimizer.finish()
        super().commit()

    def restore(self) -> None:
        """Back to the last commit after a failed collective; the window in flight is forgotten."""
        self.optimizer.discard_window()
        super().restore()

    def reset(self) -> None:
        """Horovod was re-initialised with other ranks: the optimizer takes the new world, its
        local weights ``W`` (where only ranks left, no ``sync`` follows)."""
        self.optimizer.membership_changed()
        super().reset()
