"""``ssd-allreduce``: one command for the tools around the library.

    ssd-allreduce doctor [--json]          # what to check when a cluster job fails
    ssd-allreduce train --mode ssd ...     # = python -m ssd_allreduce.train
    ssd-allreduce bench --bandwidths 100mbit   # = python -m ssd_allreduce.bench
    ssd-allreduce costmodel --model resnet50 --ranks 8 64
    ssd-allreduce simulate --workers 64    # convergence study (= python -m ssd_allreduce.bench convergence)

Each tool is imported only when it is asked for, so ``doctor`` runs where torch does not import.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional, Sequence

COMMANDS = {
    "doctor": ("ssd_allreduce.doctor", "environment report for debugging a cluster job"),
    "train": ("ssd_allreduce.train.driver", "train with SSD-SGD or a baseline under any launcher"),
    "bench": ("ssd_allreduce.bench.cli", "SSD-SGD against Horovod on an emulated network; ablation; synthetic"),
    "costmodel": ("ssd_allreduce.bench.costmodel", "predicted step times on clusters you do not have"),
    "simulate": ("ssd_allreduce.bench.convergence", "N SSD-SGD workers in one process on the digits"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())
    return f"usage: ssd-allreduce COMMAND [ARGS...]\n\ncommands:\n{rows}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] not in COMMANDS:
        print(f"ssd-allreduce: unknown command {argv[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module, _ = COMMANDS[argv[0]]
    result = import_module(module).main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
