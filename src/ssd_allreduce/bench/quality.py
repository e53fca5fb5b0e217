"""How close SSD-SGD comes to synchronous training: whole runs with a learning-rate schedule to a
fixed budget, every variant beside synchronous training of the same seed, on the simulator (any
number of workers) and on real ranks (horovodrun, which must follow the simulator).

    python -m ssd_allreduce.bench quality --tasks regression --ranks 4 8 16 --seeds 3
    python -m ssd_allreduce.bench quality --tasks gpt --optimizers adamw --max-steps 1000 --real-ranks 2 4

A variant is ``k:d[:beta[:local_lr_scale[:outer_lr/outer_momentum]]][@warmup][+dc][+am]``: beta
and the scale are the library's defaults (``auto``) where left out, ``@warmup`` gives the variant
its own synchronous steps first (``@auto``: the library's ``warmup_steps="auto"``, until the ranks'
gradient noise reaches their number), ``+dc`` turns the drift correction on, ``+am`` the averaged moments;
``sync`` is synchronous training. For each
(task, workers, optimizer, shards, peak learning rate) it reports the final validation loss, its gap to synchronous
training in % (mean and range over the seeds), and the steps each variant took to reach the
synchronous run's loss at 50, 80 and 100 % of its budget; for a classifier the final accuracy
against synchronous training's, in points, and for an ``@auto`` warm-up the steps it took.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..cli import HelpFormatter, add_version
from .flags import PROG, check_at_least
from ..settings import AUTO
from .report import provenance
from .quality_run import RunResult, RunSpec, Variant, simulate, spec_from_json
from .quality_tasks import SHARDS, TASKS

DEFAULT_VARIANTS = ("sync", "1:1", "2:1", "2:2", "3:3", "5:1", "5:5", "10:10", "1:1:0.5:1", "2:2:0.5:1", "5:5:0.5:1")
"""The library's defaults at several windows, and the former defaults (beta 0.5, no scale) at three."""
FRACTIONS = (0.5, 0.8, 1.0)
DIVERGED_RATIO = 10.0
"""A run whose final validation loss is not finite or this many times synchronous training's diverged."""
MAX_CURVES = 6   # a plot with more variants shows synchronous training and k = d = 1 and 5


def parse_variant(text: str) -> Variant:
    """``sync`` or ``k:d[:beta[:scale[:outer_lr/outer_momentum]]][@warmup][+dc][+am]``."""
    if text == "sync":
        return Variant("sync", sync=True)
    window, *extras = text.split("+")
    window, *warmup = window.split("@")
    parts = window.split(":")
    try:
        warmup_steps: Any = None if not warmup else AUTO if warmup[0] == AUTO else int(warmup[0])
        if len(warmup) > 1 or (isinstance(warmup_steps, int) and warmup_steps < 0):
            raise ValueError(warmup)
        k, d = int(parts[0]), int(parts[1])
        beta: Any = parts[2] if len(parts) > 2 else AUTO
        scale: Any = parts[3] if len(parts) > 3 else AUTO
        beta = beta if beta == AUTO else float(beta)
        scale = scale if scale == AUTO else float(scale)
        outer_lr, outer_momentum = (float(v) for v in parts[4].split("/")) if len(parts) > 4 else (1.0, 0.0)
        if not set(extras) <= {"dc", "am"} or len(set(extras)) < len(extras):
            raise ValueError(extras)
    except (ValueError, IndexError):
        raise SystemExit(f"--variants takes sync or k:d[:beta[:scale[:outer_lr/outer_momentum]]][@warmup][+dc][+am] "
                         f"such as 5:5:auto:auto, 5:5@90, 5:5+dc or 5:5+am, got {text!r}") from None
    return Variant(text, k, d, beta, outer_lr, outer_momentum, scale, drift_correction="dc" in extras,
                   average_moments="am" in extras, warmup_steps=warmup_steps)


def plan(a: argparse.Namespace) -> list[RunSpec]:
    variants = [parse_variant(v) for v in a.variants]
    if not any(v.sync for v in variants):
        variants.insert(0, parse_variant("sync"))
    return [RunSpec(task, n, opt, shards, seed, a.max_steps, a.warmup_steps, v, lr)
            for task in a.tasks for n in a.ranks for opt in a.optimizers for shards in a.shards
            for lr in dict.fromkeys(a.lr) for seed in range(a.seeds) for v in variants]


