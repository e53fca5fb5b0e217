"""Convergence studies with the simulator: N ranks of SSD-SGD in one process on the bundled digits.

    python -m ssd_allreduce.bench convergence --ranks 64 --sync-every 8 --delay 8 --glu-beta 0.5 \\
        --shards label-skew --epochs 20 --warmup-steps 20 --baseline
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..cli import HelpFormatter
from ..settings import DEFAULT_GLU_BETA
from ..simulator import Simulator
from ..train.data import load_digits_split, shard_indices
from ..train.models import build_model
from ..train.options import (BATCH_SIZE_HELP, GLU_BETA_HELP, WARMUP_EPOCH, WARMUP_HELP, float_or_auto,
                             int_or_epoch, warmup_steps_for)
from .flags import PROG, check_at_least


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def study(workers: int, sync_every: int, delay: int, warmup_steps: Union[int, str], glu_beta: Union[float, str],
          compensation: str, shards: str, epochs: int, batch_size: int, lr: float,
          model_name: str = "mlp", seed: int = 0) -> dict[str, float]:
    """Train on the bundled digits with ``workers`` simulated ranks; accuracy of the global model.
    ``warmup_steps`` may be "epoch" (the driver's ``--warmup-steps`` rule)."""
    data = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_name, data.num_classes, data.in_channels, data.image_size)
    steps_per_epoch = len(shard_indices(data.train_y, workers, 0, 0, seed, mode=shards)) // batch_size
    sim = Simulator(model, lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
                    workers, sync_every=sync_every, delay=delay,
                    warmup_steps=warmup_steps_for(warmup_steps, steps_per_epoch),
                    glu_beta=glu_beta, compensation=compensation)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        shard = [shard_indices(data.train_y, workers, w, epoch, seed, mode=shards) for w in range(workers)]
        steps = len(shard[0]) // batch_size
        for s in range(steps):
            batch = [(data.train_x[idx[s * batch_size:(s + 1) * batch_size]],
                      data.train_y[idx[s * batch_size:(s + 1) * batch_size]]) for idx in shard]
            sim.step(batch, loss_fn)
    sim.finish()
    return {"accuracy": _accuracy(sim.global_model(), data.test_x, data.test_y),
            "steps": sim.step_index, "windows": sim.windows_landed}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} convergence", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ranks", type=int, default=8, help="simulated ranks")
    ap.add_argument("--sync-every", type=int, default=8, help="k: local steps per window")
    ap.add_argument("--delay", type=int, default=None,
                    help="d: local steps a window's allreduce overlaps before it lands (0 <= d <= k; default k: "
                         "the simulator measures no time)")
    ap.add_argument("--warmup-steps", type=int_or_epoch, default=WARMUP_EPOCH, metavar="N|epoch", help=WARMUP_HELP)
    ap.add_argument("--glu-beta", type=float_or_auto, default=DEFAULT_GLU_BETA, metavar="BETA|auto", help=GLU_BETA_HELP)
    ap.add_argument("--compensation", choices=("glu", "overwrite"), default="glu",
                    help="glu compensates a rank's own weights when a window lands; overwrite replaces them")
    ap.add_argument("--shards", choices=("shuffle", "label-skew"), default="shuffle",
                    help="how the digits are split over the ranks (label-skew: each rank mostly a few classes)")
    ap.add_argument("--epochs", type=int, default=20, help="passes over the digits")
    ap.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of SGD (momentum 0.9) on every rank")
    ap.add_argument("--model", default="mlp", help="mlp, cnn or resnet20..resnet110")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the shards")
    ap.add_argument("--baseline", action="store_true", help="also run synchronous SGD (k=1, d=0)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    check_at_least(a, 1, "ranks", "sync_every", "epochs", "batch_size")
    check_at_least(a, 0, "delay", "warmup_steps")
    common = dict(workers=a.ranks, warmup_steps=a.warmup_steps, shards=a.shards, epochs=a.epochs,
                  batch_size=a.batch_size, lr=a.lr, model_name=a.model, seed=a.seed)
    result = study(sync_every=a.sync_every, delay=a.sync_every if a.delay is None else a.delay,
                   glu_beta=a.glu_beta, compensation=a.compensation, **common)
    if a.baseline:
        result["ssgd_accuracy"] = study(sync_every=1, delay=0, glu_beta=1.0, compensation="glu",
                                        **common)["accuracy"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
