"""Merge finished training runs into one table and one plot (a comparison job's, a job array's).

    python -m ssd_allreduce.bench collect runs/1234              # every run below runs/1234
    python -m ssd_allreduce.bench collect runs/1234/horovod runs/1234/ssd --out results/cmp

A DIR is a run directory of ``python -m ssd_allreduce.train`` (it holds metrics.jsonl) or a
directory with run directories anywhere below it. Each run is one row: what ran (mode, k, d,
compression, nodes, ranks) and what it gave (steady throughput, against the Horovod baseline where
one is among the runs, bytes per step, test accuracy, training seconds); a run that did not finish
is listed as such. Writes results.md, results.json and results.png to --out (default: the first DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..train import runlog

BASELINES = ("horovod", "ddp")
"""The modes a row's speed is compared with, the first found among the runs."""

COLUMNS: tuple[runlog.Column, ...] = (
    ("run", "run", "{}"), ("mode", "mode", "{}"), ("k", "k", "{}"), ("d", "d", "{}"),
    ("compression", "compression", "{}"), ("nodes", "nodes", "{}"), ("ranks", "ranks", "{}"),
    ("steps", "steps", "{}"), ("steady img/s", "steady_images_per_sec", "{:.0f}"),
    ("x baseline", "x_baseline", "{:.2f}"), ("bytes/step", "bytes_per_step", "{:,.0f}"),
    ("test acc", "test_accuracy", "{:.4f}"), ("wall s", "wall_seconds", "{:.1f}"), ("status", "status", "{}"),
)
WINDOW_MODES = ("ssd", "local-sgd")


def find_runs(dirs: Sequence[Path]) -> list[Path]:
    """The run directories at or below each of ``dirs``, in order; SystemExit naming a DIR with none."""
    runs: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"collect: {d} is not a directory: pass run directories of python -m ssd_allreduce.train "
                             "(or directories above them)")
        found = [d] if (d / runlog.METRICS).exists() else sorted(p.parent for p in d.rglob(runlog.METRICS))
        if not found:
            raise SystemExit(f"collect: no run below {d} (no {runlog.METRICS}): pass the run directory of a job "
                             "(RUN_DIR of the slurm templates, --out of the driver)")
        runs += [r for r in found if r not in runs]
    return runs


def run_row(run_dir: Path, name: str) -> dict[str, Any]:
    """One row: the run's settings (from its start record and summary) and its figures."""
    records = runlog.read(run_dir)
    starts = [r for r in records if r["kind"] == "start"]
    summaries = [r for r in records if r["kind"] == "summary"]
    args = starts[0].get("args", {}) if starts else {}
    summary = summaries[-1] if summaries else {}
    mode = summary.get("mode") or args.get("mode") or "?"
    stats = summary.get("ssd_stats") or {}
    windows = mode in WINDOW_MODES
    row = {
        "run": name, "path": str(run_dir), "mode": mode,
        "k": (stats.get("sync_every") or args.get("sync_every")) if windows else None,
        "d": (stats.get("delay", args.get("delay")) if windows else None),
        "compression": args.get("compression"),
        "nodes": summary.get("local_sync_nodes") or ("flat" if windows and summary else None),
        "ranks": summary.get("ranks") or (starts[-1].get("ranks") if starts else None),
        "restarts": max(0, len(starts) - 1),
        "status": "finished" if summary else "did not finish",
    }
    for key in ("steps", "steady_images_per_sec", "images_per_sec", "bytes_per_step", "test_accuracy",
                "test_loss", "wall_seconds"):
        row[key] = summary.get(key)
    if not summary:
        row["steps"] = max((r["step"] for r in records if r["kind"] == "step"), default=None)
    return row


def add_baseline_ratios(rows: list[dict[str, Any]], baseline: Optional[str]) -> Optional[str]:
    """Each row's steady throughput over the baseline's (the first finished run of that mode);
    returns the baseline's mode, None where there is none."""
    modes = [baseline] if baseline else list(BASELINES)
    ref = next((r for m in modes for r in rows if r["mode"] == m and r.get("steady_images_per_sec")), None)
    for row in rows:
        ok = ref is not None and row.get("steady_images_per_sec")
        row["x_baseline"] = row["steady_images_per_sec"] / ref["steady_images_per_sec"] if ok else None
    return None if ref is None else ref["mode"]


def run_names(runs: Sequence[Path]) -> list[str]:
    """Short names: each run's path below the runs' common directory."""
    if len(runs) == 1:
        return [runs[0].name]
    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return [str(r.resolve().relative_to(common)) for r in runs]


def label(row: dict[str, Any]) -> str:
    """A legend entry: the run's name and, for windowed modes, its k, d and compression."""
    if row["mode"] in WINDOW_MODES:
        return f"{row['run']}: {row['mode']} k={row['k']} d={row['d']} {row['compression']}"
    return f"{row['run']}: {row['mode']}"


def plot(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Training loss against wall time, and steady throughput per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        steps = [r for r in runlog.read(row["path"]) if r["kind"] == "step"]
        ax_loss.plot([r["wall"] for r in steps], [r["loss"] for r in steps], lw=0.8, label=label(row))
    ax_loss.set(xlabel="training time (s)", ylabel="training loss (rank 0)", yscale="log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    speeds = [row.get("steady_images_per_sec") or 0.0 for row in rows]
    ax_speed.barh(range(len(rows)), speeds)
    ax_speed.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=7)
    ax_speed.invert_yaxis()
    ax_speed.set(xlabel="steady images/s (all ranks)")
    ax_speed.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def collect(dirs: Sequence[Path], out: Path, baseline: Optional[str] = None) -> str:
    """Write results.md, results.json and results.png for the runs below ``dirs`` into ``out``;
    returns the table."""
    runs = find_runs(dirs)
    rows = [run_row(run, name) for run, name in zip(runs, run_names(runs))]
    found = add_baseline_ratios(rows, baseline)
    table = runlog.markdown_table(rows, COLUMNS)
    note = (f"x baseline: steady images/s over {found}'s" if found
            else "x baseline: no horovod or ddp run among these (--baseline MODE picks one)")
    out.mkdir(parents=True, exist_ok=True)
    # each file replaced whole: the tasks of an array may collect into one place as each ends
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(f"{table}\n\n{note}\n"))
    write_atomically(out / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"))
    write_atomically(out / "results.png", lambda tmp: plot(rows, tmp))
    return f"{table}\n\n{note}"


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` to a temporary file beside ``path``, then rename it into place."""
    # the host name too: array tasks on different nodes may share a pid and this folder
    tmp = path.with_name(f".{path.stem}.{socket.gethostname()}.{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter
    from .flags import PROG

    ap = argparse.ArgumentParser(prog=f"{PROG} collect", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run directories, or directories above them")
    ap.add_argument("--out", type=Path, default=None, help="where results.md/.json/.png go (default: the first DIR)")
    ap.add_argument("--baseline", default=None,
                    help="the mode the 'x baseline' column divides by (default: horovod, else ddp)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or args.dirs[0]
    print(collect(args.dirs, out, args.baseline))
    print(f"\nwritten: {out / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
