"""What the benchmarks' command lines share: the command's name, link rates in tc's units, and
checks of whole numbers. The driver's flags for the same things keep the driver's names and help
(``train/options.py``)."""
from __future__ import annotations

import argparse

from .netns import parse_rate_bits

PROG = "python -m ssd_allreduce.bench"
UNSHAPED = "none"
RATE_HELP = "rates in tc's units: kbit, mbit, gbit (100mbit, 1gbit, 2.5gbit)"


def cluster_rate(value: str) -> str:
    """A tc rate (``10gbit``, ``400mbit``) of a cluster's link, for the cost models."""
    try:
        parse_rate_bits(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 10gbit or 400mbit (kbit, mbit, gbit), got "
                                         f"{value!r}") from None
    return value


def link_rate(value: str) -> str:
    """A tc rate (``100mbit``, ``1gbit``) for an emulated link, or ``none`` (the plain loopback)."""
    if value == UNSHAPED:
        return value
    try:
        return cluster_rate(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 100mbit or 1gbit (kbit, mbit, gbit) or "
                                         f"{UNSHAPED}, got {value!r}") from None


def gbps(rate: str) -> float:
    """Gbit/s of a tc rate."""
    return parse_rate_bits(rate) / 1e9


def check_at_least(a: argparse.Namespace, minimum: int, *names: str) -> None:
    """SystemExit naming the first flag of ``names`` below ``minimum``."""
    for name in names:
        value = getattr(a, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not isinstance(v, str) and v < minimum:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


def add_record(ap: "argparse.ArgumentParser | argparse._ArgumentGroup") -> None:
    """``--record FILE``: the results with their provenance, for the documents' section of that name."""
    ap.add_argument("--record", default=None, metavar="FILE",
                    help="also write the results with their provenance to FILE (docs/results/NAME.json: "
                         f"the section NAME of the documents that `{PROG} report` writes)")


def add_local_sgd(ap: "argparse.ArgumentParser | argparse._ArgumentGroup") -> None:
    """Blocking local SGD's row of a comparison: ``--local-sgd-every K``, or ``--no-local-sgd``."""
    ap.add_argument("--local-sgd-every", type=int, default=5, help="k of blocking local SGD (its d is 0)")
    ap.add_argument("--no-local-sgd", action="store_true", help="leave out blocking local SGD")
