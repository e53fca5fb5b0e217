"""The driver's command line: every option, and the checks that reject what cannot work."""
from __future__ import annotations

import argparse
from typing import Union

from ..settings import DEFAULT_GLU_BETA
from .data import DATASET_NAMES, SHARD_MODES
from .modes import MODES

DESCRIPTION = "Train a model with SSD-SGD or a baseline, under any launcher, on CPUs or GPUs."


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ssd_allreduce.train", description=DESCRIPTION,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="ssd")
    ap.add_argument("--backend", choices=("auto", "horovod", "torch", "mpi"), default="auto",
                    help="auto: torch under torchrun, else horovod")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--model", default="cnn",
                    help="mlp, cnn, resnet20..resnet110 or a torchvision name; gpt for --data stdlib")
    ap.add_argument("--data", choices=DATASET_NAMES, default="digits")
    ap.add_argument("--data-dir", help="CIFAR-10 python-format directory or ImageNet-style folder")
    ap.add_argument("--synthetic-samples", type=int, default=4096)
    ap.add_argument("--image-size", type=int, default=32, help="synthetic data only")
    ap.add_argument("--shards", choices=SHARD_MODES, default="shuffle",
                    help="label-skew: each rank mostly a few classes; by-package (stdlib): each rank its own "
                         "packages of the library")
    ap.add_argument("--context", type=int, default=64, help="stdlib: bytes per sequence")
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000, help="stdlib: size of the corpus")
    ap.add_argument("--gpt-width", type=int, default=144)
    ap.add_argument("--gpt-layers", type=int, default=4)
    ap.add_argument("--gpt-heads", type=int, default=4)
    ap.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-10)")
    ap.add_argument("--workers", type=int, default=4, help="data-loading processes (image folders)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="steps between evaluations, besides the one at each epoch's end (0: that one only)")
    ap.add_argument("--eval-samples", type=int, default=0,
                    help="evaluate on the first this many test samples (0: all of them)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of one rank; scaled by the rank count")
    ap.add_argument("--no-lr-scaling", action="store_true")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                    help="the optimizer every mode wraps (AdamW: --momentum is not used)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear ramp from the one-rank lr")
    ap.add_argument("--lr-schedule", choices=("constant", "step", "cosine"), default="constant")
    ap.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs (step schedule)")
    ap.add_argument("--lr-gamma", type=float, default=0.1)
    ap.add_argument("--clip-grad-norm", type=float, default=0.0)
    ap.add_argument("--amp", action="store_true", help="float16 + GradScaler on GPUs, bfloat16 on CPUs")
    ap.add_argument("--compression", choices=("none", "fp16", "bf16", "int8"), default="none",
                    help="wire format of SSD-SGD's deltas (int8: a scale per chunk, error feedback; its "
                         "warm-up gradients go as fp16); --mode horovod takes none or fp16")
    ap.add_argument("--fp16-allreduce", action="store_true", help="the same as --compression fp16 (Horovod's flag)")
    ap.add_argument("--sync-every", type=int_or_auto, default=5,
                    help="k: local steps per window (ssd, local-sgd); auto: the smallest k whose d = k steps "
                         "hide the allreduce, from times measured in the warm-up (ssd)")
    ap.add_argument("--delay", type=int_or_auto, default=None,
                    help="d: steps a window's allreduce overlaps (default k; auto: the smallest that hides it)")
    ap.add_argument("--max-sync-every", type=int, default=16, help="the largest k that --sync-every auto may choose")
    ap.add_argument("--local-sync", choices=("auto", "on", "off"), default="auto",
                    help="hierarchical SSD-SGD (ssd, local-sgd): gradients averaged inside each node every "
                         "step, windows between nodes; auto: on where the job has several nodes with several "
                         "ranks on each (a rank's node: $SSD_NODE, else its host name)")
    ap.add_argument("--warmup-steps", type=int, default=50, help="synchronous steps first (ssd, local-sgd)")
    ap.add_argument("--glu-beta", type=float, default=DEFAULT_GLU_BETA)
    ap.add_argument("--compensation", choices=("glu", "overwrite"), default="glu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/latest", help="run directory")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                    help="continue from the latest checkpoint of --out (or the one given); "
                         "starts fresh when there is none")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (0: end only)")
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    ap.add_argument("--signal-check-every", type=int, default=20,
                    help="steps between the ranks' agreement on a preemption signal")
    ap.add_argument("--preempt-at-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--elastic", action="store_true",
                    help="Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script): "
                         "ranks may leave and join")
    ap.add_argument("--commit-every", type=int, default=20,
                    help="--elastic: steps between commits (a change of ranks goes back to the last one); each "
                         "commit lands SSD-SGD's window in flight, a blocking wait")
    ap.add_argument("--fault-timeout", type=float, default=None,
                    help="seconds without progress after which a rank stops, naming the step and phase "
                         "(a peer died or froze); default $SSD_FAULT_TIMEOUT or 60, 0 disables")
    # tests: "stop|kill:PHASE:STEP:RANK" sends that signal to this rank at that point (PHASE: warmup,
    # window, step, checkpoint, evaluation)
    ap.add_argument("--fault-at", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--slow-rank", type=int, default=-1,
                    help="emulate a straggler: this rank's compute takes --slow-fraction longer")
    ap.add_argument("--slow-fraction", type=float, default=0.0)
    ap.add_argument("--label", default="", help="free text stored with the run (e.g. the network)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def int_or_auto(value: str) -> Union[int, str]:
    """An integer flag that also takes "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value!r}") from None


def check_args(args: argparse.Namespace, backend: str, size: int) -> None:
    """Reject combinations that cannot work, saying what to change (every rank alike)."""
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
    for name in ("eval_every", "eval_samples", "max_steps"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.gpt_width % args.gpt_heads:
        raise SystemExit(f"--gpt-width ({args.gpt_width}) must be a multiple of --gpt-heads ({args.gpt_heads})")
