"""The language-modelling workload: a small GPT on the standard-library corpus, Horovod against
SSD-SGD and blocking local SGD, with shuffled and with by-package (non-IID) shards, and the GLU
ablation on real ranks and on the simulator.

    python -m ssd_allreduce.bench --workload gpt                          # AdamW, about 10 minutes
    python -m ssd_allreduce.bench --workload gpt --optimizers adamw sgd   # the full evidence
    python -m ssd_allreduce.bench --workload gpt --lr-schedule cosine --budget-factor 2   # equal time budgets

Its runs stop at --max-steps, within the corpus's first epoch: the warm-up defaults to an eighth of
them (the driver's one-epoch rule would leave SSD-SGD no steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..cli import HelpFormatter
from ..settings import DEFAULT_GLU_BETA
from ..simulator import Simulator
from ..train.data import ShardedBatches, TextSplit, load_stdlib_text
from ..train.models import build_language_model
from ..train.options import BATCH_SIZE_HELP, GLU_BETA_HELP, GPT_HELP, float_or_auto
from ..train.runlog import markdown_table
from .collect import write_atomically
from .compare import launch_training, parse_window, run_dirname, save_figure
from .emulation import Emulation, emulate, emulation_available
from .flags import PROG, RATE_HELP, UNSHAPED, add_local_sgd, check_at_least, link_rate
from .report import provenance

SIMULATOR_DEFAULT_CONFIG = "10:10"
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.1}
ABLATION = (("overwrite", "overwrite", 0.0), ("glu beta=1", "glu", 1.0), ("glu beta=0.5", "glu", 0.5),
            ("glu beta=0.25", "glu", 0.25))


def budget_steps(max_steps: int, factor: float, eval_every: int) -> int:
    """The steps of a mode other than Horovod: ``factor`` times Horovod's ``max_steps`` (a budget in
    time: their steps are cheaper), down to a validation (``max_steps`` is a multiple of ``eval_every``)."""
    return int(factor * max_steps) // eval_every * eval_every


@dataclass(frozen=True)
class Run:
    """One training run of the workload."""

    optimizer: str
    shards: str
    mode: str
    sync_every: int = 1
    delay: Union[int, str] = 0    # "auto": chosen by the run (the row's ``delay_used``)
    compensation: str = "glu"
    glu_beta: Union[float, str] = "auto"

    @property
    def name(self) -> str:
        if self.mode == "local-sgd":
            return f"local-sgd k={self.sync_every}"
        if self.mode != "ssd":
            return self.mode
        variant = "overwrite" if self.compensation == "overwrite" else f"beta={self.glu_beta if isinstance(self.glu_beta, str) else format(self.glu_beta, 'g')}"
        return f"ssd k={self.sync_every} d={self.delay} {variant}"

    def steps(self, max_steps: int, factor: float, eval_every: int) -> int:
        """Horovod's budget is ``max_steps``; the others' ``budget_steps``."""
        return max_steps if self.mode == "horovod" else budget_steps(max_steps, factor, eval_every)

    def args(self) -> list[str]:
        return ["--mode", self.mode, "--optimizer", self.optimizer, "--shards", self.shards, "--sync-every",
                str(self.sync_every), "--delay", str(self.delay), "--compensation", self.compensation,
                "--glu-beta", str(self.glu_beta)]


def plan(a: argparse.Namespace) -> list[Run]:
    """Every run of the invocation: the comparison for each optimizer and sharding, then the ablation."""
    runs = []
    for opt in a.optimizers:
        for shards in a.shards:
            runs.append(Run(opt, shards, "horovod"))
            for cfg in a.ssd_configs:
                runs.append(Run(opt, shards, "ssd", *parse_window(cfg), "glu", a.glu_beta))
            if not a.no_local_sgd:
                runs.append(Run(opt, shards, "local-sgd", a.local_sgd_every, 0))
    if a.ablation_config:
        k, d = parse_window(a.ablation_config, "--ablation-config")
        for _, compensation, beta in ABLATION:
            run = Run(a.optimizers[0], a.ablation_shards, "ssd", k, d, compensation, beta)
            if run not in runs:
                runs.append(run)
    return runs


def run_one(run: Run, a: argparse.Namespace, net: Emulation, rate: str, out: Path) -> dict[str, Any]:
    """Train ``run`` on real ranks over the network ``net`` emulated at ``rate``; its validation
    curve and summary."""
    steps = run.steps(a.max_steps, a.budget_factor, a.eval_every)
    train_args = ["--data", "stdlib", "--model", "gpt", "--epochs", "1", "--max-steps", str(steps),
                  "--lr-schedule", a.lr_schedule,
                  "--eval-every", str(a.eval_every), "--eval-samples", str(a.eval_samples),
                  "--batch-size", str(a.batch_size), "--context", str(a.context), "--corpus-bytes", str(a.corpus_bytes),
                  "--gpt-width", str(a.gpt_width), "--gpt-layers", str(a.gpt_layers), "--gpt-heads", str(a.gpt_heads),
                  "--lr", str(a.lr[run.optimizer]), "--no-lr-scaling",
                  "--weight-decay", "0.01" if run.optimizer == "adamw" else "0",
                  "--warmup-steps", str(a.warmup_steps), "--label", net.label, *run.args()]
    run_dir = out / "runs" / rate / f"{run.optimizer}-{run.shards}-{run_dirname(run.name)}"
    records = launch_training(train_args, a.ranks, net, run_dir, a.threads, a.run_timeout, run.name)
    summary = [r for r in records if r["kind"] == "summary"][-1]
    if summary["steps"] != steps:
        raise RuntimeError(f"{run.name} ran {summary['steps']} steps, not {steps}: the corpus holds fewer "
                           f"batches per epoch; lower --max-steps, --budget-factor or --batch-size, or raise "
                           "--corpus-bytes")
    curve = [(r["step"], r["wall"], r["test_loss"]) for r in records if r["kind"] == "eval"]
    delay_used = (summary.get("ssd_stats") or {}).get("delay")
    name = run.name.replace("d=auto", f"d=auto ({delay_used})") if run.delay == "auto" else run.name
    return {"network": net.label, "optimizer": run.optimizer, "shards": run.shards, "name": name, "mode": run.mode,
            "delay_used": delay_used, "curve": curve, "val_loss": curve[-1][2], "steps": summary["steps"],
            "wall_seconds": summary["wall_seconds"], "step_ms": summary["step_ms"],
            "bytes_per_step": summary["bytes_per_step"], "parameter_bytes": summary["parameter_bytes"]}


BUDGET_FRACTIONS = (50, 75, 100)
"""Horovod's loss at its first validation at or after these percents of its steps (steps 80, 120
and 160 of the default 160, validated every 20): the targets whose time to reach is compared."""


def first_time_at(curve: Sequence[Sequence[float]], loss: float) -> Optional[float]:
    """The training wall time of the first validation of ``curve`` (step, wall, loss) at or below ``loss``."""
    return next((wall for _, wall, value in curve if value <= loss), None)


def time_ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Optional[float]]:
    """For each of ``BUDGET_FRACTIONS``: Horovod's training time to its own loss at that share of
    its steps over ``row``'s time to the same loss (2.0: there twice as fast); None where
    ``row`` never got there."""
    steps = base["curve"][-1][0]
    out: dict[str, Optional[float]] = {}
    for percent in BUDGET_FRACTIONS:
        target = next(value for step, _, value in base["curve"] if step * 100 >= steps * percent)
        mine = first_time_at(row["curve"], target)
        out[f"x_horovod_to_{percent}"] = first_time_at(base["curve"], target) / mine if mine else None
    return out


def add_ratios(rows: list[dict[str, Any]], tolerance: float) -> None:
    """Each run's final validation loss against Horovod's with the same network, optimizer and
    shards, and its speed to Horovod's losses (``time_ratios``)."""
    for r in rows:
        base = next((b for b in rows if b["mode"] == "horovod" and b["optimizer"] == r["optimizer"]
                     and b["shards"] == r["shards"] and b["network"] == r["network"]), None)
        r["vs_horovod"] = r["val_loss"] / base["val_loss"] - 1 if base else None
        r["x_horovod_speed"] = base["wall_seconds"] / r["wall_seconds"] if base else None
        r["verdict"] = ("-" if base is None or r is base else
                        "met" if r["vs_horovod"] <= tolerance else f"MISSED by {r['vs_horovod'] - tolerance:+.1%}")
        r.update(time_ratios(r, base) if base else {})


