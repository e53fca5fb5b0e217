"""``--elastic``: the driver's epoch loop inside ``hvd.elastic.run``, so ranks may leave and join
(``horovodrun --min-np/--max-np --host-discovery-script``, Gloo)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Optional

from . import runlog

FitResult = tuple[Optional[str], Optional[float], Optional[float]]


def fit_elastic(trainer: Any, log: runlog.RunLog, preempt: Any, bar: Any, fit: Callable[..., FitResult]) -> FitResult:
    """Run ``fit`` under Horovod elastic: model, optimizer (SSD-SGD's state included) and position are
    committed every ``--commit-every`` steps; after a membership change every rank continues from
    the last commit with rank 0's state, resharded data and a learning rate for the new size."""
    import horovod.torch as hvd

    from ..elastic import SSDState

    state_class = hvd.elastic.TorchState if trainer.args.mode == "horovod" else SSDState
    state = state_class(trainer.model, trainer.opt, position=asdict(trainer.position), ranks=trainer.ctx.size)
    state.register_reset_callbacks([lambda: trainer.watchdog.progress("a change of ranks (elastic reset)")])

    @hvd.elastic.run
    def train(state: Any) -> FitResult:
        before = trainer.ctx.size
        trainer.adopt_world(hvd.rank(), hvd.size(), type(trainer.position)(**state.position), state.ranks)
        trainer.check_ranks()
        log.set_enabled(trainer.ctx.is_root)
        step = trainer.position.global_step
        if hvd.size() != before:
            print(f"rank {hvd.rank()}: {hvd.size()} ranks now (were {before}): continuing from the commit at "
                  f"step {step}", flush=True)
            log.write("membership", step=step, ranks=hvd.size(), were=before)
        if step:   # (re)entered after a commit: a rank that joined or one that stayed
            print(f"rank {hvd.rank()} of {hvd.size()} at step {step}{trainer.mode.after_membership_change()}",
                  flush=True)

        def commit() -> None:
            state.position, state.ranks = asdict(trainer.position), trainer.ctx.size
            state.commit()

        return fit(trainer, log, preempt, bar, commit)

    return train(state)
