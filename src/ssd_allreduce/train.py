"""Train a model with SSD-SGD or a baseline, under any launcher, on CPUs or GPUs.

    horovodrun -np 2 python -m ssd_allreduce.train --mode ssd --data digits --model cnn
    horovodrun -np 2 python -m ssd_allreduce.train --mode horovod --data digits --model cnn
    srun --mpi=pmix python -m ssd_allreduce.train --mode ssd --data cifar10 --data-dir ~/cifar10
    torchrun --nproc-per-node 4 -m ssd_allreduce.train --mode ssd --backend torch --model resnet20
    python -m ssd_allreduce.train summarize runs/horovod runs/ssd     # compare finished runs

Modes (same model, data, seeds and schedule for all): ``horovod`` (hvd.DistributedOptimizer, the
baseline), ``ddp`` (torch DistributedDataParallel, the baseline under torchrun), ``ssd`` (this
project), ``local-sgd`` (a blocking average every k steps), ``no-comm`` (every rank alone: the
throughput limit). A run directory (``--out``) receives metrics.jsonl, curves.png and
checkpoints/; ``--resume`` continues from its latest checkpoint, exactly.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, runlog
from .data import DATASET_NAMES, SHARD_MODES, DataSplit, FolderBatches, ShardedBatches, cifar_augment, load_dataset
from .launch import DistContext, init_distributed, shutdown
from .models import MODEL_NAMES, build_model, count_parameters
from .optimizer import DEFAULT_GLU_BETA, DistributedOptimizer

MODES = ("ssd", "horovod", "ddp", "local-sgd", "no-comm")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ssd_allreduce.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="ssd")
    ap.add_argument("--backend", choices=("auto", "horovod", "torch", "mpi"), default="auto",
                    help="auto: torch under torchrun, else horovod")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--model", default="cnn", help="mlp, cnn, resnet20..resnet110, or a torchvision name")
    ap.add_argument("--data", choices=DATASET_NAMES, default="digits")
    ap.add_argument("--data-dir", help="CIFAR-10 python-format directory or ImageNet-style folder")
    ap.add_argument("--synthetic-samples", type=int, default=4096)
    ap.add_argument("--image-size", type=int, default=32, help="synthetic data only")
    ap.add_argument("--shards", choices=SHARD_MODES, default="shuffle")
    ap.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-10)")
    ap.add_argument("--workers", type=int, default=4, help="data-loading processes (image folders)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of one rank; scaled by the rank count")
    ap.add_argument("--no-lr-scaling", action="store_true")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear ramp from the one-rank lr")
    ap.add_argument("--lr-schedule", choices=("constant", "step", "cosine"), default="constant")
    ap.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs (step schedule)")
    ap.add_argument("--lr-gamma", type=float, default=0.1)
    ap.add_argument("--clip-grad-norm", type=float, default=0.0)
    ap.add_argument("--amp", action="store_true", help="float16 + GradScaler on GPUs, bfloat16 on CPUs")
    ap.add_argument("--fp16-allreduce", action="store_true", help="compress allreduces to float16")
    ap.add_argument("--sync-every", type=int, default=5, help="k: local steps per window (ssd, local-sgd)")
    ap.add_argument("--delay", type=int, default=None, help="d: steps a window's allreduce overlaps (default k)")
    ap.add_argument("--warmup-steps", type=int, default=50, help="synchronous steps first (ssd, local-sgd)")
    ap.add_argument("--glu-beta", type=float, default=DEFAULT_GLU_BETA)
    ap.add_argument("--compensation", choices=("glu", "overwrite"), default="glu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/latest", help="run directory")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                    help="continue from the latest checkpoint of --out (or the one given); "
                         "starts fresh when there is none")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (0: end only)")
    ap.add_argument("--signal-check-every", type=int, default=20,
                    help="steps between the ranks' agreement on a preemption signal")
    ap.add_argument("--preempt-at-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help="free text stored with the run (e.g. the network)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def check_args(args: argparse.Namespace, backend: str) -> None:
    """Reject combinations that cannot work, saying what to change."""
    if args.mode == "horovod" and backend != "horovod":
        raise SystemExit(f"--mode horovod needs the Horovod backend (got {backend}); under torchrun use --mode ddp")
    if args.mode == "ddp" and backend != "torch":
        raise SystemExit(f"--mode ddp needs torch.distributed (got {backend}): launch with torchrun or "
                         "pass --backend torch, or use --mode horovod")
    if args.data in ("cifar10", "imagefolder") and not args.data_dir:
        raise SystemExit(f"--data {args.data} needs --data-dir (no download happens here)")
    for name in ("epochs", "batch_size", "sync_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


# ---------------------------------------------------------------------------------- set-up
def load_data(args: argparse.Namespace, ctx: DistContext) -> tuple[Any, Any, dict[str, int]]:
    kw: dict[str, Any] = {}
    if args.data == "synthetic":  # like Horovod's synthetic benchmark: ImageNet classes for zoo models
        kw = dict(num_samples=args.synthetic_samples, image_size=args.image_size, in_channels=3,
                  num_classes=10 if args.model in MODEL_NAMES else 1000)
    data = load_dataset(args.data, args.data_dir, **kw)
    shape = dict(num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size)
    if isinstance(data, DataSplit):
        augment = cifar_augment if args.augment else None
        train = ShardedBatches(data.train_x, data.train_y, args.batch_size, ctx.size, ctx.rank, args.seed,
                               args.shards, augment)
        test = (data.test_x[ctx.rank::ctx.size], data.test_y[ctx.rank::ctx.size])
    else:
        train = FolderBatches(data.train, args.batch_size, ctx.size, ctx.rank, args.seed, args.shards, args.workers)
        test = torch.utils.data.DataLoader(torch.utils.data.Subset(data.test, range(ctx.rank, len(data.test), ctx.size)),
                                           batch_size=256, num_workers=args.workers)
    return train, test, shape


def make_optimizer(args: argparse.Namespace, model: nn.Module, ctx: DistContext) -> torch.optim.Optimizer:
    scale = 1 if args.no_lr_scaling else ctx.size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * scale, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    if args.mode in ("ssd", "local-sgd"):
        from .compression import Compression
        return DistributedOptimizer(
            opt, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(),
            compression=Compression.fp16 if args.fp16_allreduce else Compression.none,
            sync_every=args.sync_every, delay=0 if args.mode == "local-sgd" else args.delay,
            warmup_steps=args.warmup_steps, glu_beta=args.glu_beta, compensation=args.compensation,
            backend=ctx.comm)
    if args.mode == "horovod":
        import horovod.torch as hvd
        return hvd.DistributedOptimizer(
            opt, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none)
    return opt


def make_lr_schedule(args: argparse.Namespace, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     size: int) -> torch.optim.lr_scheduler.LambdaLR:
    scale = 1 if args.no_lr_scaling else size
    warm = int(args.lr_warmup_epochs * steps_per_epoch)
    total = args.epochs * steps_per_epoch
    milestones = [int(m * steps_per_epoch) for m in args.lr_milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (1 + (scale - 1) * step / warm) / scale
        if args.lr_schedule == "step":
            return args.lr_gamma ** sum(step >= m for m in milestones)
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def bytes_per_step(args: argparse.Namespace, model: nn.Module) -> int:
    """Gradient payload of one allreduce (the baselines' every step, SSD-SGD's warm-up)."""
    width = 2 if args.fp16_allreduce else 4
    return sum(p.numel() for p in model.parameters() if p.requires_grad) * width


def steady_bytes_per_step(stats: Any, gradient_bytes: int, steps: int) -> float:
    """SSD-SGD's payload per step after warm-up (the warm-up sends gradients every step)."""
    after = steps - stats.warmup_allreduces
    return (stats.bytes_allreduced - stats.warmup_allreduces * gradient_bytes) / after if after > 0 else 0.0