TABLE = (("optimizer", "optimizer", "{}"), ("shards", "shards", "{}"), ("mode", "name", "{}"),
         ("val loss", "val_loss", "{:.4f}"), ("vs horovod", "vs_horovod", "{:+.2%}"), ("within 2 %", "verdict", "{}"),
         ("step ms", "step_ms", "{:.1f}"), ("wall s", "wall_seconds", "{:.1f}"),
         ("x horovod (time)", "x_horovod_speed", "{:.2f}"),
         *((f"x horovod to its {p} % loss", f"x_horovod_to_{p}", "{:.2f}") for p in BUDGET_FRACTIONS),
         ("payload B/step", "bytes_per_step", "{:,.0f}"))


# ---------------------------------------------------------------------------------- the simulator
def _token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


def simulate(text: TextSplit, workers: int, shards: str, optimizer: str, steps: int, warmup_steps: int,
             sync_every: int, delay: int, compensation: str, glu_beta: Union[float, str], lr: float, seed: int = 0) -> float:
    """Validation loss of the global model after ``steps`` steps of ``workers`` simulated ranks
    training a tiny GPT (width 64, 2 layers) on ``text``."""
    torch.manual_seed(seed)
    model = build_language_model("gpt", text.vocab_size, text.context, width=64, layers=2, heads=4)
    if optimizer == "adamw":
        def make(p: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(p, lr=lr, weight_decay=0.01)
    else:
        def make(p: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(p, lr=lr, momentum=0.9)
    sim = Simulator(model, make, workers, sync_every=sync_every, delay=delay, warmup_steps=warmup_steps,
                    glu_beta=glu_beta, compensation=compensation)
    batches = [ShardedBatches(text.train_x, text.train_y, 16, workers, w, seed, shards, groups=text.train_groups)
               for w in range(workers)]
    streams = [b.epoch(0) for b in batches]
    for _ in range(steps):
        sim.step([next(s) for s in streams], _token_loss)
    sim.finish()
    net = sim.global_model().eval()
    with torch.no_grad():
        return float(_token_loss(net(text.test_x[:512]), text.test_y[:512]))


def simulator_ablation(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The GLU ablation on this task with the simulator, against synchronous training (k = 1)."""
    text = load_stdlib_text(context=32, max_bytes=a.corpus_bytes)
    k, d = parse_window(a.ablation_config or SIMULATOR_DEFAULT_CONFIG, "--ablation-config")
    opt = a.optimizers[0]
    lr = a.lr[opt]
    variants = [("synchronous (k=1)", 1, 0, "glu", 1.0)] + [(n, k, d, c, b) for n, c, b in ABLATION]
    rows = []
    for shards in a.shards:
        for name, kk, dd, comp, beta in variants:
            losses = [simulate(text, a.sim_ranks, shards, opt, a.sim_steps, a.warmup_steps, kk, dd, comp, beta, lr,
                               seed) for seed in range(a.sim_seeds)]
            rows.append({"shards": shards, "variant": name, "val_loss": statistics.mean(losses),
                         "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0})
            print(f"   simulator {shards:<10} {name:<18} val loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------- report
def plot_curves(rows: list[dict[str, Any]], out: Path, prefix: str = "gpt") -> list[Path]:
    """Validation loss against steps and against wall time, ``out/PREFIX_OPTIMIZER_SHARDS.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for opt, shards in sorted({(r["optimizer"], r["shards"]) for r in rows}):
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        several = len({r["network"] for r in rows}) > 1
        for r in rows:
            if (r["optimizer"], r["shards"]) == (opt, shards):
                steps, walls, losses = zip(*r["curve"])
                label = f"{r['name']}, {r['network']}" if several else r["name"]
                by_step.plot(steps, losses, "o-", ms=3, label=label)
                by_time.plot(walls, losses, "o-", ms=3, label=label)
        by_step.set(xlabel="step", ylabel="validation loss (nats/byte)", title=f"{opt}, {shards} shards")
        by_time.set(xlabel="training wall time (s)", ylabel="validation loss (nats/byte)")
        paths.append(save_figure(fig, [by_step, by_time], out / f"{prefix}_{opt}_{shards}.png"))
    return paths


def budget(c: dict[str, Any]) -> str:
    """The runs' steps and schedule, as the section's heading says them."""
    factor = c.get("budget_factor", 1.0)
    others = budget_steps(c["max_steps"], factor, c["eval_every"])
    steps = f"{c['max_steps']} steps" if factor == 1 else f"Horovod {c['max_steps']} steps and the others {others}"
    schedule = c.get("lr_schedule", "constant")
    return steps + ("" if schedule == "constant" else f" with a {schedule} learning-rate schedule over each run")


def render(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"Command: `{results['command']}` (commit {results['commit']}, {results['date']}; {results['machine']}; "
             f"Python {results['python']}, torch {results['torch']}, Horovod {results['horovod']}).", "",
             f"{c['ranks']} ranks (horovodrun, Gloo); GPT "
             f"width {c['gpt_width']}, {c['gpt_layers']} layers, {c['gpt_heads']} heads, context {c['context']} bytes "
             f"({results['parameters']:,} parameters), batch {c['batch_size']} sequences per rank, {budget(c)}, "
             f"{c['warmup_steps']} warm-up steps, validation on {c['eval_samples']} held-out sequences; "
             f"took {results['seconds'] / 60:.1f} min.", ""]
    for network in results["networks"]:
        lines += [f"### {network}", "", markdown_table([r for r in results["rows"] if r["network"] == network],
                                                        TABLE), ""]
    if results["simulator"]:
        sim = results["simulator"]
        config = c["ablation_config"] or SIMULATOR_DEFAULT_CONFIG
        lines += [f"GLU ablation on the simulator ({c['sim_ranks']} ranks, tiny GPT width 64, 2 layers, context "
                  f"32, {c['optimizers'][0]}, {c['sim_steps']} steps, k:d = {config}, mean ± stdev over "
                  f"{c['sim_seeds']} seeds; validation loss):", "",
                  "| variant | " + " | ".join(f"{s} shards" for s in c["shards"]) + " |",
                  "|---|" + "---|" * len(c["shards"])]
        for variant in dict.fromkeys(r["variant"] for r in sim):
            cells = [next(f"{r['val_loss']:.4f} ± {r['stdev']:.4f}" for r in sim
                          if r["variant"] == variant and r["shards"] == s) for s in c["shards"]]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_lr(values: Sequence[str]) -> dict[str, float]:
    """Each optimizer's learning rate: the defaults, with the OPTIMIZER=VALUE overrides."""
    out = dict(DEFAULT_LR)
    for v in values:
        name, _, lr = v.partition("=")
        if name not in DEFAULT_LR or not lr:
            raise SystemExit(f"--lr takes OPTIMIZER=VALUE (adamw=0.001 sgd=0.1), got {v!r}")
        out[name] = float(lr)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} --workload gpt", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--workload", choices=("gpt",), default="gpt", help="this workload (images: the comparison)")
    g = ap.add_argument_group("ranks and network")
    g.add_argument("--ranks", type=int, default=2, help="ranks of every run (horovodrun -np, Gloo)")
    g.add_argument("--bandwidths", type=link_rate, nargs="+", default=["1gbit"], metavar="RATE",
                   help=f"the emulated link's rate, every run at each: {RATE_HELP}; {UNSHAPED}: the plain loopback")
    g.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    g.add_argument("--run-timeout", type=float, default=900, help="seconds one training run may take")
    g = ap.add_argument_group("runs (Horovod, SSD-SGD at each window, local SGD, for each optimizer and sharding)")
    g.add_argument("--optimizers", nargs="+", choices=tuple(DEFAULT_LR), default=["adamw"],
                   help="the optimizers every mode wraps, a comparison each")
    g.add_argument("--shards", nargs="+", choices=("shuffle", "by-package"), default=["shuffle", "by-package"],
                   help="how the corpus is split over the ranks, a comparison each (by-package: each rank its "
                        "own packages of the library)")
    g.add_argument("--ssd-configs", nargs="+", default=["5:5", "10:10"], metavar="K:D",
                   help="SSD-SGD's windows, k:d pairs; k:auto lets each run choose the smallest delay that hides "
                        "its allreduce (delay='auto')")
    add_local_sgd(g)
    g.add_argument("--glu-beta", type=float_or_auto, default=DEFAULT_GLU_BETA, metavar="BETA|auto", help=GLU_BETA_HELP)
    g.add_argument("--lr", nargs="*", default=[], metavar="OPTIMIZER=VALUE",
                   help="learning rates (not scaled by the ranks), overriding adamw=0.001 sgd=0.1")
    g = ap.add_argument_group("training (every run alike; python -m ssd_allreduce.train's flags)")
    g.add_argument("--max-steps", type=int, default=160, help="steps of every run (within the corpus's first epoch)")
    g.add_argument("--budget-factor", type=float, default=1.0,
                   help="SSD-SGD and local SGD train this many times --max-steps (Horovod --max-steps), each "
                        "under its own schedule: a comparison at a budget of time rather than of steps")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: down to 0 at each run's last step")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of synchronous SGD before SSD-SGD's delay stage, on real ranks and on the simulator "
                        "(default: an eighth of --max-steps, 20 of 160)")
    g.add_argument("--eval-every", type=int, default=20, help="steps between validations (a divisor of --max-steps)")
    g.add_argument("--eval-samples", type=int, default=512, help="held-out sequences of each validation")
    g.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    g.add_argument("--context", type=int, default=64, help="bytes per sequence")
    g.add_argument("--gpt-width", type=int, default=144, help=GPT_HELP["width"])
    g.add_argument("--gpt-layers", type=int, default=4, help=GPT_HELP["layers"])
    g.add_argument("--gpt-heads", type=int, default=4, help=GPT_HELP["heads"])
    g.add_argument("--corpus-bytes", type=int, default=2_000_000, help="size of the standard-library corpus")
    g = ap.add_argument_group("GLU ablation (real ranks, then the simulator)")
    g.add_argument("--ablation-config", default="10:10",
                   help="k:d of the GLU ablation (real ranks and simulator); none (or '') skips it on real ranks")
    g.add_argument("--ablation-shards", default="by-package", choices=("shuffle", "by-package"),
                   help="the sharding of the ablation on real ranks")
    g.add_argument("--sim-ranks", type=int, default=4, help="simulated ranks")
    g.add_argument("--sim-steps", type=int, default=150, help="steps of each simulated run")
    g.add_argument("--sim-seeds", type=int, default=2, help="simulated runs of each variant (mean and stdev)")
    g.add_argument("--no-simulator", action="store_true", help="leave out the simulator's ablation")
    g = ap.add_argument_group("report")
    g.add_argument("--tolerance", type=float, default=0.02,
                   help="how much higher than Horovod's a final validation loss may be (0.02: 2 %%)")
    g.add_argument("--out", default=None,
                   help="where results.json, results.md, the plots and every run's directory go "
                        "(default: results/gpt-DATE-TIME)")
    g.add_argument("--record", default=None, metavar="FILE",
                   help="also write the results without their curves to FILE (docs/results/gpt.json: the section "
                        f"of the documents that `{PROG} report` writes)")
    return ap


