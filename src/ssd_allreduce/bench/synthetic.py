"""Horovod's ``pytorch_synthetic_benchmark.py``, with ``--mode ssd`` to run SSD-SGD instead:

    horovodrun -np 4 python -m ssd_allreduce.bench synthetic --model resnet50 --mode ssd

It takes Horovod's flags (--fp16-allreduce, --num-warmup-batches, ...) and prints its img/sec
lines. SSD-SGD's synchronous warm-up runs in the benchmark's untimed warm-up batches by default,
so the timed iterations measure the delay stage.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import HelpFormatter
from ..compression import Compression
from ..optimizer import DistributedOptimizer
from ..train.launch import init_distributed
from ..train.models import MODEL_NAMES, build_model
from ..train.options import BATCH_SIZE_HELP, DELAY_HELP, SYNC_EVERY_HELP, int_or_auto
from .flags import PROG, check_at_least


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} synthetic", description=__doc__, formatter_class=HelpFormatter)
    g = ap.add_argument_group("Horovod's pytorch_synthetic_benchmark.py flags")
    g.add_argument("--fp16-allreduce", action="store_true", default=False,
                   help="send gradients (horovod) or deltas (ssd) as float16")
    g.add_argument("--model", type=str, default="resnet50", help="a torchvision name, or mlp, cnn, resnet20..resnet110")
    g.add_argument("--batch-size", type=int, default=32, help=BATCH_SIZE_HELP)
    g.add_argument("--num-warmup-batches", type=int, default=10, help="untimed steps first")
    g.add_argument("--num-batches-per-iter", type=int, default=10, help="steps per timed iteration")
    g.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    g.add_argument("--no-cuda", action="store_true", default=False, help="run on the CPU")
    g = ap.add_argument_group("modes")
    g.add_argument("--mode", choices=("horovod", "ddp", "ssd", "no-comm"), default="horovod",
                   help="horovod: hvd.DistributedOptimizer; ddp: DistributedDataParallel; ssd: SSD-SGD; "
                        "no-comm: every rank alone")
    g.add_argument("--backend", choices=("horovod", "torch"), default="horovod",
                   help="torch: launch with torchrun; the baseline is then --mode ddp")
    g.add_argument("--sync-every", type=int_or_auto, default=5, metavar="K|auto", help=SYNC_EVERY_HELP)
    g.add_argument("--delay", type=int_or_auto, default=None, metavar="D|auto", help=DELAY_HELP)
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="SSD-SGD's synchronous steps (default: --num-warmup-batches, so that the timed "
                        "iterations measure the delay stage)")
    g.add_argument("--image-size", type=int, default=None,
                   help="height and width (default: 224, or 32 for the CIFAR models)")
    return ap


def wrap(a: argparse.Namespace, ctx: Any, model: torch.nn.Module) -> tuple[Any, torch.nn.Module]:
    """(the optimizer, the network to call) of ``--mode``, every rank starting from rank 0's weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * ctx.size)
    ctx.comm.broadcast_(list(model.state_dict().values()), 0, "bench.init")
    net = model
    if a.mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if a.mode == "horovod":
        import horovod.torch as hvd
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=hvd.Compression.fp16 if a.fp16_allreduce else hvd.Compression.none)
    elif a.mode == "ssd":
        opt = DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   named_buffers=model.named_buffers(), sync_every=a.sync_every,
                                   delay=a.delay, warmup_steps=a.warmup_steps, backend=ctx.comm,
                                   compression=Compression.fp16 if a.fp16_allreduce else Compression.none)
    return opt, net


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Horovod's pytorch_synthetic_benchmark.py, with ``--mode ssd`` to run SSD-SGD instead."""
    a = build_parser().parse_args(argv)
    check_at_least(a, 1, "batch_size", "num_batches_per_iter", "num_iters", "image_size")
    check_at_least(a, 0, "num_warmup_batches", "warmup_steps")
    if a.warmup_steps is None:
        a.warmup_steps = a.num_warmup_batches
    ctx = init_distributed(a.backend, "cpu" if a.no_cuda else "auto")
    if (a.mode == "horovod") != (a.backend == "horovod") and a.mode in ("horovod", "ddp"):
        raise SystemExit(f"--mode {a.mode} needs --backend {'horovod' if a.mode == 'horovod' else 'torch'}")
    size = a.image_size or (32 if a.model in MODEL_NAMES else 224)
    classes = 10 if a.model in MODEL_NAMES else 1000
    model = build_model(a.model, classes, 3, size).to(ctx.device)
    opt, net = wrap(a, ctx, model)
    data = torch.randn(a.batch_size, 3, size, size, device=ctx.device)
    target = torch.randint(0, classes, (a.batch_size,), device=ctx.device)

    def benchmark_step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(data), target).backward()
        opt.step()

    def log(s: str) -> None:
        if ctx.is_root:
            print(s, flush=True)

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    log(f"Model: {a.model}\nBatch size: {a.batch_size}\nMode: {a.mode}")
    device = "GPU" if ctx.device.type == "cuda" else "CPU"
    log(f"Number of {device}s: {ctx.size}")
    for _ in range(a.num_warmup_batches):
        benchmark_step()
    sync()
    log("Running benchmark...")
    img_secs = []
    for x in range(a.num_iters):
        t0 = time.perf_counter()
        for _ in range(a.num_batches_per_iter):
            benchmark_step()
        sync()
        img_sec = a.batch_size * a.num_batches_per_iter / (time.perf_counter() - t0)
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device}")
        img_secs.append(img_sec)
    mean, conf = float(np.mean(img_secs)), float(1.96 * np.std(img_secs))
    log(f"Img/sec per {device}: {mean:.1f} +-{conf:.1f}")
    log(f"Total img/sec on {ctx.size} {device}(s): {ctx.size * mean:.1f} +-{ctx.size * conf:.1f}")
    if a.mode == "ssd":
        opt.finish()
        stats = opt.ssd_stats
        log(f"SSD-SGD: {stats.steps} steps, {stats.windows_launched} windows launched, "
            f"{stats.windows_landed} landed, {stats.bytes_allreduced} bytes sent per rank")
