"""``python -m ssd_allreduce.bench``: the benchmarks, one subcommand each; ``compare`` is the
default, so options without a subcommand go to it.

    python -m ssd_allreduce.bench                                   # digits, 2 ranks, 3 bandwidths
    python -m ssd_allreduce.bench --bandwidths 100mbit --epochs 4   # = ... compare --bandwidths ...
    python -m ssd_allreduce.bench --ranks 4 --nodes 2 --bandwidths 100mbit   # 2 emulated nodes x 2 ranks
    python -m ssd_allreduce.bench --workload gpt --warmup-steps 20  # a small GPT on the stdlib corpus
    python -m ssd_allreduce.bench ablation --ranks 8 --sync-every 8 # GLU ablation (simulator)
    horovodrun -np 4 python -m ssd_allreduce.bench synthetic --model resnet50 --mode ssd
    python -m ssd_allreduce.bench overhead                          # the wrapper's cost per step
    python -m ssd_allreduce.bench costmodel --ranks 8 64 --bandwidths 10gbit 100gbit
    python -m ssd_allreduce.bench nodecost                          # predicted GPU clusters of nodes
    python -m ssd_allreduce.bench convergence --ranks 64            # N ranks simulated in one process

Each subcommand's module is imported only when it runs (``collect`` and ``quality`` may be absent
from an installation: the others work without them).
"""
from __future__ import annotations

import argparse
import ast
import signal
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from ..cli import HelpFormatter, add_version
from .flags import PROG

DEFAULT_SUBCOMMAND = "compare"
SUBCOMMANDS: dict[str, str] = {
    "compare": "SSD-SGD against Horovod, side by side, on an emulated network (the default); "
               "--workload gpt: a small GPT on the standard-library corpus",
    "ablation": "the GLU ablation: every compensation variant against synchronous SGD (simulator)",
    "synthetic": "Horovod's pytorch_synthetic_benchmark.py, with --mode ssd to run SSD-SGD",
    "overhead": "what the wrapper costs per step where there is no network to save (world size 1)",
    "costmodel": "predicted throughput of Horovod and SSD-SGD on clusters (alpha-beta ring model)",
    "nodecost": "the cost model on clusters of GPU nodes (NVLink inside, a link per node between)",
    "convergence": "N SSD-SGD ranks simulated in one process on the digits",
    "collect": "",   # bench/collect.py: its docstring's first sentence
    "quality": "",   # bench/quality.py: its docstring's first sentence
    "report": "the documents' tables rewritten from the measurements committed under docs/results/",
}
"""Every subcommand, its module ``ssd_allreduce.bench.<name>`` (a ``main(argv)``), and what it does."""


def module_path(name: str) -> Path:
    return Path(__file__).with_name(f"{name}.py")


def summary(name: str) -> str:
    """What subcommand ``name`` does: the table's line, else its module's first sentence (read,
    not imported), else a note that this installation lacks it."""
    if SUBCOMMANDS[name]:
        return SUBCOMMANDS[name]
    path = module_path(name)
    if not path.exists():
        return f"(bench/{name}.py is not in this installation)"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".") or f"bench/{name}.py"


def build_parser() -> argparse.ArgumentParser:
    """The top level: ``--help`` (every subcommand) and ``--version``; each subcommand parses its own options."""
    ap = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [SUBCOMMAND] [OPTIONS ...]", formatter_class=HelpFormatter,
        description="Benchmarks of SSD-SGD. Options without a subcommand go to compare.",
        epilog=f"Each subcommand's options: {PROG} SUBCOMMAND --help\n\n" + __doc__.split("\n\n")[1])
    add_version(ap)
    subcommands = ap.add_subparsers(title="subcommands", metavar="SUBCOMMAND", dest="subcommand")
    for name in SUBCOMMANDS:
        subcommands.add_parser(name, help=summary(name), add_help=False)
    return ap


def load(name: str) -> ModuleType:
    """The module of subcommand ``name``; SystemExit where this installation lacks it."""
    module = f"{__package__}.{name}"
    try:
        return import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise SystemExit(f"{PROG} {name}: this installation has no {module_path(name)}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in ("-h", "--help", "--version"):
        build_parser().parse_args(argv[:1])   # prints and exits
    if not argv or argv[0].startswith("-"):
        name, rest = DEFAULT_SUBCOMMAND, argv
    elif argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
    else:
        build_parser().error(f"unknown subcommand {argv[0]!r}: choose from {', '.join(SUBCOMMANDS)} "
                             f"(options without a subcommand go to {DEFAULT_SUBCOMMAND})")
        return 2
    module = load(name)
    # SIGTERM (a job's time limit, kill) unwinds, so the emulated network is taken down
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = module.main(rest)
    return result if isinstance(result, int) else 0
