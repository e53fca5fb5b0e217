"""SSD-SGD against plain Horovod, side by side, on an emulated slow network.

One invocation runs every mode on the same workload and ranks (the Horovod baseline, SSD-SGD at
several (k, d), blocking local SGD, the no-communication limit) inside a private network namespace
whose loopback is shaped with ``tc tbf`` (Gloo over TCP, so the shaping applies), or with
``--nodes M`` on M emulated nodes joined by shaped links, where each SSD-SGD window also runs
hierarchically; it writes results.json, results.md and PNG plots into ``--out``.

    python -m ssd_allreduce.bench compare --bandwidths 100mbit --epochs 5 --warmup-steps 20
    python -m ssd_allreduce.bench --bandwidths 100mbit      # the same subcommand: it is the default
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..cli import HelpFormatter
from ..settings import DEFAULT_GLU_BETA
from ..train import runlog
from ..train.data import DATASET_NAMES
from ..train.options import (BATCH_SIZE_HELP, GLU_BETA_HELP, SLOW_FRACTION_HELP, SLOW_RANK_HELP, WARMUP_EPOCH,
                             WARMUP_HELP, float_or_auto, int_or_epoch)
from ..train.runlog import markdown_table
from . import costmodel, nodecost
from .emulation import Emulation, emulate, emulation_available
from .sections import write_record
from .flags import PROG, RATE_HELP, UNSHAPED, add_local_sgd, add_record, check_at_least, link_rate

DEFAULT_BANDWIDTHS = ("10gbit", "1gbit", "100mbit")
WORKLOADS = ("images", "gpt")


@dataclass(frozen=True)
class ModeSpec:
    """One column of the comparison: a training mode and its SSD-SGD window."""

    mode: str
    sync_every: Union[int, str] = 1    # "auto": chosen by the run (``window_used`` gives it)
    delay: Union[int, str] = 0
    compression: str = "none"
    hierarchical: bool = False   # gradients averaged inside each node, windows between nodes

    @property
    def name(self) -> str:
        wire = "" if self.compression == "none" else f" {self.compression}"
        where = " hier" if self.hierarchical else ""
        if self.mode == "ssd":
            return f"ssd k={self.sync_every} d={self.delay}{wire}{where}"
        if self.mode == "local-sgd":
            return f"local-sgd k={self.sync_every}{where}"
        return self.mode

    def args(self) -> list[str]:
        return ["--mode", self.mode, "--sync-every", str(self.sync_every), "--delay", str(self.delay),
                "--compression", self.compression, "--local-sync", "on" if self.hierarchical else "off"]

    def window_used(self, row: dict[str, Any]) -> tuple[int, int]:
        """(k, d) the run used: its own, or what "auto" chose (at the end of the run)."""
        if self.sync_every == "auto":
            return row["sync_every_used"], row["delay_used"]
        if self.delay == "auto":
            return int(self.sync_every), row["delay_used"]
        return int(self.sync_every), int(self.delay)


def parse_window(cfg: str, flag: str = "--ssd-configs") -> tuple[int, Union[int, str]]:
    """(k, d) of a ``k:d`` pair given to ``flag``; ``k:auto`` is a fixed window whose delay the run
    chooses (``delay="auto"``)."""
    try:
        k, d = cfg.split(":")
        k, d = int(k), (d if d == "auto" else int(d))
    except ValueError:
        raise SystemExit(f"{flag} takes k:d pairs such as 5:5 or 5:auto, got {cfg!r}") from None
    if k < 1:
        raise SystemExit(f"{flag} {cfg}: k must be >= 1")
    if d != "auto" and not 0 <= d <= k:
        raise SystemExit(f"{flag} {cfg}: need 0 <= d <= k")
    return k, d


def run_dirname(name: str) -> str:
    """A run's name ("ssd k=5 d=5") as a directory name ("ssd_k5_d5")."""
    return name.replace(" ", "_").replace("=", "")