def _total(values: Any) -> Optional[float]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def optimizer_step(args: argparse.Namespace, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   model: nn.Module, ssd: bool) -> float:
    """Horovod's protocol: synchronize, then unscale/clip, then step inside skip_synchronize.
    Returns the seconds the Horovod baseline waited in synchronize() (its exposed communication)."""
    synced, waited = False, 0.0
    if args.mode == "horovod":
        t0 = time.perf_counter()
        opt.synchronize()
        waited, synced = time.perf_counter() - t0, True
    if args.clip_grad_norm or scaler.is_enabled():
        if ssd and not synced:
            opt.synchronize()  # averages the gradients during SSD-SGD's warm-up
            synced = True
        scaler.unscale_(opt)
        if args.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
    if synced:
        with opt.skip_synchronize():
            scaler.step(opt)
    else:
        scaler.step(opt)
    return waited


class StepTiming:
    """Sums of step, compute and communication-wait seconds over some steps."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.compute, self.comm = 0, 0.0, 0.0, 0.0

    def add(self, step_seconds: float, comm_seconds: float) -> None:
        self.steps += 1
        self.seconds += step_seconds
        self.compute += step_seconds - comm_seconds
        self.comm += comm_seconds

    def ms(self, what: str) -> Optional[float]:
        return 1e3 * getattr(self, what) / self.steps if self.steps else None

    def images_per_sec(self, batch_size: int) -> Optional[float]:
        return batch_size * self.steps / self.seconds if self.steps else None


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm preemption or time limit); ranks agree on it collectively."""

    def __init__(self) -> None:
        self.raised = False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def evaluate(model: nn.Module, test: Any, ctx: DistContext, amp_dtype: Optional[torch.dtype]) -> tuple[float, float]:
    """(accuracy, mean loss) over the whole test set, each rank scoring its shard."""
    model.eval()
    correct = loss_sum = count = 0.0
    batches = ([(test[0][i:i + 512], test[1][i:i + 512]) for i in range(0, len(test[1]), 512)]
               if isinstance(test, tuple) else test)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x, y in batches:
            x, y = x.to(ctx.device), y.to(ctx.device)
            out = model(x).float()
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(y)
    model.train()
    correct, loss_sum, count = ctx.all_sum([correct, loss_sum, count])
    return correct / count, loss_sum / count


