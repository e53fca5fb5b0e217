"""One run of the quality study: a task trained to a fixed budget with a warm-up and a cosine decay
of the learning rate, evaluated as it goes. On the simulator (N workers in one process), or as one
rank of a real job under horovodrun:

    horovodrun -np 4 -H localhost:4 --gloo python -m ssd_allreduce.bench.quality_run SPEC_JSON OUT_JSON

The same (task, seed) draws the same batches either way, so a real run must follow the simulator.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..settings import AUTO
from ..simulator import Simulator
from ..tensors import model_tensors
from .quality_tasks import TASKS, Task

DEFAULT_LR = {("regression", "sgd"): 0.05, ("regression", "adamw"): 2e-3, ("digits", "sgd"): 0.05,
              ("digits", "adamw"): 2e-3, ("gpt", "sgd"): 0.1, ("gpt", "adamw"): 3e-3}


@dataclass(frozen=True)
class Variant:
    """How one run averages: synchronous (``sync``), or SSD-SGD's window and its options."""

    label: str
    sync_every: int = 1
    delay: int = 0
    glu_beta: Union[float, str] = "auto"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    local_lr_scale: Union[float, str] = "auto"
    sync: bool = False
    drift_correction: bool = False
    average_moments: bool = False
    warmup_steps: Optional[Union[int, str]] = None   # the run's own warm-up in place of the study's; "auto": noise

    def options(self) -> dict[str, Any]:
        return dict(sync_every=self.sync_every, delay=self.delay, glu_beta=self.glu_beta, outer_lr=self.outer_lr,
                    outer_momentum=self.outer_momentum, local_lr_scale=self.local_lr_scale,
                    drift_correction=self.drift_correction, average_moments=self.average_moments)


@dataclass(frozen=True)
class RunSpec:
    task: str
    workers: int
    optimizer: str
    shards: str
    seed: int
    steps: int
    warmup_steps: int
    variant: Variant
    lr: float = 0.0          # 0: the task's default
    evals: int = 20          # evaluations over the budget

    @property
    def warmup(self) -> Union[int, str]:
        """The synchronous steps first: all of them for ``sync``, else the variant's own where it
        has them ("auto": until the ranks' gradient noise reaches their number, ``warmup_end``)."""
        if self.variant.sync:
            return self.steps
        return self.warmup_steps if self.variant.warmup_steps is None else self.variant.warmup_steps

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)


@dataclass
class RunResult:
    spec: RunSpec
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)   # (step, metrics of W)
    final: dict[str, float] = field(default_factory=dict)
    seconds_per_step: list[float] = field(default_factory=list)               # real ranks: wall time
    warmup: Optional[int] = None                                              # the steps an "auto" warm-up took


def make_optimizer(spec: RunSpec, params: Any) -> torch.optim.Optimizer:
    lr = spec.lr or DEFAULT_LR[(spec.task, spec.optimizer)]
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def schedule(steps: int) -> Callable[[int], float]:
    """A linear ramp over the first 5 % of the budget, then a cosine decay to zero."""
    ramp = max(1, steps // 20)
    return lambda t: min(1.0, (t + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


def simulate(spec: RunSpec, task: Optional[Task] = None) -> RunResult:
    """The run with ``spec.workers`` simulated workers. While it is synchronous, each evaluation
    also records the ranks' gradient noise over its signal (``noise``)."""
    torch.set_num_threads(1)
    task = task or TASKS[spec.task](spec.seed)
    sim, step = _simulation(spec, task)
    result = RunResult(spec)
    for t in range(spec.steps):
        step(t)
        if (t + 1) % spec.eval_every == 0 and t + 1 < spec.steps:
            metrics = task.evaluate(sim.global_model())
            if sim.noise is not None and sim.warmup.covers(t):
                metrics["noise"] = sim.noise.ratio
            result.curve.append((t + 1, metrics))
    if sim.warmup.auto:
        result.warmup = _steps_warmed(sim.warmup.end, spec)
    sim.finish()
    result.final = task.evaluate(sim.global_model())
    result.curve.append((spec.steps, result.final))
    return result


def _steps_warmed(end: Optional[int], spec: RunSpec) -> int:
    """The steps an "auto" warm-up that ended at ``end`` (None: never) took of the run."""
    return spec.steps if end is None else min(end, spec.steps)


def _simulation(spec: RunSpec, task: Task) -> tuple[Simulator, Callable[[int], None]]:
    """A simulator of ``spec``, reading the gradient noise of its synchronous steps, and its
    training step."""
    sim = Simulator(task.make_model(spec.seed), lambda p: make_optimizer(spec, p), spec.workers,
                    warmup_steps=spec.warmup, read_noise=True, **spec.variant.options())
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule(spec.steps)) for o in sim.optimizers]
    shards = task.shards(spec.workers, spec.shards, spec.seed)

    def step(t: int) -> None:
        sim.step([task.batch(shards[w], spec.seed, t, w) for w in range(spec.workers)], task.loss)
        for s in schedulers:
            s.step()
    return sim, step


def train_rank(spec: RunSpec) -> RunResult:
    """This process's rank of the run, under horovodrun (Horovod's optimizer for ``sync``)."""
    import horovod.torch as hvd

    import ssd_allreduce

    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()
    task = TASKS[spec.task](spec.seed)
    model = task.make_model(spec.seed)
    base = make_optimizer(spec, model.parameters())
    if spec.variant.sync:
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    else:
        opt = ssd_allreduce.DistributedOptimizer(
            base, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(),
            warmup_steps=spec.warmup, **spec.variant.options())
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule(spec.steps))
    shard = task.shards(hvd.size(), spec.shards, spec.seed)[rank]
    result = RunResult(spec)
    for t in range(spec.steps):
        start = time.perf_counter()
        x, y = task.batch(shard, spec.seed, t, rank)
        opt.zero_grad()
        task.train_loss(model, x, y).backward()
        opt.step()
        scheduler.step()
        result.seconds_per_step.append(time.perf_counter() - start)
        if (t + 1) % spec.eval_every == 0 and t + 1 < spec.steps:
            result.curve.append((t + 1, task.evaluate(_global_model(model, opt))))
    if not spec.variant.sync:
        opt.finish()
        if spec.warmup == AUTO:
            result.warmup = _steps_warmed(opt.warmup_end, spec)
    result.final = task.evaluate(_global_model(model, opt))
    result.curve.append((spec.steps, result.final))
    return result


def _global_model(model: nn.Module, opt: Any) -> nn.Module:
    """``model`` holding ``W`` where SSD-SGD has one (the model itself otherwise)."""
    global_weights = getattr(opt, "global_weights", None)
    if global_weights is None:
        return model
    copied = copy.deepcopy(model)
    params, buffers = model_tensors(copied)
    with torch.no_grad():
        torch._foreach_copy_(params + buffers, global_weights)
    return copied


def spec_from_json(text: str) -> RunSpec:
    values = json.loads(text)
    return RunSpec(**{**values, "variant": Variant(**values["variant"])})


def main(argv: Optional[list[str]] = None) -> None:
    """Run a rank of ``SPEC_JSON`` and let rank 0 write ``OUT_JSON``."""
    spec_json, out = (sys.argv[1:] if argv is None else argv)[:2]
    result = train_rank(spec_from_json(spec_json))
    import horovod.torch as hvd
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(asdict(result), f)


if __name__ == "__main__":
    main()