def parse_modes(ssd_configs: Sequence[str], local_sgd_every: int, with_local_sgd: bool,
                hierarchical: bool = False) -> list[ModeSpec]:
    """The comparison's columns; ``hierarchical`` (several nodes) adds each SSD-SGD window and local
    SGD run hierarchically beside the flat one."""
    specs = [ModeSpec("horovod")]
    for cfg in ssd_configs:
        window, _, wire = cfg.partition("/")
        if wire not in ("", "none", "fp16", "bf16", "int8"):
            raise SystemExit(f"--ssd-configs {cfg}: the wire format after / is one of fp16, bf16, int8")
        k, d = ("auto", "auto") if window == "auto" else parse_window(window)
        specs += [ModeSpec("ssd", k, d, wire or "none", h) for h in (False, True)[:1 + hierarchical]]
    if with_local_sgd:
        specs += [ModeSpec("local-sgd", local_sgd_every, 0, hierarchical=h) for h in (False, True)[:1 + hierarchical]]
    specs.append(ModeSpec("no-comm"))
    return specs


def launch_training(train_args: Sequence[str], ranks: int, net: Emulation, run_dir: Path, threads: int,
                    timeout: float, what: str) -> list[dict[str, Any]]:
    """One training run of ``ranks`` ranks with horovodrun (Gloo) in the emulated network ``net``;
    returns its metrics records."""
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    cmd = net.launcher_prefix + [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo",
                                 "--network-interface", "lo", *net.rank_prefix,
                                 sys.executable, "-m", "ssd_allreduce.train", "--no-progress", "--checkpoint-every", "0",
                                 "--out", str(run_dir), *train_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return runlog.read(run_dir)


def run_mode(spec: ModeSpec, a: argparse.Namespace, net: Emulation, run_dir: Path, label: str) -> dict[str, Any]:
    """Run one mode of the comparison; returns its summary + curve."""
    train_args = ["--model", a.model, "--data", a.data, "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                  "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps), "--glu-beta", str(a.glu_beta),
                  "--label", label, *spec.args(), *(["--data-dir", a.data_dir] if a.data_dir else []),
                  *(["--slow-rank", str(a.slow_rank), "--slow-fraction", str(a.slow_fraction)]
                    if a.slow_rank >= 0 else [])]
    tx0 = net.tx_bytes()
    records = launch_training(train_args, a.ranks, net, run_dir, a.threads, a.run_timeout, spec.name)
    tx1 = net.tx_bytes()
    summary = [r for r in records if r["kind"] == "summary"][-1]
    summary["curve"] = [(r["wall"], r["test_accuracy"]) for r in records if r["kind"] == "epoch"]
    sent = (tx1 - tx0) / summary["steps"] if tx0 is not None and tx1 is not None else None
    # one loopback: what each rank sent through it; nodes: what crossed between nodes in all
    summary["wire_bytes_per_step_per_rank"] = sent / a.ranks if sent is not None and net.nodes == 1 else None
    summary["inter_node_bytes_per_step"] = sent if net.nodes > 1 else None
    summary["name"] = spec.name
    return summary