def run_on_ranks(spec: RunSpec, timeout: float) -> RunResult:
    """``spec`` on ``spec.workers`` real ranks (horovodrun, Gloo, this machine)."""
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [horovodrun, "-np", str(spec.workers), "-H", f"localhost:{spec.workers}", "--gloo",
               "--network-interface", "lo", sys.executable, "-m", "ssd_allreduce.bench.quality_run",
               json.dumps(asdict(spec)), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        values = json.loads(out.read_text())
    return RunResult(spec_from_json(json.dumps(values["spec"])), [tuple(c) for c in values["curve"]],
                     values["final"], values["seconds_per_step"])


def steps_to(curve: list, target: float) -> Optional[int]:
    """The first evaluated step whose validation loss is at most ``target``."""
    return next((step for step, m in curve if m["val_loss"] <= target), None)


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, workers, optimizer, shards, peak learning rate, where, variant): the gap of
    the final loss to synchronous training of the same seed and rate, the steps to its losses at
    50/80/100 % of the budget, a classifier's accuracy against synchronous training's, and the median
    steps of an "auto" warm-up."""
    runs: dict[tuple, dict[int, dict]] = {}
    for r in results:
        s = r["spec"]
        key = (s["task"], s["workers"], s["optimizer"], s["shards"], s["lr"], r["where"], s["variant"]["label"])
        runs.setdefault(key, {})[s["seed"]] = r
    rows = []
    for key, by_seed in runs.items():
        sync = runs.get(key[:-1] + ("sync",), {})
        gaps, reached, diverged = [], {f: [] for f in FRACTIONS}, 0
        for seed, r in by_seed.items():
            if seed not in sync:
                continue
            base = sync[seed]
            ratio = r["final"]["val_loss"] / base["final"]["val_loss"]
            diverged += not math.isfinite(ratio) or ratio >= DIVERGED_RATIO
            gaps.append(100 * (ratio - 1))
            budget = base["spec"]["steps"]
            for f in FRACTIONS:
                target = min((m["val_loss"] for step, m in base["curve"] if step <= f * budget), default=None)
                reached[f].append(None if target is None else steps_to(r["curve"], target))
        if not gaps:
            continue
        row = dict(zip(("task", "workers", "optimizer", "shards", "lr", "where", "variant"), key))
        row.update(gap_pct=statistics.mean(gaps), gap_min=min(gaps), gap_max=max(gaps), seeds=len(gaps),
                   diverged=diverged,
                   val_loss=statistics.mean(r["final"]["val_loss"] for r in by_seed.values()))
        for f in FRACTIONS:
            hit = [s for s in reached[f] if s is not None]
            row[f"steps_to_{int(100 * f)}"] = statistics.median(hit) if len(hit) == len(reached[f]) else None
        if all("val_accuracy" in r["final"] for r in by_seed.values()):   # a classifier
            row.update(_accuracy_gap(by_seed, sync))
        if all(r.get("warmup") is not None for r in by_seed.values()):   # an "auto" warm-up
            row["warmup_steps"] = statistics.median(r["warmup"] for r in by_seed.values())
        per_step = [statistics.median(r["seconds_per_step"]) for r in by_seed.values() if r.get("seconds_per_step")]
        row["ms_per_step"] = 1e3 * statistics.mean(per_step) if per_step else None
        rows.append(row)
    return rows


def _accuracy_gap(by_seed: dict[int, dict], sync: dict[int, dict]) -> dict[str, float]:
    """A classifier's final validation accuracy (mean over seeds) and its difference to
    synchronous training of the same seed, in points (mean, range)."""
    diffs = [100 * (r["final"]["val_accuracy"] - sync[seed]["final"]["val_accuracy"])
             for seed, r in by_seed.items() if seed in sync]
    return dict(val_accuracy=statistics.mean(r["final"]["val_accuracy"] for r in by_seed.values()),
                accuracy_pts=statistics.mean(diffs), accuracy_min=min(diffs), accuracy_max=max(diffs))


def _cell(r: dict[str, Any]) -> str:
    """A variant's cell: the gap of its loss, the steps to synchronous training's losses, and a
    classifier's accuracy against synchronous training's in points."""
    accuracy = "val_accuracy" in r
    if r["variant"] == "sync":
        return f"loss {r['val_loss']:.4f}" + (f", accuracy {100 * r['val_accuracy']:.1f} %" if accuracy else "")
    if r.get("diverged"):
        return f"diverged ({r['diverged']} of {r['seeds']} seeds)"
    reach = "/".join("-" if r[f"steps_to_{int(100 * f)}"] is None else f"{r[f'steps_to_{int(100 * f)}']:g}"
                     for f in FRACTIONS)
    cell = f"{r['gap_pct']:+.1f} % ({r['gap_min']:+.1f}..{r['gap_max']:+.1f}); {reach}"
    if accuracy:
        cell += f"; {r['accuracy_pts']:+.1f} pt ({r['accuracy_min']:+.1f}..{r['accuracy_max']:+.1f})"
    if r.get("warmup_steps") is not None:
        cell += f"; warm-up {r['warmup_steps']:g} steps"
    return cell


def _table(row: dict[str, Any]) -> tuple[str, str, str, float]:
    """Which table a row or run is in (records older than the peak rate ran at the task's own)."""
    return row["task"], row["optimizer"], row["shards"], row.get("lr", 0.0)


def _peak_lr(lr: float) -> str:
    """A title's words for a run's peak learning rate (0, and records older than the rate: the task's own)."""
    return f", peak lr {lr:g}" if lr else ""


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown tables: one per (task, optimizer, shards, peak learning rate, where), variants down,
    workers across."""
    out = []
    groups = sorted({(*_table(r), r["where"]) for r in rows},
                    key=lambda g: (g[0], g[1] != "sgd", g[2] != "shuffle", g[3], g[4]))   # SGD, shuffled first
    for task, opt, shards, lr, where in groups:
        mine = [r for r in rows if (*_table(r), r["where"]) == (task, opt, shards, lr, where)]
        workers = sorted({r["workers"] for r in mine})
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        accuracy = ("; the final validation accuracy's difference to synchronous training's, in points"
                    if any("val_accuracy" in r for r in mine) else "")
        out.append(f"**{task}, {opt}, {shards} shards{_peak_lr(lr)}, {where}** — gap of the final validation loss "
                   f"to synchronous training (mean, range over seeds); steps to the synchronous run's loss at "
                   f"50/80/100 % of its budget{accuracy}\n")
        out.append("| variant | " + " | ".join(f"{n} ranks" for n in workers) + " |")
        out.append("|---|" + "---|" * len(workers))
        for v in variants:
            cells = []
            for n in workers:
                r = next((r for r in mine if r["workers"] == n and r["variant"] == v), None)
                cells.append("" if r is None else _cell(r))
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def render_record(record: dict[str, Any]) -> str:
    """The section of docs/BENCHMARKS.md a results file writes: its provenance, then the tables."""
    head = (f"Command: `{record['command']}` ({record['seconds'] / 60:.0f} min; commit {record['commit']}, "
            f"{record['date']}; {record['machine']}; Python {record['python']}, torch {record['torch']}).\n")
    return head + "\n" + render(record["rows"])


def plotted(label: str, variants: int) -> bool:
    """The curves a plot of ``variants`` variants shows: all of them up to ``MAX_CURVES``, otherwise
    synchronous training and the windows k = d = 1 and 5, with any options."""
    window = label.split("+")[0].split("@")[0].split(":")[:2]
    return variants <= MAX_CURVES or label == "sync" or window in (["1", "1"], ["5", "5"])


def plot_record(record: dict[str, Any], path: Path) -> None:
    """Validation loss against steps (mean over seeds) of the ``plotted`` variants, a panel per
    (task, optimizer, shards, peak learning rate) at the most ranks the simulator ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = [r for r in record["runs"] if r["where"] == "simulator"]
    panels = sorted({_table(r) for r in sim})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, opt, shards, lr) in zip(axes[0], panels):
        mine = [r for r in sim if _table(r) == (task, opt, shards, lr)]
        ranks = max(r["workers"] for r in mine)
        labels = list(dict.fromkeys(r["variant"] for r in mine))
        for label in [v for v in labels if plotted(v, len(labels))]:
            curves = [r["val_loss"] for r in mine if r["workers"] == ranks and r["variant"] == label]
            if curves:
                steps = [step for step, _ in curves[0]]
                mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
                ax.plot(steps, mean, label=label)
        ax.set(title=f"{task}, {opt}, {shards}{_peak_lr(lr)}, {ranks} ranks", xlabel="step", ylabel="validation loss",
               yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def dump_record(record: dict[str, Any]) -> str:
    """The results file's text: one line per run, so that it stays small and diffs by run."""
    head = json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1)
    runs = ",\n".join(f"  {json.dumps(run)}" for run in record["runs"])
    return f'{head[:-2]},\n "runs": [\n{runs}\n ]\n}}\n'