# ---------------------------------------------------------------------------------- the run
def train(args: argparse.Namespace) -> int:
    ctx = init_distributed(args.backend, args.device)
    check_args(args, ctx.backend)
    out = Path(args.out)
    if ctx.is_root:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    train_batches, test, shape = load_data(args, ctx)
    model = build_model(args.model, **shape).to(ctx.device)
    # every rank starts from rank 0's weights
    ctx.comm.broadcast_(list(model.state_dict().values()), root_rank=0, name="train.init")
    net: nn.Module = model
    if args.mode == "ddp":
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    opt = make_optimizer(args, model, ctx)
    steps_per_epoch = train_batches.steps_per_epoch
    sched = make_lr_schedule(args, opt, steps_per_epoch, ctx.size)
    amp_dtype = (torch.float16 if ctx.device.type == "cuda" else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda")

    manifest_expect = {"model": args.model, "mode": args.mode, "data": args.data, "batch_size": args.batch_size,
                       "parameters": [[n, list(p.shape)] for n, p in sorted(model.named_parameters())]}
    epoch, step_in_epoch, global_step, train_seconds = 0, 0, 0, 0.0
    if args.resume is not None:
        found = checkpoint.find(args.resume or out)
        if found is None:
            if ctx.is_root:
                print(f"no checkpoint in {args.resume or out}: starting a new run", flush=True)
        else:
            state, _ = checkpoint.load(found, ctx.rank, ctx.size, manifest_expect, map_location=ctx.device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            epoch, step_in_epoch, global_step = (state["position"][k] for k in ("epoch", "step_in_epoch", "global_step"))
            train_seconds = state["train_seconds"]
            if ctx.is_root:
                print(f"resumed from {found} at epoch {epoch}, step {global_step}", flush=True)

    def save_checkpoint(next_epoch: int, next_step_in_epoch: int) -> Path:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(), "train_seconds": train_seconds,
                 "position": {"epoch": next_epoch, "step_in_epoch": next_step_in_epoch, "global_step": global_step}}
        return checkpoint.save(out / "checkpoints", global_step, ctx.rank, ctx.size, state,
                               dict(manifest_expect, label=args.label), ctx.barrier)

    log = runlog.RunLog(out, ctx.is_root)
    log.write("start", mode=args.mode, backend=ctx.backend, ranks=ctx.size, device=str(ctx.device),
              model=args.model, parameters=count_parameters(model), data=args.data, label=args.label,
              resumed_at=global_step, args=vars(args))
    preempt = PreemptionFlag()
    ssd = hasattr(opt, "ssd_stats")
    baseline_bytes = bytes_per_step(args, model) if args.mode in ("horovod", "ddp") else 0
    total_steps = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    bar = tqdm(total=total_steps, initial=global_step, disable=not ctx.is_root or args.no_progress,
               unit="step", mininterval=1.0, dynamic_ncols=True)
    crit = nn.CrossEntropyLoss()
    stopped_by = None
    timing = {"run": StepTiming(), "steady": StepTiming()}
    acc = test_loss = None
    while epoch < args.epochs and stopped_by is None:
        for x, y in train_batches.epoch(epoch, step_in_epoch):
            t0 = time.perf_counter()
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            opt.zero_grad()
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = crit(net(x), y)
            scaler.scale(loss).backward()
            wait_before = opt.ssd_stats.comm_wait_seconds if ssd else 0.0
            bytes_before = opt.ssd_stats.bytes_allreduced if ssd else 0
            baseline_wait = optimizer_step(args, opt, scaler, model, ssd)
            scaler.update()
            sched.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            t1 = time.perf_counter()
            step_time = t1 - t0
            comm_wait = (opt.ssd_stats.comm_wait_seconds - wait_before) if ssd else baseline_wait
            sent = (opt.ssd_stats.bytes_allreduced - bytes_before) if ssd else baseline_bytes
            train_seconds += step_time
            timing["run"].add(step_time, comm_wait)
            if global_step >= args.warmup_steps:   # the same boundary for every mode
                timing["steady"].add(step_time, comm_wait)
            global_step += 1
            step_in_epoch += 1
            loss_value = float(loss.detach())
            log.write("step", step=global_step, epoch=epoch, wall=round(train_seconds, 6),
                      step_time=step_time, compute_time=step_time - comm_wait, comm_wait=comm_wait,
                      bytes=sent, loss=loss_value, lr=sched.get_last_lr()[0])
            bar.update(1)
            if bar.n % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{ctx.size * len(y) / step_time:.0f}", refresh=False)
            if args.preempt_at_step == global_step and ctx.is_root:
                preempt.raised = True
            if global_step % args.signal_check_every == 0 and ctx.all_sum([float(preempt.raised)])[0] > 0:
                stopped_by = "preemption"
                break
            if args.max_steps and global_step >= args.max_steps:
                stopped_by = "max-steps"
                break
        if stopped_by == "preemption":
            path = save_checkpoint(epoch, step_in_epoch)
            log.write("preempted", step=global_step, checkpoint=str(path))
            if ctx.is_root:
                print(f"\npreemption signal: checkpoint {path} written at step {global_step}; "
                      f"rerun with --resume to continue", flush=True)
            break
        if ssd:
            opt.finish()   # land the window in flight on every rank before evaluating
        acc, test_loss = evaluate(net, test, ctx, amp_dtype)
        finished_epoch = step_in_epoch >= steps_per_epoch
        log.write("epoch", epoch=epoch, step=global_step, wall=round(train_seconds, 6), test_accuracy=acc,
                  test_loss=test_loss, complete=finished_epoch)
        if finished_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        last = epoch >= args.epochs or stopped_by is not None
        if last or (args.checkpoint_every and epoch % args.checkpoint_every == 0 and finished_epoch):
            save_checkpoint(epoch, step_in_epoch)
    bar.close()

    if stopped_by != "preemption":
        peak = (torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        mine = {"images_per_sec": {k: t.images_per_sec(args.batch_size) for k, t in timing.items()},
                "peak_memory_bytes": peak}
        per_rank = ctx.comm.allgather_object(mine)
        run, steady = timing["run"], timing["steady"]
        summary = {
            "mode": args.mode, "ranks": ctx.size, "steps": global_step, "epochs": epoch,
            # whole run (SSD-SGD's warm-up included) and steady state (steps after --warmup-steps)
            "images_per_sec": _total(r["images_per_sec"]["run"] for r in per_rank),
            "steady_images_per_sec": _total(r["images_per_sec"]["steady"] for r in per_rank),
            "rank_images_per_sec": [r["images_per_sec"]["steady"] for r in per_rank],
            "step_ms": run.ms("seconds"), "compute_ms": run.ms("compute"), "comm_wait_ms": run.ms("comm"),
            "steady_step_ms": steady.ms("seconds"), "steady_compute_ms": steady.ms("compute"),
            "steady_comm_wait_ms": steady.ms("comm"),
            "bytes_per_step": steady_bytes_per_step(opt.ssd_stats, bytes_per_step(args, model), global_step)
            if ssd else baseline_bytes,
            "test_accuracy": acc, "test_loss": test_loss, "wall_seconds": train_seconds,
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in per_rank],
            "extra_state_bytes": opt.extra_state_bytes if ssd else 0,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "ssd_stats": opt.ssd_stats.as_dict() if ssd else None,
            "label": args.label,
        }
        log.write("summary", **summary)
        if ctx.is_root:
            print(runlog.format_table([summary]))
            runlog.plot([out], out / "curves.png")
    log.close()
    shutdown(ctx)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summarize"]:
        if len(argv) < 2:
            raise SystemExit("usage: python -m ssd_allreduce.train summarize RUN_DIR [RUN_DIR ...]")
        print(runlog.summarize(argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
