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
import gc
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, runlog
from ..settings import AUTO
from .data import DataSplit, FolderBatches, ShardedBatches, cifar_augment, load_dataset
from .launch import DistContext, check_slurm_step, init_distributed, shutdown
from .models import MODEL_NAMES, build_language_model, build_model, count_parameters
from .elastic import fit_elastic
from .modes import Mode, make_mode
from .options import build_parser, build_summarize_parser, check_args, warmup_steps_for
from .rollcall import RollCall
from .watchdog import Watchdog, fault_timeout, stop_label

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PHASES = {"warmup": "step {step} (warm-up: gradients averaged every step)",
          "window": "step {step} (a window in flight)", "step": "step {step}",
          "checkpoint": "the checkpoint at step {step}", "evaluation": "the evaluation after step {step}"}
FAULT_SIGNALS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}


# ---------------------------------------------------------------------------------- set-up
def load_data(args: argparse.Namespace, ctx: DistContext) -> tuple[Any, Any, Callable[[], nn.Module], Optional[str]]:
    """(this rank's training batches, the whole test set, a builder of the model, the text corpus's
    fingerprint or None)."""
    if args.data == "stdlib":
        text = load_dataset("stdlib", context=args.context, max_bytes=args.corpus_bytes)
        train = ShardedBatches(text.train_x, text.train_y, args.batch_size, ctx.size, ctx.rank, args.seed,
                               args.shards, groups=text.train_groups)
        return train, (text.test_x, text.test_y), lambda: build_language_model(
            args.model, text.vocab_size, text.context, args.gpt_width, args.gpt_layers, args.gpt_heads), \
            text.fingerprint
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
        return train, (data.test_x, data.test_y), lambda: build_model(args.model, **shape), None
    train = FolderBatches(data.train, args.batch_size, ctx.size, ctx.rank, args.seed, args.shards, args.workers)
    return train, data.test, lambda: build_model(args.model, **shape), None


def shard_test(test: Any, ctx: DistContext, args: argparse.Namespace) -> Any:
    """This rank's share of the first ``--eval-samples`` test samples (all of them when 0)."""
    if isinstance(test, tuple):
        x, y = test
        end = args.eval_samples or len(y)
        return x[ctx.rank:end:ctx.size], y[ctx.rank:end:ctx.size]
    end = min(len(test), args.eval_samples or len(test))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(test, range(ctx.rank, end, ctx.size)),
                                       batch_size=256, num_workers=args.workers)


def check_same_corpus(fingerprint: str, ctx: DistContext) -> None:
    """Every rank must have built the same text corpus (it comes from each node's own Python)."""
    prints = ctx.comm.allgather_object(fingerprint)
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    if differ:
        raise SystemExit(f"rank {ctx.rank}: the standard-library corpus of rank(s) {differ} differs from rank 0's "
                         f"(each rank reads its own Python's library): run every rank with the same Python "
                         f"installation (this one: {sys.version.split()[0]} at {sys.base_prefix})")


def make_lr_schedule(args: argparse.Namespace, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     size: int) -> torch.optim.lr_scheduler.LambdaLR:
    scale = 1 if args.no_lr_scaling else size
    warm = int(args.lr_warmup_epochs * steps_per_epoch)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
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