RUN_KEYS = ("task", "workers", "optimizer", "shards", "lr", "seed")


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """A run as the results file keeps it (the rest of its spec is the command's): where and what
    ran, and its validation losses, to 5 significant digits, at each evaluated step."""
    spec = result["spec"]
    out = {key: spec[key] for key in RUN_KEYS}
    out.update(variant=spec["variant"]["label"], where=result["where"],
               val_loss=[[step, float(f"{m['val_loss']:.5g}")] for step, m in result["curve"]])
    # the gradient noise over its signal while synchronous (null: no signal left)
    noise = [[step, float(f"{m['noise']:.4g}") if math.isfinite(m["noise"]) else None]
             for step, m in result["curve"] if "noise" in m]
    if noise:
        out["noise"] = noise
    if result.get("warmup") is not None:
        out["warmup"] = result["warmup"]
    if "val_accuracy" in result["final"]:
        out["val_accuracy"] = float(f"{result['final']['val_accuracy']:.5g}")
    if result["seconds_per_step"]:
        out["ms_per_step"] = float(f"{1e3 * statistics.median(result['seconds_per_step']):.4g}")
    return out


def _simulate_dict(spec: RunSpec) -> dict[str, Any]:
    return dict(asdict(simulate(spec)), where="simulator")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=["regression"],
                    help="regression: a teacher network's outputs; digits: the CNN on the digits; gpt: a small GPT "
                         "on the standard-library corpus")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4], help="simulated ranks (the simulator, one process)")
    ap.add_argument("--real-ranks", type=int, nargs="*", default=[],
                    help="also run every setting on this many real ranks (horovodrun, Gloo, this machine)")
    ap.add_argument("--optimizers", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"],
                    help="the wrapped optimizer (SGD: momentum 0.9; both weight decay 1e-4)")
    ap.add_argument("--shards", nargs="+", choices=SHARDS, default=["shuffle"],
                    help="how the data is split: shuffle, or non-iid (each rank a contiguous run of the samples "
                         "sorted by label, target or package)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="sync, or k:d[:glu_beta[:local_lr_scale[:outer_lr/outer_momentum]]][@warmup][+dc][+am] "
                         "(auto for the library's choice; @warmup: this variant's own --warmup-steps, @auto: until the "
                         "ranks' gradient noise reaches their number; +dc: the drift correction; "
                         "+am: the averaged moments)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each variant beside sync of the same seed")
    ap.add_argument("--max-steps", type=int, default=600, help="the budget of every run, in steps")
    ap.add_argument("--warmup-steps", type=int, default=50, help="SSD-SGD's synchronous steps first")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.0],
                    help="peak learning rates, each a table of its own against synchronous training at that rate "
                         "(0: the task's own, see quality_run.py)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="simulator runs in parallel")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a run on real ranks may take")
    ap.add_argument("--out", default="results/quality.json", help="the results file (JSON)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    check_at_least(a, 1, "ranks", "real_ranks", "seeds", "max_steps", "jobs")
    check_at_least(a, 0, "warmup_steps", "lr")
    specs = plan(a)
    started = time.time()
    real = [replace(s, workers=n) for n in a.real_ranks for s in specs if s.workers == a.ranks[0]]
    print(f"quality: {len(specs)} simulator runs" + (f" and {len(real)} on real ranks" if real else ""), flush=True)
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(_simulate_dict, specs))
    for spec in real:
        results.append(dict(asdict(run_on_ranks(spec, a.timeout)), where="ranks"))
    rows = summarise(results)
    record = {**provenance(f"{PROG} quality " + " ".join(argv)), "seconds": round(time.time() - started),
              "rows": rows, "runs": [compact(r) for r in results]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(dump_record(record))
    plot_record(record, Path(a.out).with_suffix(".png"))
    print(render(rows))
    print(f"quality: written {a.out} and its plot")


if __name__ == "__main__":
    main()