def check_args(a: argparse.Namespace) -> None:
    """Reject what cannot run, saying what to change; fills in the warm-up's default."""
    check_at_least(a, 1, "ranks", "threads", "local_sgd_every", "max_steps", "eval_every", "eval_samples",
                   "batch_size", "context", "gpt_width", "gpt_layers", "gpt_heads", "sim_ranks", "sim_steps",
                   "sim_seeds")
    if a.budget_factor < 1:
        raise SystemExit(f"--budget-factor must be >= 1 (Horovod trains --max-steps), got {a.budget_factor}")
    if a.max_steps % a.eval_every:
        raise SystemExit(f"--max-steps ({a.max_steps}) must be a multiple of --eval-every ({a.eval_every})")
    if a.gpt_width % a.gpt_heads:
        raise SystemExit(f"--gpt-width ({a.gpt_width}) must be a multiple of --gpt-heads ({a.gpt_heads})")
    if a.warmup_steps is None:
        a.warmup_steps = a.max_steps // 8
    if not 0 <= a.warmup_steps < a.max_steps:
        raise SystemExit(f"--warmup-steps must be >= 0 and below --max-steps ({a.max_steps}), got {a.warmup_steps}")
    for cfg in a.ssd_configs:
        parse_window(cfg)
    if a.ablation_config == "none":
        a.ablation_config = ""
    elif parse_window(a.ablation_config, "--ablation-config")[1] == "auto":
        raise SystemExit(f"--ablation-config {a.ablation_config}: the ablation's simulator needs a fixed delay, such as 5:5")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    a.lr = parse_lr(a.lr)
    check_args(a)
    a.out = a.out or f"results/gpt-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ok, why = emulation_available(1)
    if not ok and any(rate != UNSHAPED for rate in a.bandwidths):
        print(f"NOTE: no emulated network ({why}); running on the unshaped loopback", flush=True)
    rows, networks = [], []
    for rate in a.bandwidths if ok else [UNSHAPED]:
        shaped = ok and rate != UNSHAPED
        with emulate(rate if shaped else None, 1, a.ranks, shaped) as net:
            measured = net.measured_mbps
            network = f"tbf {rate}, measured {measured:.0f} Mbit/s" if measured else "unshaped loopback"
            net.label = network
            networks.append(network)
            print(f"== {network}", flush=True)
            for run in plan(a):
                t = time.time()
                rows.append(run_one(run, a, net, rate, out))
                print(f"   {run.optimizer:<5} {run.shards:<10} {run.name:<28} val loss {rows[-1]['val_loss']:.4f} "
                      f"({time.time() - t:.0f} s)", flush=True)
    add_ratios(rows, a.tolerance)
    sim = [] if a.no_simulator else simulator_ablation(a)
    results = {**provenance(f"{PROG} " + " ".join(sys.argv[1:])), "config": vars(a), "rows": rows,
               "simulator": sim, "networks": networks, "parameters": rows[0]["parameter_bytes"] // 4,
               "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if a.record:
        record = {**results, "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}
        Path(a.record).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(a.record), lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        print(f"wrote {a.record}")
    report = render(results)
    (out / "results.md").write_text(report)
    print(report)
    for folder, prefix in [(out, "gpt")] + ([(Path(a.record).parent, Path(a.record).stem)] if a.record else []):
        for p in plot_curves(rows, folder, prefix):   # the plots beside the record too, named by it
            print(f"wrote {p}")
    return results
