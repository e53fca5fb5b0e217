"""``ssd-allreduce``: one command for the tools around the library.

    ssd-allreduce doctor [--json]          # what to check when a cluster job fails
    ssd-allreduce train --mode ssd ...     # = python -m ssd_allreduce.train
    ssd-allreduce bench --bandwidths 100mbit   # = python -m ssd_allreduce.bench
    ssd-allreduce costmodel --model resnet50 --ranks 8 64 --bandwidths 10gbit
    ssd-allreduce convergence --ranks 64   # = python -m ssd_allreduce.bench convergence

Each tool is imported only when it is asked for, so ``doctor`` runs where torch does not import.
This module also holds what every command line of the package shares: the help formatter and
``--version``.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Optional, Sequence

from . import __version__

COMMANDS = {
    "doctor": ("ssd_allreduce.doctor", "environment report for debugging a cluster job"),
    "train": ("ssd_allreduce.train.driver", "train with SSD-SGD or a baseline under any launcher"),
    "bench": ("ssd_allreduce.bench.cli", "benchmarks: SSD-SGD against Horovod on an emulated network, and more"),
    "costmodel": ("ssd_allreduce.bench.costmodel", "predicted step times on clusters you do not have"),
    "convergence": ("ssd_allreduce.bench.convergence", "N SSD-SGD ranks simulated in one process on the digits"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions kept as written; every option's default shown after its help, except where
    there is nothing to show (a flag that is off, or no value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default in ([], ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the package's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (ssd-allreduce) {__version__}",
                        help="print the version of ssd-allreduce and exit")


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())
    return (f"usage: ssd-allreduce COMMAND [ARGS...]\n       ssd-allreduce --version\n\ncommands:\n{rows}\n\n"
            "Each command's options: ssd-allreduce COMMAND --help\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] == "--version":
        print(f"ssd-allreduce {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"ssd-allreduce: unknown command {argv[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module, _ = COMMANDS[argv[0]]
    result = import_module(module).main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
