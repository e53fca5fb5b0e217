"""Benchmark SSD-SGD against plain Horovod, side by side, on an emulated slow network.

    python -m ssd_allreduce.bench                                   # digits, 2 ranks, 3 bandwidths
    python -m ssd_allreduce.bench --bandwidths 100mbit --epochs 4   # the README's short comparison
    python -m ssd_allreduce.bench --ablation                        # GLU ablation (simulator, 8 workers)
    horovodrun -np 4 python -m ssd_allreduce.bench synthetic --model resnet50 --mode ssd

One invocation runs every mode on the same workload and ranks (the Horovod baseline, SSD-SGD at
several (k, d), blocking local SGD, the no-communication limit) inside a private network namespace
whose loopback is shaped with ``tc tbf`` (Gloo over TCP, so the shaping applies), and writes
results.json, results.md and PNG plots into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from . import costmodel, runlog
from .netns import ShapedNetwork, measure_bandwidth_mbps, namespaces_available

DEFAULT_BANDWIDTHS = ("10gbit", "1gbit", "100mbit")
ABLATION_BETAS = (1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class ModeSpec:
    """One column of the comparison: a training mode and its SSD-SGD window."""

    mode: str
    sync_every: int = 1
    delay: int = 0

    @property
    def name(self) -> str:
        if self.mode == "ssd":
            return f"ssd k={self.sync_every} d={self.delay}"
        if self.mode == "local-sgd":
            return f"local-sgd k={self.sync_every}"
        return self.mode

    def args(self) -> list[str]:
        return ["--mode", self.mode, "--sync-every", str(self.sync_every), "--delay", str(self.delay)]


def parse_modes(ssd_configs: Sequence[str], local_sgd_every: int, with_local_sgd: bool) -> list[ModeSpec]:
    specs = [ModeSpec("horovod")]
    for cfg in ssd_configs:
        try:
            k, d = (int(v) for v in cfg.split(":"))
        except ValueError:
            raise SystemExit(f"--ssd-configs takes k:d pairs such as 5:5, got {cfg!r}") from None
        if not 0 <= d <= k:
            raise SystemExit(f"--ssd-configs {cfg}: need 0 <= d <= k")
        specs.append(ModeSpec("ssd", k, d))
    if with_local_sgd:
        specs.append(ModeSpec("local-sgd", local_sgd_every, 0))
    specs.append(ModeSpec("no-comm"))
    return specs


def _lo_tx_bytes(prefix: list[str]) -> Optional[int]:
    try:
        out = subprocess.run(prefix + ["cat", "/sys/class/net/lo/statistics/tx_bytes"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return int(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def run_mode(spec: ModeSpec, a: argparse.Namespace, prefix: list[str], run_dir: Path, label: str) -> dict[str, Any]:
    """Launch one training run with horovodrun (Gloo over loopback); returns its summary + curve."""
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    cmd = prefix + [horovodrun, "-np", str(a.ranks), "-H", f"localhost:{a.ranks}", "--gloo",
                    "--network-interface", "lo", sys.executable, "-m", "ssd_allreduce.train", "--no-progress",
                    "--model", a.model, "--data", a.data, "--epochs", str(a.epochs), "--batch-size",
                    str(a.batch_size), "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps),
                    "--glu-beta", str(a.glu_beta), "--checkpoint-every", "0", "--out", str(run_dir),
                    "--label", label, *spec.args(), *(["--data-dir", a.data_dir] if a.data_dir else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    tx0 = _lo_tx_bytes(prefix) if prefix else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.run_timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.name} failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    tx1 = _lo_tx_bytes(prefix) if prefix else None
    records = runlog.read(run_dir)
    summary = [r for r in records if r["kind"] == "summary"][-1]
    summary["curve"] = [(r["wall"], r["test_accuracy"]) for r in records if r["kind"] == "epoch"]
    summary["wire_bytes_per_step_per_rank"] = (
        (tx1 - tx0) / summary["steps"] / a.ranks if tx0 is not None and tx1 is not None else None)
    summary["name"] = spec.name
    return summary


def time_to_accuracy(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    return next((wall for wall, acc in curve if acc >= target), None)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the repeats of one mode at one bandwidth."""
    per_rank = [ips for r in runs for ips in r["rank_images_per_sec"]]
    first = runs[0]
    return {
        "name": first["name"], "mode": first["mode"], "ranks": first["ranks"],
        "run_images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
        "images_per_sec": statistics.median(r["steady_images_per_sec"] for r in runs),
        "rank_images_per_sec": {"min": min(per_rank), "median": statistics.median(per_rank), "max": max(per_rank)},
        "step_ms": statistics.median(r["steady_step_ms"] for r in runs),
        "compute_ms": statistics.median(r["steady_compute_ms"] for r in runs),
        "comm_wait_ms": statistics.median(r["steady_comm_wait_ms"] for r in runs),
        "bytes_per_step": first["bytes_per_step"],
        "wire_bytes_per_step_per_rank": first["wire_bytes_per_step_per_rank"],
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
        per_allreduce = spec.sync_every if r["mode"] in ("ssd", "local-sgd") else 1
        if full_allreduce_ms and r["mode"] != "no-comm":
            exposed = r["comm_wait_ms"] * per_allreduce
            r["hidden_fraction"] = max(0.0, 1.0 - exposed / full_allreduce_ms)
        else:
            r["hidden_fraction"] = None
        r["accuracy_vs_horovod_pp"] = 100 * (r["test_accuracy"] - base["test_accuracy"]) if base else None


TABLE = (("mode", "name", "{}"), ("img/s", "images_per_sec", "{:.0f}"), ("run img/s", "run_images_per_sec", "{:.0f}"),
         ("rank img/s min/med/max", "rank_images_per_sec", None), ("step ms", "step_ms", "{:.2f}"),
         ("compute ms", "compute_ms", "{:.2f}"), ("exposed comm ms", "comm_wait_ms", "{:.2f}"),
         ("hidden", "hidden_fraction", "{:.0%}"), ("payload B/step", "bytes_per_step", "{:,.0f}"),
         ("wire B/step/rank", "wire_bytes_per_step_per_rank", "{:,.0f}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
         ("extra state MB", "extra_state_mb", "{:.2f}"), ("time to target s", "time_to_target_s", "{:.1f}"),
         ("test acc", "test_accuracy", "{:.4f}"), ("acc vs hvd pp", "accuracy_vs_horovod_pp", "{:+.1f}"),
         ("x horovod", "x_horovod", "{:.2f}"), ("x no-comm", "x_no_comm", "{:.2f}"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(t[0] for t in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in rows:
        cells = []
        for _, key, fmt in TABLE:
            v = r.get(key)
            if key == "rank_images_per_sec":
                cells.append(f"{v['min']:.0f}/{v['median']:.0f}/{v['max']:.0f}")
            else:
                cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        k = int(r["name"].split("k=")[1].split()[0])
        checks = [("x horovod >= 2.1", r["x_horovod"], 2.1), ("x no-comm >= 0.9", r["x_no_comm"], 0.9)]
        parts = []
        for text, value, goal in checks:
            if not comm_bound and text.startswith("x horovod"):
                continue
            parts.append(f"{text}: {'met' if value >= goal else f'MISSED by {goal - value:.3f}'} ({value:.3f})")
        gap = r["accuracy_vs_horovod_pp"]
        parts.append(f"accuracy within 0.5 pp: {'met' if gap >= -0.5 else f'MISSED by {-gap - 0.5:.1f} pp'} ({gap:+.1f} pp)")
        ratio = r["bytes_per_step"] / base["bytes_per_step"]
        parts.append(f"bytes/step = {ratio:.3f} of baseline (1/k = {1 / k:.3f}; the delta also carries BN statistics)")
        verdicts.append(f"{r['name']}: " + "; ".join(parts))
    return verdicts


def cost_model_check(rows: list[dict[str, Any]], specs: list[ModeSpec], ranks: int, measured_mbps: Optional[float],
                     latency_us: float) -> list[dict[str, Any]]:
    """Predict each mode's step time from the measured compute time and bandwidth; report the error."""
    limit = next((r for r in rows if r["mode"] == "no-comm"), None)
    if limit is None or not measured_mbps:
        return []
    w = costmodel.Workload(param_bytes=limit["parameter_mb"] * 2**20, compute_seconds=limit["step_ms"] / 1e3)
    local = next((r for r in rows if r["mode"] == "local-sgd"), None)
    if local is not None and latency_us < 0:
        # calibrate the per-hop latency on the blocking allreduce that local SGD waits for
        k = next(s.sync_every for s in specs if s.mode == "local-sgd")
        bandwidth_term = costmodel.ring_allreduce_seconds(w.param_bytes, ranks, costmodel.Network(measured_mbps / 1e3, 0.0))
        latency_us = max(0.0, (local["comm_wait_ms"] * k / 1e3 - bandwidth_term) / (2 * (ranks - 1)) * 1e6)
    net = costmodel.Network(bandwidth_gbps=measured_mbps / 1e3, latency_us=max(latency_us, 0.0))
    out = []
    for r in rows:
        spec = next(s for s in specs if s.name == r["name"])
        if spec.mode == "horovod":
            predicted = costmodel.baseline_step_seconds(w, ranks, net)
        elif spec.mode in ("ssd", "local-sgd"):
            predicted = costmodel.ssd_step_seconds(w, ranks, net, spec.sync_every, spec.delay)
        else:
            predicted = costmodel.no_comm_step_seconds(w)
        measured = r["step_ms"] / 1e3
        out.append({"name": r["name"], "predicted_ms": 1e3 * predicted, "measured_ms": r["step_ms"],
                    "error": costmodel.prediction_error(predicted, measured), "latency_us": net.latency_us})
    return out


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

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
        paths.append(_save(fig, ax, out / "throughput_vs_bandwidth.png"))
    slowest = sections[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in slowest["rows"]:
        ax.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], "o-", label=r["name"])
    ax.set(xlabel="training wall time (s)", ylabel="test accuracy", title=f"accuracy vs time at {slowest['rate']}")
    paths.append(_save(fig, ax, out / "accuracy_vs_time.png"))
    return paths


def compare(a: argparse.Namespace) -> dict[str, Any]:
    specs = parse_modes(a.ssd_configs, a.local_sgd_every, not a.no_local_sgd)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ok, why = namespaces_available()
    rates: list[Optional[str]] = list(a.bandwidths) if ok else [None]
    if not ok:
        print(f"NOTE: no emulated network ({why}); running on the unshaped loopback", flush=True)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(a).items() if k != "func"}, "bandwidths": [],
                               "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "command": "python -m ssd_allreduce.bench " + " ".join(sys.argv[1:])}
    for rate in rates:
        label = f"tbf {rate}" if rate else "unshaped loopback"
        with (ShapedNetwork(rate) if ok else nullcontext()) as net:
            prefix = net.prefix() if net is not None else []
            measured = measure_bandwidth_mbps(prefix) if prefix else None
            print(f"== {label}: measured {measured:.0f} Mbit/s" if measured else f"== {label}", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
            for rep in range(a.repeats):   # interleave modes so drifts hit every mode alike
                for spec in specs:
                    run_dir = out / "runs" / (rate or "unshaped") / f"{spec.name.replace(' ', '_').replace('=', '')}-{rep}"
                    t0 = time.time()
                    runs[spec.name].append(run_mode(spec, a, prefix, run_dir, label))
                    print(f"   {spec.name:<18} rep {rep}: {runs[spec.name][-1]['images_per_sec']:8.0f} img/s, "
                          f"acc {runs[spec.name][-1]['test_accuracy']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        rows = [aggregate(runs[s.name]) for s in specs]
        add_ratios(rows, specs, a.target_accuracy)
        section = {"rate": rate or "unshaped", "measured_mbps": measured, "rows": rows,
                   "targets": check_targets(rows),
                   "cost_model": cost_model_check(rows, specs, a.ranks, measured, a.latency_us)}
        results["bandwidths"].append(section)
        print(markdown_table(rows), flush=True)
        for line in section["targets"]:
            print("  " + line)
        for c in section["cost_model"]:
            print(f"  cost model {c['name']}: predicted {c['predicted_ms']:.2f} ms, measured "
                  f"{c['measured_ms']:.2f} ms, error {c['error']:+.0%}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render_markdown(results))
    for p in plot_results(results, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def render_markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']['host']}, {results['machine']['cpus']} CPUs, Python "
             f"{results['machine']['python']}; {c['ranks']} ranks (horovodrun, Gloo over loopback); "
             f"{c['model']} on {c['data']}, {c['epochs']} epochs, batch {c['batch_size']} per rank, "
             f"{c['repeats']} repeat(s); target accuracy {c['target_accuracy']}.", ""]
    for s in results["bandwidths"]:
        measured = f", measured {s['measured_mbps']:.0f} Mbit/s" if s["measured_mbps"] else ""
        lines += [f"### {s['rate']}{measured}", "", markdown_table(s["rows"]), ""]
        lines += [f"- {t}" for t in s["targets"]]
        lines += [f"- cost model (latency {m['latency_us']:.0f} us/hop), {m['name']}: predicted "
                  f"{m['predicted_ms']:.2f} ms/step, measured {m['measured_ms']:.2f} ms/step ({m['error']:+.0%})"
                  for m in s["cost_model"]]
        lines.append("")
    return "\n".join(lines)


def ablation(a: argparse.Namespace) -> list[dict[str, Any]]:
    """GLU ablation with the simulator (same math as the real ranks): compensation variants with
    shuffled and label-skewed shards, against synchronous SGD, averaged over seeds."""
    from .simulator import study

    variants = [("ssgd", 1, 0, 1.0, "glu"), ("overwrite", a.ablation_k, a.ablation_k, 0.0, "overwrite")]
    variants += [(f"glu_beta={b}", a.ablation_k, a.ablation_k, b, "glu") for b in ABLATION_BETAS]
    rows = []
    for shards in ("shuffle", "label-skew"):
        for name, k, d, beta, comp in variants:
            accs = [study(workers=a.ablation_workers, sync_every=k, delay=d, warmup_steps=a.ablation_warmup,
                          glu_beta=beta, compensation=comp, shards=shards, epochs=a.ablation_epochs,
                          batch_size=16, lr=0.05, model_name="mlp", seed=seed)["accuracy"]
                    for seed in range(a.ablation_seeds)]
            rows.append({"shards": shards, "variant": name, "accuracy": statistics.mean(accs),
                         "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0})
            print(f"{shards:<10} {name:<14} {rows[-1]['accuracy']:.4f} ± {rows[-1]['stdev']:.4f}", flush=True)
    lines = [f"GLU ablation: `python -m ssd_allreduce.bench --ablation --ablation-k {a.ablation_k} "
             f"--ablation-workers {a.ablation_workers} --ablation-epochs {a.ablation_epochs} --ablation-seeds "
             f"{a.ablation_seeds}` (simulator, MLP on digits, k = d = {a.ablation_k}, mean ± stdev over seeds)", "",
             "| variant | shuffled shards | label-skewed shards |", "|---|---|---|"]
    for name, *_ in variants:
        cell = {r["shards"]: f"{r['accuracy']:.4f} ± {r['stdev']:.4f}" for r in rows if r["variant"] == name}
        lines.append(f"| {name} | {cell['shuffle']} | {cell['label-skew']} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def synthetic(argv: Sequence[str]) -> None:
    """Horovod's pytorch_synthetic_benchmark.py, with ``--mode ssd`` to run SSD-SGD instead."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .launch import init_distributed
    from .models import MODEL_NAMES, build_model
    from .optimizer import DistributedOptimizer
    from .compression import Compression

    ap = argparse.ArgumentParser(prog="python -m ssd_allreduce.bench synthetic")
    ap.add_argument("--fp16-allreduce", action="store_true", default=False)
    ap.add_argument("--model", type=str, default="resnet50")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-warmup-batches", type=int, default=10)
    ap.add_argument("--num-batches-per-iter", type=int, default=10)
    ap.add_argument("--num-iters", type=int, default=10)
    ap.add_argument("--no-cuda", action="store_true", default=False)
    ap.add_argument("--mode", choices=("horovod", "ddp", "ssd", "no-comm"), default="horovod")
    ap.add_argument("--backend", choices=("horovod", "torch"), default="horovod",
                    help="torch: launch with torchrun; the baseline is then --mode ddp")
    ap.add_argument("--sync-every", type=int, default=5)
    ap.add_argument("--delay", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="default: 224, or 32 for the CIFAR models")
    a = ap.parse_args(argv)
    ctx = init_distributed(a.backend, "cpu" if a.no_cuda else "auto")
    if (a.mode == "horovod") != (a.backend == "horovod") and a.mode in ("horovod", "ddp"):
        raise SystemExit(f"--mode {a.mode} needs --backend {'horovod' if a.mode == 'horovod' else 'torch'}")
    size = a.image_size or (32 if a.model in MODEL_NAMES else 224)
    classes = 10 if a.model in MODEL_NAMES else 1000
    model = build_model(a.model, classes, 3, size).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * ctx.size)
    ctx.comm.broadcast_(list(model.state_dict().values()), 0, "bench.init")
    net = model
    if a.mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if a.mode == "horovod":
        import horovod.torch as hvd
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=hvd.Compression.fp16 if a.fp16_allreduce else hvd.Compression.none)
    elif a.mode == "ssd":
        opt = DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   named_buffers=model.named_buffers(), sync_every=a.sync_every,
                                   delay=a.delay, warmup_steps=0, backend=ctx.comm,
                                   compression=Compression.fp16 if a.fp16_allreduce else Compression.none)
    data = torch.randn(a.batch_size, 3, size, size, device=ctx.device)
    target = torch.randint(0, classes, (a.batch_size,), device=ctx.device)

    def benchmark_step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(data), target).backward()
        opt.step()

    def log(s: str) -> None:
        if ctx.is_root:
            print(s, flush=True)

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    log(f"Model: {a.model}\nBatch size: {a.batch_size}\nMode: {a.mode}")
    device = "GPU" if ctx.device.type == "cuda" else "CPU"
    log(f"Number of {device}s: {ctx.size}")
    for _ in range(a.num_warmup_batches):
        benchmark_step()
    sync()
    log("Running benchmark...")
    img_secs = []
    for x in range(a.num_iters):
        t0 = time.perf_counter()
        for _ in range(a.num_batches_per_iter):
            benchmark_step()
        sync()
        img_sec = a.batch_size * a.num_batches_per_iter / (time.perf_counter() - t0)
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device}")
        img_secs.append(img_sec)
    mean, conf = float(np.mean(img_secs)), float(1.96 * np.std(img_secs))
    log(f"Img/sec per {device}: {mean:.1f} +-{conf:.1f}")
    log(f"Total img/sec on {ctx.size} {device}(s): {ctx.size * mean:.1f} +-{ctx.size * conf:.1f}")
    if hasattr(opt, "finish"):
        opt.finish()


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthetic"]:
        synthetic(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="python -m ssd_allreduce.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bandwidths", nargs="+", default=list(DEFAULT_BANDWIDTHS), help="tc rates, e.g. 100mbit 1gbit")
    ap.add_argument("--ssd-configs", nargs="+", default=["5:5", "10:10"], help="k:d pairs")
    ap.add_argument("--local-sgd-every", type=int, default=5)
    ap.add_argument("--no-local-sgd", action="store_true")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--glu-beta", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--target-accuracy", type=float, default=0.9)
    ap.add_argument("--latency-us", type=float, default=-1.0,
                    help="per-hop latency for the cost model (negative: calibrated on local SGD's blocking wait)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
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
        ablation(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
