"""The benchmark's command: side by side on an emulated network, the GLU ablation, or Horovod's
synthetic benchmark.

    python -m ssd_allreduce.bench                                   # digits, 2 ranks, 3 bandwidths
    python -m ssd_allreduce.bench --bandwidths 100mbit --epochs 4   # the README's short comparison
    python -m ssd_allreduce.bench --ranks 4 --nodes 2 --bandwidths 100mbit   # 2 emulated nodes x 2 ranks
    python -m ssd_allreduce.bench --ablation                        # GLU ablation (simulator, 8 workers)
    horovodrun -np 4 python -m ssd_allreduce.bench synthetic --model resnet50 --mode ssd
    python -m ssd_allreduce.bench overhead                          # the wrapper's cost per step
    python -m ssd_allreduce.bench nodecost                          # predicted GPU clusters of nodes
    python -m ssd_allreduce.bench --workload gpt                    # a small GPT on the stdlib corpus
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Optional, Sequence

from . import ablation, compare, convergence, costmodel, language, nodecost, overhead, synthetic
from ..settings import DEFAULT_GLU_BETA
from .compare import DEFAULT_BANDWIDTHS


def main(argv: Optional[Sequence[str]] = None) -> None:
    # SIGTERM (a job's time limit, kill) unwinds, so the emulated network is taken down
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthetic"]:
        synthetic.main(argv[1:])
        return
    if argv[:1] == ["overhead"]:
        overhead.main(argv[1:])
        return
    if argv[:1] == ["nodecost"]:
        nodecost.main(argv[1:])
        return
    if argv[:1] == ["costmodel"]:
        costmodel.main(argv[1:])
        return
    if argv[:1] == ["convergence"]:
        convergence.main(argv[1:])
        return
    workload = _pop_workload(argv)
    if workload == "gpt":
        language.main(argv)
        return
    ap = argparse.ArgumentParser(prog="python -m ssd_allreduce.bench [--workload images|gpt]", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=1,
                    help="emulated nodes (a network namespace each, shaped links between them); the ranks are "
                         "split evenly, and each SSD-SGD window also runs hierarchically")
    ap.add_argument("--bandwidths", nargs="+", default=list(DEFAULT_BANDWIDTHS), help="tc rates, e.g. 100mbit 1gbit")
    ap.add_argument("--ssd-configs", nargs="+", default=["5:5", "10:10"], help="k:d pairs or auto, each optionally with a wire format: 5:5/int8")
    ap.add_argument("--local-sgd-every", type=int, default=5)
    ap.add_argument("--no-local-sgd", action="store_true")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--glu-beta", type=float, default=DEFAULT_GLU_BETA)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--target-accuracy", type=float, default=0.97,
                    help="test accuracy for the time-to-target column (every mode reaches 0.9 in its warm-up)")
    ap.add_argument("--latency-us", type=float, default=-1.0,
                    help="per-hop latency for the cost model (negative: calibrated on local SGD's blocking wait)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--straggler", type=float, default=0.0,
                    help="make rank 1 a straggler: its compute takes this fraction longer (0.5: 50 %%)")
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--out", default=f"results/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--ablation", action="store_true", help="run the GLU ablation instead")
    ap.add_argument("--ablation-k", type=int, default=8)
    ap.add_argument("--ablation-workers", type=int, default=8)
    ap.add_argument("--ablation-epochs", type=int, default=20)
    ap.add_argument("--ablation-warmup", type=int, default=20)
    ap.add_argument("--ablation-seeds", type=int, default=3)
    a = ap.parse_args(argv)
    if a.ablation:
        ablation.ablation(a)
    else:
        compare.compare(a)


def _pop_workload(argv: list[str]) -> str:
    """Remove ``--workload NAME`` (or ``--workload=NAME``) from ``argv``; "images" when absent."""
    for i, arg in enumerate(argv):
        if arg == "--workload" or arg.startswith("--workload="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in arg else 2)]
            if value not in ("images", "gpt"):
                raise SystemExit(f"--workload takes images (the default comparison) or gpt, got {value!r}")
            return value
    return "images"