def time_to_accuracy(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    return next((wall for wall, acc in curve if acc >= target), None)


def bytes_per_window(stats: Optional[dict[str, Any]]) -> Optional[float]:
    """The payload of one window after the warm-up (a self-tuned run's windows differ in steps, not
    bytes), less the gradients a hierarchical node averages every step."""
    if not stats or not stats["windows_launched"]:
        return None
    windows = stats["bytes_allreduced"] - stats["warmup_bytes_allreduced"] - stats.get("node_bytes_allreduced", 0)
    return windows / stats["windows_launched"]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the repeats of one mode at one bandwidth."""
    per_rank = [ips for r in runs for ips in r["rank_images_per_sec"]]
    first = runs[0]
    return {
        "name": first["name"], "mode": first["mode"], "ranks": first["ranks"],
        "run_images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
        "images_per_sec": statistics.median(r["steady_images_per_sec"] for r in runs),
        "images_per_sec_repeats": [r["steady_images_per_sec"] for r in runs],
        "rank_images_per_sec": {"min": min(per_rank), "median": statistics.median(per_rank), "max": max(per_rank)},
        "rank_spread": f"{min(per_rank):.0f}/{statistics.median(per_rank):.0f}/{max(per_rank):.0f}",
        "step_ms": statistics.median(r["steady_step_ms"] for r in runs),
        "compute_ms": statistics.median(r["steady_compute_ms"] for r in runs),
        "comm_wait_ms": statistics.median(r["steady_comm_wait_ms"] for r in runs),
        "bytes_per_step": first["bytes_per_step"],
        "bytes_per_window": bytes_per_window(first.get("ssd_stats")),
        # 0: the run never left the warm-up
        "sync_every_used": (first.get("ssd_stats") or {}).get("sync_every") or None,
        "delay_used": (first.get("ssd_stats") or {}).get("delay"),
        "wire_bytes_per_step_per_rank": first["wire_bytes_per_step_per_rank"],
        "inter_node_bytes_per_step": first.get("inter_node_bytes_per_step"),
        "peak_memory_mb": max(max(r["peak_memory_bytes"]) for r in runs) / 2**20,
        "extra_state_mb": first["extra_state_bytes"] / 2**20,
        "parameter_mb": first["parameter_bytes"] / 2**20,
        "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
        "curve": first["curve"],
        "repeats": len(runs),
    }


def add_ratios(rows: list[dict[str, Any]], specs: list[ModeSpec], target: float) -> None:
    """Ratios to the baseline and the no-comm limit, hidden communication, time to accuracy."""
    by_mode = {r["name"]: r for r in rows}
    base, limit = by_mode.get("horovod"), by_mode.get("no-comm")
    local = next((r for r in rows if r["mode"] == "local-sgd"), None)
    # a blocking window (local SGD, d = 0) waits for the whole allreduce of the model
    full_allreduce_ms = local["comm_wait_ms"] * next(s.sync_every for s in specs if s.mode == "local-sgd") if local else None
    for r in rows:
        r["x_horovod"] = r["images_per_sec"] / base["images_per_sec"] if base else None
        r["x_no_comm"] = r["images_per_sec"] / limit["images_per_sec"] if limit else None
        r["time_to_target_s"] = time_to_accuracy(r["curve"], target)
        spec = next(s for s in specs if s.name == r["name"])
        per_allreduce = (spec.window_used(r)[0] or 1) if r["mode"] in ("ssd", "local-sgd") else 1
        if full_allreduce_ms and r["mode"] != "no-comm":
            exposed = r["comm_wait_ms"] * per_allreduce
            r["hidden_fraction"] = max(0.0, 1.0 - exposed / full_allreduce_ms)
        else:
            r["hidden_fraction"] = None
        r["accuracy_vs_horovod_pp"] = 100 * (r["test_accuracy"] - base["test_accuracy"]) if base else None


FULL_TABLE = (("mode", "name", "{}"), ("img/s", "images_per_sec", "{:.0f}"),
              ("run img/s", "run_images_per_sec", "{:.0f}"), ("rank img/s min/med/max", "rank_spread", "{}"),
              ("step ms", "step_ms", "{:.2f}"), ("compute ms", "compute_ms", "{:.2f}"),
              ("exposed comm ms", "comm_wait_ms", "{:.2f}"), ("hidden", "hidden_fraction", "{:.0%}"),
              ("payload B/step", "bytes_per_step", "{:,.0f}"),
              ("wire B/step/rank", "wire_bytes_per_step_per_rank", "{:,.0f}"),
              ("inter-node B/step", "inter_node_bytes_per_step", "{:,.0f}"),
              ("peak MB", "peak_memory_mb", "{:.0f}"), ("extra state MB", "extra_state_mb", "{:.2f}"),
              ("time to target s", "time_to_target_s", "{:.1f}"), ("test acc", "test_accuracy", "{:.4f}"),
              ("acc vs hvd pp", "accuracy_vs_horovod_pp", "{:+.1f}"), ("x horovod", "x_horovod", "{:.2f}"),
              ("x no-comm", "x_no_comm", "{:.2f}"))
"""Every measured column: written to results.md."""

COMPACT_TABLE = (("mode", "name", "{}"), ("img/s", "images_per_sec", "{:.0f}"), ("x horovod", "x_horovod", "{:.2f}"),
                 ("x no-comm", "x_no_comm", "{:.2f}"), ("test acc", "test_accuracy", "{:.4f}"),
                 ("B/step", "bytes_per_step", "{:,.0f}"), ("to target s", "time_to_target_s", "{:.1f}"))
"""What fits a terminal: printed after each bandwidth."""

NODES_COMPACT_TABLE = COMPACT_TABLE[:-1] + (("between nodes B/step", "inter_node_bytes_per_step", "{:,.0f}"),
                                            COMPACT_TABLE[-1])
"""The same with ``--nodes``: what crossed the nodes' links."""


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The project's targets where communication is the bottleneck, met or missed by how much."""
    by_mode = {r["name"]: r for r in rows}
    base, limit = by_mode.get("horovod"), by_mode.get("no-comm")
    if not base or not limit:
        return []
    comm_bound = base["step_ms"] - limit["step_ms"] >= limit["step_ms"]
    verdicts = [f"communication-bound (baseline exposes >= one compute time per step): {'yes' if comm_bound else 'no'}"]
    for r in rows:
        if r["mode"] != "ssd":
            continue
        k = r["sync_every_used"]
        checks = [("x horovod >= 2.1", r["x_horovod"], 2.1), ("x no-comm >= 0.9", r["x_no_comm"], 0.9)]
        parts = []
        for text, value, goal in checks:
            if not comm_bound and text.startswith("x horovod"):
                continue
            parts.append(f"{text}: {'met' if value >= goal else f'MISSED by {goal - value:.3f}'} ({value:.3f})")
        gap = r["accuracy_vs_horovod_pp"]
        parts.append(f"accuracy within 0.5 pp: {'met' if gap >= -0.5 else f'MISSED by {-gap - 0.5:.1f} pp'} ({gap:+.1f} pp)")
        ratio = r["bytes_per_step"] / base["bytes_per_step"]
        if r.get("inter_node_bytes_per_step") and base.get("inter_node_bytes_per_step"):
            crossed = r["inter_node_bytes_per_step"] / base["inter_node_bytes_per_step"]
            parts.append(f"bytes crossing between nodes/step = {crossed:.3f} of baseline (warm-up included)")
        elif k:   # None: the run never left the warm-up
            parts.append(f"bytes/step = {ratio:.3f} of baseline (1/k = {1 / k:.3f}; the delta also carries BN "
                         "statistics)")
        if "k=auto" in r["name"]:
            parts.append(auto_verdict(r, rows))
        verdicts.append(f"{r['name']}: " + "; ".join(parts))
    return verdicts


def auto_verdict(auto: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """How the self-tuned window compares with the best fixed window of the same wire format."""
    wire = auto["name"].split("d=auto")[1]
    fixed = [r for r in rows if r["mode"] == "ssd" and "=auto" not in r["name"] and r["name"].endswith(wire)
             and (wire or r["name"].split()[-1].startswith("d="))]
    chose = f"chose k={auto['sync_every_used']}, d={auto['delay_used']}"
    if not fixed:
        return chose
    best = max(fixed, key=lambda r: r["images_per_sec"])
    ratio = auto["images_per_sec"] / best["images_per_sec"]
    return (f"{chose}; img/s {ratio:.3f} of the best fixed window ({best['name']}): "
            f"{'met' if ratio >= 0.95 else f'MISSED by {0.95 - ratio:.3f}'} (goal >= 0.95)")


def cost_model_check(rows: list[dict[str, Any]], specs: list[ModeSpec], ranks: int, measured_mbps: Optional[float],
                     latency_us: float) -> list[dict[str, Any]]:
    """Predict each mode's step time from the measured compute time and bandwidth; report the error.
    Every rank's traffic crosses the one shaped loopback, so the link is shared by all ranks; an
    SSD-SGD window carries what the run measured per step times k (its wire format's bytes)."""
    limit = next((r for r in rows if r["mode"] == "no-comm"), None)
    if limit is None or not measured_mbps:
        return []
    w = costmodel.Workload(param_bytes=limit["parameter_mb"] * 2**20, compute_seconds=limit["step_ms"] / 1e3)
    local = next((r for r in rows if r["mode"] == "local-sgd"), None)
    if local is not None and latency_us < 0:
        # calibrate the per-hop latency on the blocking allreduce that local SGD waits for
        k = next(s.sync_every for s in specs if s.mode == "local-sgd")
        bandwidth_term = costmodel.ring_allreduce_seconds(
            w.param_bytes, ranks, costmodel.Network(measured_mbps / 1e3, 0.0, shared_by=ranks))
        latency_us = max(0.0, (local["comm_wait_ms"] * k / 1e3 - bandwidth_term) / (2 * (ranks - 1)) * 1e6)
    net = costmodel.Network(bandwidth_gbps=measured_mbps / 1e3, latency_us=max(latency_us, 0.0), shared_by=ranks)
    out = []
    for r in rows:
        spec = next(s for s in specs if s.name == r["name"])
        if spec.mode == "horovod":
            predicted = costmodel.baseline_step_seconds(w, ranks, net)
        elif spec.mode in ("ssd", "local-sgd"):
            k, d = spec.window_used(r)
            if not k:
                continue
            window = dataclasses.replace(w, param_bytes=r["bytes_per_step"] * k)
            predicted = costmodel.ssd_step_seconds(window, ranks, net, k, d)
        else:
            predicted = costmodel.no_comm_step_seconds(w)
        measured = r["step_ms"] / 1e3
        out.append({"name": r["name"], "predicted_ms": 1e3 * predicted, "measured_ms": r["step_ms"],
                    "error": costmodel.prediction_error(predicted, measured), "latency_us": net.latency_us})
    return out


def save_figure(fig: Any, axes: Sequence[Any], path: Path) -> Path:
    """Grid and legend on every axis, then write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sections = results["bandwidths"]
    if len(sections) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [s["measured_mbps"] or 0 for s in sections]
        for name in [r["name"] for r in sections[0]["rows"]]:
            ys = [next(r["images_per_sec"] for r in s["rows"] if r["name"] == name) for s in sections]
            ax.plot(xs, ys, "o-", label=name)
        c = results["config"]
        ax.set(xscale="log", xlabel="emulated bandwidth (Mbit/s, measured)", ylabel="img/s (all ranks)",
               title=f"{c['model']} on {c['data']}, {c['ranks']} ranks")
        paths.append(save_figure(fig, [ax], out / "throughput_vs_bandwidth.png"))
    slowest = sections[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in slowest["rows"]:
        ax.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], "o-", label=r["name"])
    ax.set(xlabel="training wall time (s)", ylabel="test accuracy", title=f"accuracy vs time at {slowest['rate']}")
    paths.append(save_figure(fig, [ax], out / "accuracy_vs_time.png"))
    return paths


def compare(a: argparse.Namespace) -> dict[str, Any]:
    specs = parse_modes(a.ssd_configs, a.local_sgd_every, not a.no_local_sgd, hierarchical=a.nodes > 1)
    started = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ok, why = emulation_available(a.nodes)
    rates: list[Optional[str]] = list(a.bandwidths) if ok else [None]
    if not ok:
        print(f"NOTE: no emulated network ({why}); running on the unshaped loopback", flush=True)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(a).items() if k != "func"}, "bandwidths": [],
                               "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "command": "python -m ssd_allreduce.bench " + " ".join(sys.argv[1:])}
    for rate in rates:
        with emulate(None if rate == UNSHAPED else rate, a.nodes, a.ranks, ok) as net:
            label, measured = net.label, net.measured_mbps
            print(f"== {label}: measured {measured:.0f} Mbit/s" if measured else f"== {label}", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
            for rep in range(a.repeats):   # interleave modes so drifts hit every mode alike
                for spec in specs:
                    run_dir = out / "runs" / (rate or "unshaped") / f"{run_dirname(spec.name)}-{rep}"
                    t0 = time.time()
                    runs[spec.name].append(run_mode(spec, a, net, run_dir, label))
                    print(f"   {spec.name:<18} rep {rep}: {runs[spec.name][-1]['images_per_sec']:8.0f} img/s, "
                          f"acc {runs[spec.name][-1]['test_accuracy']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        rows = [aggregate(runs[s.name]) for s in specs]
        add_ratios(rows, specs, a.target_accuracy)
        section = {"rate": rate or "unshaped", "measured_mbps": measured, "rows": rows,
                   "targets": check_targets(rows),
                   "cost_model": cost_model_check(rows, specs, a.ranks, measured, a.latency_us) if a.nodes == 1 else []}
        results["bandwidths"].append(section)
        print(markdown_table(rows, NODES_COMPACT_TABLE if a.nodes > 1 else COMPACT_TABLE), flush=True)
        for line in section["targets"]:
            print("  " + line)
        for c in section["cost_model"]:
            print(f"  cost model {c['name']}: predicted {c['predicted_ms']:.2f} ms, measured "
                  f"{c['measured_ms']:.2f} ms, error {c['error']:+.0%}")
    measured = [(s["measured_mbps"], s["rows"]) for s in results["bandwidths"]]
    if a.nodes > 1 and measured and all(m for m, _ in measured):
        results["node_cost_model"] = nodecost.check_measured(measured, a.nodes, a.ranks // a.nodes)
        for c in results["node_cost_model"]:
            print(f"  cost model at {c['mbps']:.0f} Mbit/s, {c['name']}: predicted {c['predicted_ms']:.2f} ms, "
                  f"measured {c['measured_ms']:.2f} ms, error {c['error']:+.0%}")
    results["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render_markdown(results))
    if a.record:
        write_record(results, Path(a.record))
        print(f"wrote {a.record}")
    for p in plot_results(results, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def render_markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']['host']}, {results['machine']['cpus']} CPUs, Python "
             f"{results['machine']['python']}; {c['ranks']} ranks (horovodrun, Gloo "
             + (f"between {c['nodes']} emulated nodes); " if c.get("nodes", 1) > 1 else "over loopback); ")
             + f"{c['model']} on {c['data']}, {c['epochs']} epochs, batch {c['batch_size']} per rank, "
             f"{c['repeats']} repeat(s); target accuracy {c['target_accuracy']}"
             + (f"; rank {c['slow_rank']} a straggler, its compute {c['slow_fraction']:.0%} slower"
                if c.get("slow_rank", -1) >= 0 and c.get("slow_fraction") else "")
             + ".", ""]
    return "\n".join(lines + network_tables(results))


def network_tables(results: dict[str, Any]) -> list[str]:
    """Every measured column per network, the targets, and the cost models' checks (the lines of
    results.md after its header, and of the sections written from a record)."""
    lines: list[str] = []
    for s in results["bandwidths"]:
        measured = f", measured {s['measured_mbps']:.0f} Mbit/s" if s["measured_mbps"] else ""
        columns = [c for c in FULL_TABLE if any(r.get(c[1]) is not None for r in s["rows"])]   # none: not measured
        lines += [f"### {s['rate']}{measured}", "", markdown_table(s["rows"], columns), ""]
        lines += [f"- {t}" for t in s["targets"]]
        lines += [f"- cost model (latency {m['latency_us']:.0f} us/hop), {m['name']}: predicted "
                  f"{m['predicted_ms']:.2f} ms/step, measured {m['measured_ms']:.2f} ms/step ({m['error']:+.0%})"
                  for m in s["cost_model"]]
        lines.append("")
    checked = results.get("node_cost_model")
    if checked:
        c0 = checked[0]
        lines += [f"Cost model on the nodes (`bench/nodecost.py`), calibrated on the slowest link: latency "
                  f"{c0['inter_latency_us']:.0f} us a hop between nodes, {c0['intra_latency_us']:.0f} us inside one, "
                  f"Horovod's overlap {c0['overlap']:.2f} of the compute.", "",
                  "| Mbit/s | mode | predicted ms | measured ms | error |", "|---|---|---|---|---|"]
        lines += [f"| {c['mbps']:.0f} | {c['name']} | {c['predicted_ms']:.2f} | {c['measured_ms']:.2f} | "
                  f"{c['error']:+.0%} |" for c in checked]
        lines.append("")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} [compare]", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--workload", choices=WORKLOADS, default="images",
                    help=f"images: this comparison; gpt: a small GPT on the standard-library corpus, with options "
                         f"of its own ({PROG} --workload gpt --help)")
    g = ap.add_argument_group("ranks and network")
    g.add_argument("--ranks", type=int, default=2, help="ranks of every run (horovodrun -np, Gloo)")
    g.add_argument("--nodes", type=int, default=1,
                   help="emulated nodes (a network namespace each, shaped links between them); the ranks are "
                        "split evenly, and each SSD-SGD window also runs hierarchically")
    g.add_argument("--bandwidths", type=link_rate, nargs="+", default=list(DEFAULT_BANDWIDTHS), metavar="RATE",
                   help=f"the emulated link's rate, a comparison each: {RATE_HELP}; {UNSHAPED}: the plain loopback")
    g.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    g = ap.add_argument_group("modes (Horovod and no-comm always run)")
    g.add_argument("--ssd-configs", nargs="+", default=["5:5", "10:10"], metavar="K:D[/WIRE]",
                   help="SSD-SGD's windows, a column each: k:d pairs, k:auto (the run chooses the delay) or auto "
                        "(both), each optionally with a wire format (5:5/int8; fp16, bf16, int8)")
    add_local_sgd(g)
    g = ap.add_argument_group("training (every mode alike; python -m ssd_allreduce.train's flags)")
    g.add_argument("--model", default="cnn", help="mlp, cnn, resnet20..resnet110 or a torchvision name")
    g.add_argument("--data", choices=[d for d in DATASET_NAMES if d != "stdlib"], default="digits",
                   help="cifar10 and imagefolder need --data-dir")
    g.add_argument("--data-dir", help="CIFAR-10 python-format directory or ImageNet-style folder")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=32, help=BATCH_SIZE_HELP)
    g.add_argument("--lr", type=float, default=0.05, help="learning rate of one rank; scaled by the rank count")
    g.add_argument("--warmup-steps", type=int_or_epoch, default=WARMUP_EPOCH, metavar="N|epoch", help=WARMUP_HELP)
    g.add_argument("--glu-beta", type=float_or_auto, default=DEFAULT_GLU_BETA, metavar="BETA|auto", help=GLU_BETA_HELP)
    g.add_argument("--slow-rank", type=int, default=-1, help=SLOW_RANK_HELP)
    g.add_argument("--slow-fraction", type=float, default=0.0, help=SLOW_FRACTION_HELP)
    g = ap.add_argument_group("report")
    g.add_argument("--repeats", type=int, default=1, help="runs of each mode at each bandwidth (medians reported)")
    g.add_argument("--target-accuracy", type=float, default=0.97,
                   help="test accuracy for the time-to-target column (every mode reaches 0.9 in its warm-up)")
    g.add_argument("--latency-us", type=float, default=-1.0,
                   help="per-hop latency for the cost model (negative: calibrated on local SGD's blocking wait)")
    g.add_argument("--run-timeout", type=float, default=1800, help="seconds one training run may take")
    g.add_argument("--out", default=None,
                   help="where results.json, results.md, the plots and every run's directory go "
                        "(default: results/bench-DATE-TIME)")
    add_record(g)
    return ap


def check_args(a: argparse.Namespace) -> None:
    """Reject what cannot run, before any run starts, saying what to change."""
    check_at_least(a, 1, "ranks", "nodes", "threads", "local_sgd_every", "epochs", "batch_size", "repeats")
    if a.ranks % a.nodes:
        raise SystemExit(f"--ranks {a.ranks} cannot be split into --nodes {a.nodes} of equal size")
    if a.slow_rank >= a.ranks or a.slow_fraction < 0:
        raise SystemExit(f"--slow-rank must be a rank below --ranks ({a.ranks}) and --slow-fraction >= 0, got "
                         f"{a.slow_rank} and {a.slow_fraction}")
    if a.data in ("cifar10", "imagefolder") and not a.data_dir:
        raise SystemExit(f"--data {a.data} needs --data-dir (no download happens here)")
    if a.warmup_steps != WARMUP_EPOCH and a.warmup_steps < 0:
        raise SystemExit(f"--warmup-steps must be >= 0, got {a.warmup_steps}")
    parse_modes(a.ssd_configs, a.local_sgd_every, not a.no_local_sgd)


def pop_workload(argv: list[str]) -> str:
    """Remove ``--workload NAME`` (or ``--workload=NAME``) from ``argv``; "images" when absent."""
    for i, arg in enumerate(argv):
        if arg == "--workload" or arg.startswith("--workload="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in arg else 2)]
            if value not in WORKLOADS:
                raise SystemExit(f"--workload takes images (the default comparison) or gpt, got {value!r}")
            return value
    return "images"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if pop_workload(argv) == "gpt":
        from . import language
        language.main(argv)
        return
    if any(arg == "--ablation" or arg.startswith("--ablation-") for arg in argv):
        raise SystemExit(f"the GLU ablation is a subcommand: {PROG} ablation (its flags: --ranks for "
                         "--ablation-workers, --sync-every for --ablation-k, --epochs, --warmup-steps, --seeds, "
                         "--out)")
    a = build_parser().parse_args(argv)
    check_args(a)
    a.out = a.out or f"results/bench-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(a)
