"""The driver's command line: every option, and the checks that reject what cannot work.

The benchmarks (``python -m ssd_allreduce.bench``) launch this driver and take its names for the
same things: ``--ranks``, ``--batch-size`` (per rank), ``--max-steps``, ``--warmup-steps``,
``--sync-every``/``--delay``, ``--glu-beta``, ``--slow-rank``/``--slow-fraction``, ``--gpt-width``/
``--gpt-layers``/``--gpt-heads``; the help texts below are theirs too.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Callable, Union

from ..cli import HelpFormatter, add_version
from ..noise import MIN_STEPS as NOISE_MIN_STEPS
from ..settings import AUTO as AUTO_WARMUP
from ..settings import DEFAULT_GLU_BETA, DEFAULT_LOCAL_LR_SCALE, DEFAULT_WARMUP_STEPS, MIN_WARMUP_STEPS, SSDSettings
from ..warmup_end import MAX_AUTO_WARMUP_STEPS
from .data import DATASET_NAMES, SHARD_MODES
from .modes import MODES

PROG = "python -m ssd_allreduce.train"
DESCRIPTION = "Train a model with SSD-SGD or a baseline, under any launcher, on CPUs or GPUs."
USAGE = f"{PROG} [OPTIONS]\n       {PROG} summarize RUN_DIR [RUN_DIR ...]"
EPILOG = f"""commands:
  summarize RUN_DIR [RUN_DIR ...]
                        print one table of finished runs side by side (each run directory's summary);
                        {PROG} summarize --help

launch under horovodrun, torchrun, srun --mpi=pmix or mpirun, e.g.
  horovodrun -np 2 {PROG} --mode ssd --data digits --model cnn --out runs/ssd"""

WARMUP_EPOCH = "epoch"
"""``--warmup-steps epoch``: one epoch's steps, at most the library's DEFAULT_WARMUP_STEPS."""

# help texts the benchmarks share with the driver
WARMUP_HELP = (f"steps of synchronous SGD (gradients averaged every step) before SSD-SGD's delay stage; "
               f"also where every mode's steady-state figures start. An integer, or {WARMUP_EPOCH}: one "
               f"epoch's steps, at most {DEFAULT_WARMUP_STEPS} (the library's default, "
               f"DistributedOptimizer(warmup_steps={DEFAULT_WARMUP_STEPS}): the paper warmed up "
               f"{DEFAULT_WARMUP_STEPS} iterations, about one epoch)")
TRAIN_WARMUP_HELP = (WARMUP_HELP + f"; {AUTO_WARMUP}: until the ranks' gradient noise reaches their number, at "
                     f"most {MAX_AUTO_WARMUP_STEPS} steps (the steady-state figures start there, and after "
                     f"{NOISE_MIN_STEPS} steps in modes without a warm-up)")
SYNC_EVERY_HELP = ("k: local steps per window, each window's model delta averaged by one allreduce; auto: "
                   "the smallest k whose steps hide the allreduce and its own cost, landing after the fewest steps "
                   "that hide the allreduce, from times measured in the warm-up")
DELAY_HELP = ("d: local steps a window's allreduce overlaps before it lands (0 <= d <= k); auto (the default): "
              f"the fewest steps that hide the allreduce, timed in the warm-up (k where it is under "
              f"{MIN_WARMUP_STEPS} steps, or k = 1)")
GLU_BETA_HELP = ("GLU's beta: how much of its own progress a rank keeps when a window lands (1) versus the "
                 "global estimate (0); auto: by the delay, 0.75 for d <= 2 down to 0.5 from d = 4 (measured "
                 "in docs/BENCHMARKS.md, Quality)")
LOCAL_LR_SCALE_HELP = ("the local steps' learning rate after the warm-up, relative to the schedule's; auto: "
                       "sqrt(ranks) for AdamW (a rank's noisier gradient shortens its normalised step), 1 for SGD")
BATCH_SIZE_HELP = "samples per step on each rank (the global batch is this times the ranks)"
SLOW_RANK_HELP = "emulate a straggler: this rank's compute takes --slow-fraction longer (-1: none)"
SLOW_FRACTION_HELP = "how much longer the --slow-rank's forward and backward take (0.5: 50 %%)"
GPT_HELP = {"width": "GPT (--model gpt): width of the embeddings", "layers": "GPT: transformer blocks",
            "heads": "GPT: attention heads (a divisor of --gpt-width)"}


def _number_or(word: str, convert: type, kind: str) -> Callable[[str], Union[int, float, str]]:
    """An argparse type: ``word`` as it is, else ``convert(value)`` ("expected {kind} or {word}")."""
    def parse(value: str) -> Union[int, float, str]:
        if value == word:
            return value
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} or {word}, got {value!r}") from None
    return parse


float_or_auto = _number_or("auto", float, "a number")
int_or_auto = _number_or("auto", int, "an integer")
int_or_epoch = _number_or(WARMUP_EPOCH, int, "an integer")   # --warmup-steps


def warmup_steps_value(value: str) -> Union[int, str]:
    """``train --warmup-steps``: an integer, ``epoch`` or ``auto``."""
    return value if value == AUTO_WARMUP else int_or_epoch(value)


def warmup_steps_for(value: Union[int, str], steps_per_epoch: int) -> Union[int, str]:
    """``--warmup-steps`` in steps: an integer (or ``auto``) as given; ``epoch``: one epoch's
    steps, at most ``DEFAULT_WARMUP_STEPS``."""
    if value == WARMUP_EPOCH:
        return min(steps_per_epoch, DEFAULT_WARMUP_STEPS)
    return value if value == AUTO_WARMUP else int(value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=HelpFormatter)
    add_version(ap)
    _add_launch(ap)
    _add_data(ap)
    _add_model(ap)
    _add_length(ap)
    _add_optimizer(ap)
    _add_ssd(ap)
    _add_faults(ap)
    _add_straggler(ap)
    _add_output(ap)
    return ap


def _add_launch(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("mode and launch")
    g.add_argument("--mode", choices=MODES, default="ssd",
                   help="ssd: SSD-SGD; horovod: hvd.DistributedOptimizer; ddp: torch DistributedDataParallel; "
                        "local-sgd: a blocking average every k steps; no-comm: every rank alone")
    g.add_argument("--backend", choices=("auto", "horovod", "torch", "mpi"), default="auto",
                   help="how the ranks talk (auto: torch under torchrun, else horovod)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: a GPU per rank where there are GPUs, else the CPU")


def _add_data(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("data")
    g.add_argument("--data", choices=DATASET_NAMES, default="digits",
                   help="digits: bundled with scikit-learn; cifar10 and imagefolder: --data-dir; synthetic: "
                        "random images; stdlib: this Python's standard library as text (--model gpt)")
    g.add_argument("--data-dir", help="CIFAR-10 python-format directory or ImageNet-style folder")
    g.add_argument("--synthetic-samples", type=int, default=4096, help="--data synthetic: images in the data set")
    g.add_argument("--image-size", type=int, default=32, help="--data synthetic: height and width of an image")
    g.add_argument("--shards", choices=SHARD_MODES, default="shuffle",
                   help="how the data is split over the ranks: shuffle; label-skew: each rank mostly a few "
                        "classes; by-package (stdlib): each rank its own packages of the library")
    g.add_argument("--context", type=int, default=64, help="--data stdlib: bytes per sequence")
    g.add_argument("--corpus-bytes", type=int, default=2_000_000, help="--data stdlib: size of the corpus")
    g.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-10)")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (image folders)")
    g.add_argument("--batch-size", type=int, default=32, help=BATCH_SIZE_HELP)


def _add_model(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="cnn",
                   help="mlp, cnn, resnet20..resnet110 or a torchvision name; gpt for --data stdlib")
    g.add_argument("--gpt-width", type=int, default=144, help=GPT_HELP["width"])
    g.add_argument("--gpt-layers", type=int, default=4, help=GPT_HELP["layers"])
    g.add_argument("--gpt-heads", type=int, default=4, help=GPT_HELP["heads"])


def _add_length(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("length and evaluation")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="steps between evaluations, besides the one at each epoch's end (0: that one only)")
    g.add_argument("--eval-samples", type=int, default=0,
                   help="evaluate on the first this many test samples (0: all of them)")


def _add_optimizer(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="the optimizer every mode wraps (AdamW: --momentum is not used)")
    g.add_argument("--lr", type=float, default=0.05,
                   help="learning rate of one rank; scaled by the rank count (see --no-lr-scaling)")
    g.add_argument("--no-lr-scaling", action="store_true", help="use --lr as it is, whatever the rank count")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (decoupled for AdamW)")
    g.add_argument("--lr-warmup-epochs", type=float, default=0.0,
                   help="epochs of a linear ramp from the one-rank learning rate to the scaled one")
    g.add_argument("--lr-schedule", choices=("constant", "step", "cosine"), default="constant",
                   help="step: times --lr-gamma at each of --lr-milestones; cosine: down to 0 at the end of the last "
                        "epoch, or at --max-steps where that comes first")
    g.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs (step schedule)")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="factor of the step schedule at each milestone")
    g.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="clip the gradients' norm to this (0: no clipping)")
    g.add_argument("--amp", action="store_true", help="float16 + GradScaler on GPUs, bfloat16 on CPUs")


def _add_ssd(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("SSD-SGD (--mode ssd; local-sgd takes --sync-every, --warmup-steps, --local-sync)")
    g.add_argument("--sync-every", type=int_or_auto, default=5, metavar="K|auto", help=SYNC_EVERY_HELP + " (auto: --mode ssd)")
    g.add_argument("--delay", type=int_or_auto, default=None, metavar="D|auto", help=DELAY_HELP)
    g.add_argument("--max-sync-every", type=int, default=16, help="the largest k that --sync-every auto may choose")
    g.add_argument("--warmup-steps", type=warmup_steps_value, default=WARMUP_EPOCH, metavar="N|epoch|auto",
                   help=TRAIN_WARMUP_HELP)
    g.add_argument("--glu-beta", type=float_or_auto, default=DEFAULT_GLU_BETA, metavar="BETA|auto", help=GLU_BETA_HELP)
    g.add_argument("--local-lr-scale", type=float_or_auto, default=DEFAULT_LOCAL_LR_SCALE, metavar="SCALE|auto",
                   help=LOCAL_LR_SCALE_HELP)
    g.add_argument("--outer-lr", type=float, default=1.0,
                   help="an outer optimizer on each window's average delta (DiLoCo's): its learning rate (1 with "
                        "--outer-momentum 0: none; 0.7 with --outer-momentum 0.5, --sync-every 5 and --delay 1 ended "
                        "lower than without it over every run of 600 and 2,000 steps measured; it costs early, so "
                        "not over 300)")
    g.add_argument("--outer-momentum", type=float, default=0.0, help="the outer optimizer's Nesterov momentum")
    g.add_argument("--drift-correction", action="store_true",
                   help="each local step also moves by the last window's average step less this rank's own "
                        "(for shards whose data differ, e.g. --shards label-skew; windows of at most 2 steps; "
                        "two more copies of the weights)")
    g.add_argument("--average-moments", action="store_true",
                   help="AdamW's moments travel with the windows and every rank lands on their average plus its own "
                        "change (for strongly skewed shards; three times the window's bytes; --compression none "
                        "or bf16)")
    g.add_argument("--compensation", choices=("glu", "overwrite"), default="glu",
                   help="what a landing does to a rank's own weights: glu compensates them; overwrite replaces "
                        "them by the global ones (the ablation)")
    g.add_argument("--compression", choices=("none", "fp16", "bf16", "int8"), default="none",
                   help="wire format of SSD-SGD's deltas (int8: a scale per chunk, error feedback; its "
                        "warm-up gradients go as fp16); --mode horovod and ddp take none or fp16")
    g.add_argument("--fp16-allreduce", action="store_true",
                   help="the same as --compression fp16 (Horovod's flag)")
    g.add_argument("--local-sync", choices=("auto", "on", "off"), default="auto",
                   help="hierarchical SSD-SGD: gradients averaged inside each node every step, windows between "
                        "nodes; auto: on where the job has several nodes with several ranks on each (a rank's "
                        "node: $SSD_NODE, else its host name)")


def _add_faults(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("checkpoints, preemption and faults")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of --out (or the one given); "
                        "starts fresh when there is none")
    g.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (0: at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    g.add_argument("--signal-check-every", type=int, default=20,
                   help="steps between the ranks' agreement on a preemption signal (SIGTERM, SIGUSR1)")
    g.add_argument("--preempt-at-step", type=int, default=None, help=argparse.SUPPRESS)   # tests
    g.add_argument("--elastic", action="store_true",
                   help="Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script): "
                        "ranks may leave and join")
    g.add_argument("--commit-every", type=int, default=20,
                   help="--elastic: steps between commits (a change of ranks goes back to the last one); each "
                        "commit lands SSD-SGD's window in flight, a blocking wait")
    g.add_argument("--fault-timeout", type=float, default=None,
                   help="seconds without progress after which a rank stops, naming the step and phase "
                        "(a peer died or froze); default $SSD_FAULT_TIMEOUT or 60, 0 disables")
    # tests: "stop|kill:PHASE:STEP:RANK" sends that signal to this rank at that point (PHASE: warmup,
    # window, step, checkpoint, evaluation)
    g.add_argument("--fault-at", default=None, help=argparse.SUPPRESS)


def _add_straggler(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("straggler emulation")
    g.add_argument("--slow-rank", type=int, default=-1, help=SLOW_RANK_HELP)
    g.add_argument("--slow-fraction", type=float, default=0.0, help=SLOW_FRACTION_HELP)


def _add_output(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("run and output")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the shards and every random draw")
    g.add_argument("--out", default="runs/latest",
                   help="run directory: metrics.jsonl, curves.png, checkpoints/")
    g.add_argument("--label", default="", help="free text stored with the run (e.g. the network)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_summarize_parser() -> argparse.ArgumentParser:
    """``python -m ssd_allreduce.train summarize``."""
    ap = argparse.ArgumentParser(prog=f"{PROG} summarize", formatter_class=HelpFormatter,
                                 description="One table of finished runs side by side, from each run "
                                             "directory's summary (metrics.jsonl).")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory (the --out of a finished run)")
    return ap


def ssd_settings(args: argparse.Namespace) -> SSDSettings:
    """The SSD-SGD settings the flags ask for (``--mode ssd`` or ``local-sgd``), checked as the
    optimizer checks them; raises SystemExit naming the flag to change. ``--warmup-steps epoch``
    is checked as the library's default (one epoch is known once the data is loaded)."""
    warmup = DEFAULT_WARMUP_STEPS if args.warmup_steps == WARMUP_EPOCH else args.warmup_steps
    try:
        return SSDSettings(sync_every=args.sync_every, delay=0 if args.mode == "local-sgd" else args.delay,
                           warmup_steps=warmup, glu_beta=args.glu_beta, compensation=args.compensation,
                           local_lr_scale=args.local_lr_scale, outer_lr=args.outer_lr,
                           outer_momentum=args.outer_momentum, drift_correction=args.drift_correction,
                           average_moments=args.average_moments, compression=args.compression,
                           max_sync_every=args.max_sync_every)
    except ValueError as exc:   # said in the flags' names
        message = str(exc)
        for field in dataclasses.fields(SSDSettings):
            message = re.sub(rf"(?<![\w-]){field.name}\b", f"--{field.name.replace('_', '-')}", message)
        raise SystemExit(message) from None


def check_args(args: argparse.Namespace, backend: str, size: int) -> None:
    """Reject combinations that cannot work, saying what to change (every rank alike)."""
    if args.average_moments and args.optimizer != "adamw":
        raise SystemExit(f"--average-moments carries Adam's moments: give --optimizer adamw (got {args.optimizer})")
    if args.mode == "horovod" and backend != "horovod":
        raise SystemExit(f"--mode horovod needs the Horovod backend (got {backend}); under torchrun use --mode ddp")
    if args.mode == "ddp" and backend != "torch":
        raise SystemExit(f"--mode ddp needs torch.distributed (got {backend}): launch with torchrun or "
                         "pass --backend torch, or use --mode horovod")
    if args.elastic and (backend != "horovod" or args.mode not in ("ssd", "local-sgd", "horovod")
                         or args.data == "imagefolder" or args.amp):
        raise SystemExit(f"--elastic runs under Horovod elastic (horovodrun --min-np/--max-np) with --mode ssd, "
                         f"local-sgd or horovod, an in-memory data set and no --amp (loss scales are not "
                         f"carried across a change of ranks); got backend {backend}, --mode {args.mode}, "
                         f"--data {args.data}{', --amp' if args.amp else ''}")
    if args.elastic and args.resume is not None:
        raise SystemExit("--elastic keeps its state in memory and brings ranks that join up to date itself; "
                         "--resume is for restarting a job that stopped: leave out one of them")
    if args.elastic and args.warmup_steps == WARMUP_EPOCH:
        raise SystemExit(f"--elastic needs --warmup-steps as a number of steps: {WARMUP_EPOCH} (the default) "
                         "counts one epoch at the job's rank count, which changes when ranks join")
    if args.fp16_allreduce:
        if args.compression not in ("none", "fp16"):
            raise SystemExit(f"--fp16-allreduce is --compression fp16; it contradicts --compression {args.compression}")
        args.compression = "fp16"
    if args.mode in ("horovod", "ddp") and args.compression not in ("none", "fp16"):
        raise SystemExit(f"--compression {args.compression} is SSD-SGD's (--mode ssd or local-sgd); --mode "
                         f"{args.mode} sends gradients as none or fp16")
    if args.data in ("cifar10", "imagefolder") and not args.data_dir:
        raise SystemExit(f"--data {args.data} needs --data-dir (no download happens here)")
    text, gpt = args.data == "stdlib", args.model == "gpt"
    if text != gpt:
        raise SystemExit("--model gpt trains on --data stdlib and nothing else: pass both, or neither")
    if args.shards == ("label-skew" if text else "by-package"):
        raise SystemExit(f"--shards {args.shards} does not apply to --data {args.data}: use label-skew for "
                         "images, by-package for stdlib")
    if args.slow_fraction < 0 or args.slow_rank >= size:
        raise SystemExit(f"--slow-rank must be a rank below {size} and --slow-fraction >= 0, got "
                         f"{args.slow_rank} and {args.slow_fraction}")
    if "auto" in (args.sync_every, args.delay) and args.mode != "ssd":
        raise SystemExit(f"--sync-every auto and --delay auto tune SSD-SGD's window: they need --mode ssd, got "
                         f"--mode {args.mode}")
    for name in ("epochs", "batch_size", "sync_every", "keep_checkpoints", "signal_check_every", "context",
                 "commit_every", "gpt_width", "gpt_layers", "gpt_heads", "max_sync_every"):
        if getattr(args, name) != "auto" and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "eval_samples", "max_steps", "warmup_steps"):
        if getattr(args, name) not in (WARMUP_EPOCH, AUTO_WARMUP) and getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.gpt_width % args.gpt_heads:
        raise SystemExit(f"--gpt-width ({args.gpt_width}) must be a multiple of --gpt-heads ({args.gpt_heads})")
    if args.mode in ("ssd", "local-sgd"):
        ssd_settings(args)
