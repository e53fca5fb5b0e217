"""Horovod's ``pytorch_synthetic_benchmark.py`` with its optimizer line switched, interleaved
rounds (``scripts/bench_gpu.sh``): the rates each round printed, as a record and its table.

    python -m ssd_allreduce.bench.synthetic_rounds ROUNDS_FILE [--record PATH]

``ROUNDS_FILE`` holds one line per run, ``round N VARIANT RATE`` (``FAILED`` where it printed none).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..cli import HelpFormatter
from ..train.runlog import markdown_table
from .flags import PROG, add_record

COMMAND = "scripts/bench_gpu.sh path/to/pytorch_synthetic_benchmark.py"
VARIANTS = (("horovod", "`hvd.DistributedOptimizer(...)`"),
            ("ssd", "`ssd_allreduce.DistributedOptimizer(...)` (default warm-up)"),
            ("ssd_k5", "`ssd_allreduce.DistributedOptimizer(..., warmup_steps=5, sync_every=5, delay=5)`"))


def read_rounds(path: Path) -> dict[str, list[Optional[float]]]:
    """Each variant's rate per round, None where the run printed none."""
    rates: dict[str, list[Optional[float]]] = {}
    for line in path.read_text().splitlines():
        _, _, variant, rate = line.split()
        rates.setdefault(variant, []).append(None if rate == "FAILED" else float(rate))
    return rates


def rows_of(rates: dict[str, list[Optional[float]]]) -> list[dict[str, Any]]:
    """A row per variant: its rounds, their median and that median over Horovod's."""
    def median(values: list[Optional[float]]) -> Optional[float]:
        done = [v for v in values if v is not None]
        return statistics.median(done) if done else None
    base = median(rates.get("horovod", []))
    rows = []
    for variant, line in VARIANTS:
        mine = median(rates.get(variant, []))
        rows.append({"variant": variant, "line": line, "rounds": rates.get(variant, []), "median": mine,
                     "x_horovod": mine / base if mine is not None and base else None})
    return rows


def render_record(record: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's table of the switched example, from its record."""
    from .sections import stamp_line
    rows = [{**r, "per_round": ", ".join("failed" if v is None else f"{v:.1f}" for v in r["rounds"])}
            for r in record["rows"]]
    table = markdown_table(rows, (("optimizer line", "line", "{}"), ("img/s per round", "per_round", "{}"),
                                  ("median", "median", "{:.1f}"), ("x Horovod", "x_horovod", "{:.3f}")))
    return (f"{stamp_line(record)} {record['config']['device']}, ResNet-50, batch 64, {len(rows[0]['rounds'])} "
            f"rounds, the three scripts interleaved, each run a fresh process:\n\n{table}\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"{PROG}.synthetic_rounds", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("rounds_file", type=Path, help="lines 'round N VARIANT RATE', as scripts/bench_gpu.sh writes them")
    ap.add_argument("--device", default="one GPU", help="what the runs ran on, for the table's heading")
    add_record(ap)
    a = ap.parse_args(argv)
    rows, config = rows_of(read_rounds(a.rounds_file)), {"device": a.device}
    from .report import provenance
    print(render_record({**provenance(COMMAND), "config": config, "rows": rows}))
    if a.record:
        from .sections import write_rows_record
        write_rows_record(Path(a.record), COMMAND, rows, config)


if __name__ == "__main__":
    main()
