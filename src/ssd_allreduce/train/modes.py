"""What differs between the driver's training modes: how the optimizer is built and stepped, and
what a step cost in communication. The training loop itself is the same for every mode."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..compression import Compression
from ..noise import MIN_STEPS as NOISE_MIN_STEPS
from ..optimizer import DistributedOptimizer
from ..tensors import model_tensors
from .launch import DistContext

MODES = ("ssd", "horovod", "ddp", "local-sgd", "no-comm")


@dataclass
class StepCost:
    """Communication of one step: host seconds blocked on it, and payload bytes sent."""

    wait_seconds: float = 0.0
    bytes: int = 0


class Mode:
    """A plain optimizer (``no-comm``: every rank alone; ``ddp`` overrides the network)."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, ctx: DistContext) -> None:
        self.args, self.model, self.ctx = args, model, ctx
        self.net: nn.Module = model
        self.optimizer = self.make_optimizer(self.base_optimizer())
        width = 4 if args.compression == "none" else 2
        self.gradient_bytes = sum(p.numel() for p in model.parameters() if p.requires_grad) * width

    def base_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        lr = a.lr * (1 if a.no_lr_scaling else self.ctx.size)
        if a.optimizer == "adamw":   # SSD-SGD keeps Adam's moments local, like SGD's momentum
            return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=a.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=a.momentum, weight_decay=a.weight_decay)

    def make_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return opt

    def step(self, scaler: torch.amp.GradScaler) -> StepCost:
        """Unscale and clip if asked, then step."""
        self._unscale_and_clip(scaler)
        scaler.step(self.optimizer)
        return StepCost()

    def _unscale_and_clip(self, scaler: torch.amp.GradScaler) -> None:
        if scaler.is_enabled():
            scaler.unscale_(self.optimizer)
        if self.args.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad_norm)

    def before_evaluation(self) -> None:
        """Make every rank's model what should be evaluated."""

    def phase(self) -> str:
        """What the next step does, for fault reports: "warmup", "window" (one in flight) or "step"."""
        return "step"

    def warmup_end(self) -> Optional[int]:
        """Where ``--warmup-steps auto`` starts this mode's steady-state figures: a mode without a
        warm-up after the shortest "auto" one (``noise.MIN_STEPS``), SSD-SGD where its own ended
        (None while it goes on)."""
        return NOISE_MIN_STEPS

    def after_membership_change(self) -> str:
        """What to say of this rank's state after a change of ranks (elastic)."""
        return ""

    def bytes_per_step(self, steps: int) -> float:
        return 0.0

    def summary(self) -> dict[str, Any]:
        return {"extra_state_bytes": 0, "ssd_stats": None, "local_sync_nodes": None}


class DDPMode(Mode):
    """torch DistributedDataParallel: gradients averaged during backward."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, ctx: DistContext) -> None:
        super().__init__(args, model, ctx)
        self.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if args.compression == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            self.net.register_comm_hook(None, default_hooks.fp16_compress_hook)

    def step(self, scaler: torch.amp.GradScaler) -> StepCost:
        super().step(scaler)
        return StepCost(0.0, self.gradient_bytes)   # overlapped with backward, not measured

    def bytes_per_step(self, steps: int) -> float:
        return float(self.gradient_bytes)


class HorovodMode(Mode):
    """``hvd.DistributedOptimizer``, the baseline, stepped with Horovod's protocol: synchronize,
    then unscale and clip, then step inside ``skip_synchronize``."""

    def make_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        import horovod.torch as hvd
        return hvd.DistributedOptimizer(
            opt, named_parameters=self.model.named_parameters(),
            compression=hvd.Compression.fp16 if self.args.compression == "fp16" else hvd.Compression.none)

    def step(self, scaler: torch.amp.GradScaler) -> StepCost:
        t0 = time.perf_counter()
        self.optimizer.synchronize()
        waited = time.perf_counter() - t0
        self._unscale_and_clip(scaler)
        with self.optimizer.skip_synchronize():
            scaler.step(self.optimizer)
        return StepCost(waited, self.gradient_bytes)

    def bytes_per_step(self, steps: int) -> float:
        return float(self.gradient_bytes)


class SSDMode(Mode):
    """SSD-SGD (``ssd``), or blocking local SGD (``local-sgd``: the same with delay 0)."""

    def make_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        a = self.args
        wrapped = DistributedOptimizer(
            opt, named_parameters=self.model.named_parameters(), named_buffers=self.model.named_buffers(),
            compression=getattr(Compression, a.compression),
            sync_every=a.sync_every, delay=0 if a.mode == "local-sgd" else a.delay, max_sync_every=a.max_sync_every,
            warmup_steps=a.warmup_steps, glu_beta=a.glu_beta, compensation=a.compensation,
            local_lr_scale=a.local_lr_scale, outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
            drift_correction=a.drift_correction, average_moments=a.average_moments,
            backend=self.ctx.comm, local_sync={"auto": None, "on": True, "off": False}[a.local_sync])
        if wrapped.node_layout and self.ctx.is_root:
            print(f"hierarchical SSD-SGD on {wrapped.node_layout}: gradients averaged inside each node every "
                  "step, windows between nodes", flush=True)
        return wrapped

    def step(self, scaler: torch.amp.GradScaler) -> StepCost:
        stats = self.optimizer.ssd_stats
        wait_before, bytes_before = stats.comm_wait_seconds, stats.bytes_allreduced
        if self.args.clip_grad_norm or scaler.is_enabled():
            self.optimizer.synchronize()  # averages the gradients during the warm-up
            self._unscale_and_clip(scaler)
            with self.optimizer.skip_synchronize():
                scaler.step(self.optimizer)
        else:
            scaler.step(self.optimizer)
        return StepCost(stats.comm_wait_seconds - wait_before, stats.bytes_allreduced - bytes_before)

    def before_evaluation(self) -> None:
        self.optimizer.finish()   # land the window in flight on every rank

    def warmup_end(self) -> Optional[int]:
        return self.optimizer.warmup_end

    def phase(self) -> str:
        end = self.optimizer.warmup_end
        if end is None or self.optimizer.ssd_stats.steps < end:
            return "warmup"
        return "window" if self.optimizer.window_in_flight else "step"

    def after_membership_change(self) -> str:
        """Whether the local weights are ``W`` (SPEC: they must be after a change), and ``W``'s sum."""
        global_weights = self.optimizer.global_weights
        if global_weights is None:
            return "; in the warm-up"
        params, buffers = model_tensors(self.model)
        at_global = all(torch.equal(t.detach(), w) for t, w in zip(params + buffers, global_weights))
        return f"; local weights at W: {at_global}, W sum {sum(float(w.double().sum()) for w in global_weights):.10e}"

    def bytes_per_step(self, steps: int) -> float:
        """The payload per step after the warm-up (which sends gradients every step)."""
        stats = self.optimizer.ssd_stats
        after = steps - stats.warmup_allreduces
        return (stats.bytes_allreduced - stats.warmup_bytes_allreduced) / after if after > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"extra_state_bytes": self.optimizer.extra_state_bytes,
                "ssd_stats": self.optimizer.ssd_stats.as_dict(), "local_sync_nodes": self.optimizer.node_layout}


_MODE_CLASSES: dict[str, type[Mode]] = {"ssd": SSDMode, "local-sgd": SSDMode, "horovod": HorovodMode,
                                        "ddp": DDPMode, "no-comm": Mode}


def make_mode(args: argparse.Namespace, model: nn.Module, ctx: DistContext) -> Mode:
    return _MODE_CLASSES[args.mode](args, model, ctx)