def set_schedule_step(sched: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put ``sched`` (and its optimizer's learning rates) where it stands after ``step`` steps."""
    lrs = [base * factor(step) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched.last_epoch, sched._last_lr = step, lrs


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain values (checkpoints load them with
    ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``'s output (loaded on any device: generator states live on the CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------- bookkeeping
@dataclass
class Position:
    """Where training stands: the next epoch and step to run, and the training time so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    train_seconds: float = 0.0


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


class Trainer:
    """One rank's run: the model, its mode, schedule, scaler and position, and what is saved."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, watchdog: Watchdog) -> None:
        self.args, self.ctx, self.watchdog = args, ctx, watchdog
        self.fault = None
        if args.fault_at:
            sig, kind, step, rank = args.fault_at.split(":")
            self.fault = (FAULT_SIGNALS[sig], kind, int(step), int(rank))
        self.out = Path(args.out)
        seed_everything(args.seed)
        self.batches, self.test_set, make_model, self.corpus_fingerprint = load_data(args, ctx)
        self.test = shard_test(self.test_set, ctx, args)
        # "epoch" becomes this run's number (the mode, the log and the timing use it)
        args.warmup_steps = warmup_steps_for(args.warmup_steps, self.batches.steps_per_epoch)
        self.model = make_model().to(ctx.device)
        if not args.elastic:   # an elastic rank may join late: no collective before hvd.elastic.run
            self.check_ranks()
            # every rank starts from rank 0's weights (an elastic job's first sync does it)
            ctx.comm.broadcast_(list(self.model.state_dict().values()), root_rank=0, name="train.init")
        self.mode: Mode = make_mode(args, self.model, ctx)
        self.opt = self.mode.optimizer
        self.sched = make_lr_schedule(args, self.opt, self.batches.steps_per_epoch, ctx.size)
        self.amp_dtype = (torch.float16 if ctx.device.type == "cuda" else torch.bfloat16) if args.amp else None
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp and ctx.device.type == "cuda")
        self.position = Position()
        self.manifest = {"model": args.model, "mode": args.mode, "data": args.data, "batch_size": args.batch_size,
                         "parameters": [[n, list(p.shape)] for n, p in sorted(self.model.named_parameters())]}
        self.timing = {"run": StepTiming(), "steady": StepTiming()}
        self.crit = nn.CrossEntropyLoss()
        self._compute_seconds = 0.0   # forward and backward of the last step

    def check_ranks(self) -> None:
        """Collective checks of what each rank found: a writable checkpoint directory, the same corpus."""
        checkpoint.check_writable(self.out / "checkpoints", self.ctx.rank, self.ctx.comm.allgather_object)
        if self.corpus_fingerprint is not None:
            check_same_corpus(self.corpus_fingerprint, self.ctx)

    def mark(self, kind: str, step: int) -> None:
        """Training reached phase ``kind`` (a key of PHASES) at ``step``: tell the watchdog (and, in
        tests, send the fault asked for with --fault-at to this very process)."""
        self.watchdog.progress(PHASES[kind].format(step=step))
        if self.fault is not None and self.fault[1:] == (kind, step, self.ctx.rank):
            mark = self.out / f"fault-rank{self.ctx.rank}.time"
            if mark.exists():   # sent once per run: the run resumed after it goes on
                return
            mark.write_text(f"{time.time()!r} {os.getpid()}")
            os.kill(os.getpid(), self.fault[0])

    def adopt_world(self, rank: int, size: int, position: Position, committed_size: int) -> None:
        """Continue at ``position``, committed when there were ``committed_size`` ranks, as rank
        ``rank`` of ``size`` (elastic training): the data is resharded and the epoch goes on after
        the samples already seen (exactly with shuffled shards, to within one global batch), and
        the learning rate follows the new world size."""
        ctx, args = self.ctx, self.args
        ctx.rank, ctx.size = rank, size
        ctx.comm.refresh()
        self.batches.reshard(size, rank)
        self.test = shard_test(self.test_set, ctx, args)
        if committed_size != size:
            position.step_in_epoch = min(position.step_in_epoch * committed_size // size,
                                         self.batches.steps_per_epoch)
        self.position = position
        for group in self.opt.param_groups:
            group["initial_lr"] = args.lr * (1 if args.no_lr_scaling else size)
        self.sched = make_lr_schedule(args, self.opt, self.batches.steps_per_epoch, size)
        # the schedule counts epochs in this size's steps
        set_schedule_step(self.sched, position.epoch * self.batches.steps_per_epoch + position.step_in_epoch)

    @property
    def total_steps(self) -> float:
        return min(self.args.max_steps or math.inf, self.args.epochs * self.batches.steps_per_epoch)

    def resume(self, where: str) -> None:
        """Continue from the newest intact checkpoint of ``where`` (a fresh start when there is none)."""
        ctx = self.ctx
        found, state, passed_over = checkpoint.resume_state(where, ctx.rank, ctx.size, self.manifest,
                                                            ctx.comm.allgather_object, map_location=ctx.device)
        if ctx.is_root:
            for reason in passed_over:
                print(f"passed over a damaged checkpoint: {reason}", flush=True)
        if found is None:
            if ctx.is_root:
                print(f"no checkpoint in {where}: starting a new run", flush=True)
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.position = Position(**state["position"])
        if ctx.is_root:
            print(f"resumed from {found} at epoch {self.position.epoch}, step {self.position.global_step}", flush=True)

    def save_checkpoint(self) -> Path:
        self.mark("checkpoint", self.position.global_step)
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                 "position": asdict(self.position)}
        return checkpoint.save(self.out / "checkpoints", self.position.global_step, self.ctx.rank, self.ctx.size,
                               state, dict(self.manifest, label=self.args.label), self.ctx.comm.allgather_object,
                               keep=self.args.keep_checkpoints)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Forward, backward and the mode's step on one batch; returns the step's log record."""
        ctx, pos = self.ctx, self.position
        t0 = time.perf_counter()
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        self.opt.zero_grad()
        with torch.autocast(ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.crit(self.mode.net(x).flatten(0, -2), y.flatten())   # (B, T, V) for text
        slept = 0.0
        straggler = self.args.slow_rank == ctx.rank
        if straggler:   # its compute takes (1 + fraction) times as long
            slept = self.args.slow_fraction * self._compute_seconds
            time.sleep(slept)
        self.scaler.scale(loss).backward()
        if straggler and ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)   # time the kernels, not their launch
        self._compute_seconds = time.perf_counter() - t0 - slept
        cost = self.mode.step(self.scaler)
        self.scaler.update()
        self.sched.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        step_time = time.perf_counter() - t0
        pos.train_seconds += step_time
        self.timing["run"].add(step_time, cost.wait_seconds)
        if self._steady(pos.global_step):
            self.timing["steady"].add(step_time, cost.wait_seconds)
        pos.global_step += 1
        pos.step_in_epoch += 1
        return {"step": pos.global_step, "epoch": pos.epoch, "wall": round(pos.train_seconds, 6),
                "step_time": step_time, "compute_time": step_time - cost.wait_seconds,
                "comm_wait": cost.wait_seconds, "bytes": cost.bytes, "loss": float(loss.detach()),
                "lr": self.sched.get_last_lr()[0], "images_per_sec": ctx.size * len(y) / step_time}

    def _steady(self, step: int) -> bool:
        """``step`` counts in the steady-state figures: it is past ``--warmup-steps``, the same
        boundary for every mode, or with ``auto`` past this mode's own warm-up."""
        if self.args.warmup_steps == AUTO:
            end = self.mode.warmup_end()
            return end is not None and step >= end
        return step >= self.args.warmup_steps

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean loss) over the test set, each rank scoring its shard (per token for text)."""
        self.mark("evaluation", self.position.global_step)
        self.mode.before_evaluation()
        net, ctx = self.mode.net, self.ctx
        net.eval()
        correct = loss_sum = count = 0.0
        batches = ([(self.test[0][i:i + 512], self.test[1][i:i + 512]) for i in range(0, len(self.test[1]), 512)]
                   if isinstance(self.test, tuple) else self.test)
        with torch.no_grad(), torch.autocast(ctx.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None):
            for x, y in batches:
                self.watchdog.progress(self.watchdog.phase)
                x, y = x.to(ctx.device), y.to(ctx.device)
                out, y = net(x).float().flatten(0, -2), y.flatten()
                loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
                count += len(y)
        net.train()
        correct, loss_sum, count = ctx.all_sum([correct, loss_sum, count])
        return correct / count, loss_sum / count

    def summary(self, accuracy: Optional[float], test_loss: Optional[float]) -> dict[str, Any]:
        """The run's figures, throughput summed over ranks (collective)."""
        args, ctx = self.args, self.ctx
        peak = (torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        mine = {"images_per_sec": {k: t.images_per_sec(args.batch_size) for k, t in self.timing.items()},
                "peak_memory_bytes": peak}
        per_rank = ctx.comm.allgather_object(mine)
        run, steady = self.timing["run"], self.timing["steady"]
        steps = self.position.global_step
        return {
            "mode": args.mode, "ranks": ctx.size, "steps": steps, "epochs": self.position.epoch,
            # whole run (SSD-SGD's warm-up included) and steady state (steps after --warmup-steps)
            "images_per_sec": _total(r["images_per_sec"]["run"] for r in per_rank),
            "steady_images_per_sec": _total(r["images_per_sec"]["steady"] for r in per_rank),
            "rank_images_per_sec": [r["images_per_sec"]["steady"] for r in per_rank],
            "step_ms": run.ms("seconds"), "compute_ms": run.ms("compute"), "comm_wait_ms": run.ms("comm"),
            "steady_step_ms": steady.ms("seconds"), "steady_compute_ms": steady.ms("compute"),
            "steady_comm_wait_ms": steady.ms("comm"),
            "bytes_per_step": self.mode.bytes_per_step(steps),
            "test_accuracy": accuracy, "test_loss": test_loss, "wall_seconds": self.position.train_seconds,
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in per_rank],
            "parameter_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "label": args.label, **self.mode.summary(),
        }


def _total(values: Any) -> Optional[float]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


# ---------------------------------------------------------------------------------- the run
def train(args: argparse.Namespace) -> int:
    timeout = fault_timeout(args.fault_timeout)
    ctx = init_distributed(args.backend, args.device, timeout)
    check_slurm_step(ctx.size, ctx.backend)
    check_args(args, ctx.backend, ctx.size)
    watchdog = Watchdog(timeout, ctx.rank)
    # elastic: a joining rank must not meet the others in a collective before hvd.elastic.run
    if timeout > 0 and ctx.size > 1 and not args.elastic:
        watchdog.rollcall = RollCall.start(ctx.comm, lambda: watchdog.phase)
    try:
        run(args, ctx, watchdog)
    except Exception as exc:   # a lost peer shows here as the backend's error: say where it hit
        lost = ""
        if watchdog.rollcall is not None:
            watchdog.rollcall.leave(type(exc).__name__)
            lost = watchdog.rollcall.lost()
        print(f"{stop_label(ctx.rank)} stopped during {watchdog.phase}{lost}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        if watchdog.rollcall is not None:
            watchdog.rollcall.said()   # the peers stopping too print theirs before this rank's exit ends them
        raise                  # the watchdog still bounds what exit hooks may wait for
    watchdog.stop()
    if watchdog.rollcall is not None:
        watchdog.rollcall.leave("finished")
        watchdog.rollcall.close()
    return 0


def run(args: argparse.Namespace, ctx: DistContext, watchdog: Watchdog) -> None:
    """Set-up, resume, the epoch loop, the summary."""
    trainer = Trainer(args, ctx, watchdog)
    if args.resume is not None:
        trainer.resume(args.resume or str(trainer.out))
    pos = trainer.position
    log = runlog.RunLog(trainer.out, ctx.is_root)
    log.write("start", mode=args.mode, backend=ctx.backend, ranks=ctx.size, device=str(ctx.device),
              threads=torch.get_num_threads(),
              model=args.model, parameters=count_parameters(trainer.model), data=args.data, label=args.label,
              resumed_at=pos.global_step, args=vars(args))
    preempt = PreemptionFlag()
    bar = tqdm(total=trainer.total_steps, initial=pos.global_step, unit="step", mininterval=1.0,
               disable=not ctx.is_root or args.no_progress, dynamic_ncols=True)
    if args.elastic:
        stopped_by, accuracy, test_loss = fit_elastic(trainer, log, preempt, bar, fit)
    else:
        stopped_by, accuracy, test_loss = fit(trainer, log, preempt, bar)
    bar.close()
    if stopped_by != "preemption":
        summary = trainer.summary(accuracy, test_loss)
        log.write("summary", **summary)
        if ctx.is_root:
            print(runlog.format_table([summary]))
            runlog.plot([trainer.out], trainer.out / "curves.png")
    log.close()
    # DDP's reducer holds the process group: release it before the group is torn down (a reducer
    # outliving the group aborted one rank at exit, "terminate called without an active exception")
    del trainer
    gc.collect()
    shutdown(ctx)


def fit(trainer: Trainer, log: runlog.RunLog, preempt: PreemptionFlag, bar: tqdm,
        commit: Optional[Callable[[], None]] = None) -> tuple[Optional[str], Optional[float], Optional[float]]:
    """The epoch loop from ``trainer.position`` on: (what stopped it early, if anything; the last
    accuracy and test loss). ``commit`` (elastic training) runs every ``--commit-every`` steps."""
    args, ctx, pos = trainer.args, trainer.ctx, trainer.position
    stopped_by: Optional[str] = None
    accuracy = test_loss = None
    while pos.epoch < args.epochs and stopped_by is None:
        for x, y in trainer.batches.epoch(pos.epoch, pos.step_in_epoch):
            trainer.mark(trainer.mode.phase(), pos.global_step)
            record = trainer.train_step(x, y)
            log.write("step", **{k: v for k, v in record.items() if k != "images_per_sec"})
            bar.update(1)
            if bar.n % 10 == 0:
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_sec']:.0f}", refresh=False)
            if args.eval_every and pos.global_step % args.eval_every == 0:
                accuracy, test_loss = trainer.evaluate()
                log.write("eval", step=pos.global_step, wall=round(pos.train_seconds, 6), test_accuracy=accuracy,
                          test_loss=test_loss)
            if args.preempt_at_step == pos.global_step and ctx.is_root:
                preempt.raised = True
            if pos.global_step % args.signal_check_every == 0 and ctx.all_sum([float(preempt.raised)])[0] > 0:
                stopped_by = "preemption"
                break
            if args.max_steps and pos.global_step >= args.max_steps:
                stopped_by = "max-steps"
                break
            if commit is not None and pos.global_step % args.commit_every == 0:
                commit()
        if stopped_by == "preemption":
            path = trainer.save_checkpoint()
            log.write("preempted", step=pos.global_step, checkpoint=str(path))
            if ctx.is_root:
                how = ("rerun with --resume, without --elastic, at this number of ranks" if args.elastic
                       else "rerun with --resume")
                print(f"\npreemption signal: checkpoint {path} written at step {pos.global_step}; "
                      f"{how} to continue", flush=True)
            break
        accuracy, test_loss = trainer.evaluate()
        finished_epoch = pos.step_in_epoch >= trainer.batches.steps_per_epoch
        log.write("epoch", epoch=pos.epoch, step=pos.global_step, wall=round(pos.train_seconds, 6),
                  test_accuracy=accuracy, test_loss=test_loss, complete=finished_epoch)
        if finished_epoch:
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        last = pos.epoch >= args.epochs or stopped_by is not None
        if last or (args.checkpoint_every and pos.epoch % args.checkpoint_every == 0 and finished_epoch):
            trainer.save_checkpoint()
    return stopped_by, accuracy, test_loss


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summarize"]:
        runs = build_summarize_parser().parse_args(argv[1:]).runs
        try:
            print(runlog.summarize(runs))
        except (OSError, ValueError) as exc:   # not a run directory, or a run that did not finish
            raise SystemExit(f"summarize: {exc}") from None
        return 0
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return train(args)
