"""The cost model on a cluster of nodes: a fast link inside each node, each node's own link to the
others. Per step of one rank (seconds), for M nodes of R ranks, B bytes of gradients or delta:

* Horovod: a ring over all M·R ranks, each node's link carrying one ring edge each way:
  ``T = 2(MR-1)·alpha + 2(MR-1)/(MR)·B/bw``, of which ``overlap·C`` hides behind backward;
* Horovod's hierarchical allreduce (its NCCL option): a reduce-scatter inside the node, the 1/R
  shards allreduced across nodes (R rings share the node's link), an allgather inside the node;
* SSD-SGD, flat: the ring above once per k steps, hidden behind d steps of compute;
* SSD-SGD, hierarchical: a gradient average inside the node every step (hidden behind backward as
  Horovod's is), and per window the shards across nodes plus their allgather inside the node.

``overlap`` (the share of the compute Horovod's allreduce hides behind) is calibrated from a
measured Horovod step with ``calibrate_overlap`` instead of assumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..cli import HelpFormatter
from .costmodel import DEFAULT_MEMORY_BW_GBYTES, Network, Workload, ring_allreduce_seconds
from .flags import PROG, RATE_HELP, add_record, check_at_least, cluster_rate, gbps

MODES = ("horovod", "horovod-hier", "ssd", "ssd-hier", "no-comm")


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``ranks_per_node`` ranks: ``inter`` is each node's link to the others,
    ``intra`` the link inside a node."""

    nodes: int
    ranks_per_node: int
    inter: Network
    intra: Network

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ValueError(f"a cluster needs nodes >= 1 and ranks_per_node >= 1, got {self.nodes} x "
                             f"{self.ranks_per_node}")

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


def _seconds(nbytes: float, net: Network) -> float:
    return nbytes / (net.bandwidth_gbps * 1e9 / 8.0 / net.shared_by)


def flat_allreduce_seconds(nbytes: float, c: Cluster) -> float:
    """A ring over every rank (placed node by node): every step waits for the slowest edge."""
    return ring_allreduce_seconds(nbytes, c.ranks, c.inter if c.nodes > 1 else c.intra)


def node_allreduce_seconds(nbytes: float, c: Cluster) -> float:
    """A ring inside one node."""
    return ring_allreduce_seconds(nbytes, c.ranks_per_node, c.intra)


def node_gather_seconds(nbytes: float, c: Cluster) -> float:
    """An allgather of ``nbytes`` in R shards inside one node."""
    r = c.ranks_per_node
    return 0.0 if r == 1 else (r - 1) * c.intra.latency_us * 1e-6 + (r - 1) / r * _seconds(nbytes, c.intra)


def cross_shards_seconds(nbytes: float, c: Cluster) -> float:
    """Each local rank's 1/R shard allreduced across the nodes, the R rings sharing a node's link."""
    shared = dataclasses.replace(c.inter, shared_by=c.inter.shared_by * c.ranks_per_node)
    return ring_allreduce_seconds(nbytes / c.ranks_per_node, c.nodes, shared)


def hierarchical_allreduce_seconds(nbytes: float, c: Cluster) -> float:
    """Horovod's hierarchical allreduce: reduce-scatter in the node, shards across, allgather."""
    return 2 * node_gather_seconds(nbytes, c) + cross_shards_seconds(nbytes, c)


def step_seconds(mode: str, w: Workload, c: Cluster, sync_every: int = 5, delay: int = 5,
                 overlap: Optional[float] = None, memory_bw_gbytes: float = DEFAULT_MEMORY_BW_GBYTES) -> float:
    """One rank's step in ``mode`` (see ``MODES``); ``overlap`` defaults to the workload's
    ``backward_fraction``."""
    hide = (w.backward_fraction if overlap is None else overlap) * w.compute_seconds
    landing = w.param_bytes * 3.0 / (memory_bw_gbytes * 1e9)
    if mode == "no-comm":
        return w.compute_seconds
    if mode == "horovod":
        return w.compute_seconds + max(0.0, flat_allreduce_seconds(w.param_bytes, c) - hide)
    if mode == "horovod-hier":
        return w.compute_seconds + max(0.0, hierarchical_allreduce_seconds(w.param_bytes, c) - hide)
    if mode == "ssd":
        window = flat_allreduce_seconds(w.param_bytes, c)
        return w.compute_seconds + (max(0.0, window - delay * w.compute_seconds) + landing) / sync_every
    if mode == "ssd-hier":
        if c.nodes == 1:   # synchronous SGD inside the one node
            return w.compute_seconds + max(0.0, node_allreduce_seconds(w.param_bytes, c) - hide)
        inside = max(0.0, node_allreduce_seconds(w.param_bytes, c) - hide)
        window = max(0.0, cross_shards_seconds(w.param_bytes, c) - delay * (w.compute_seconds + inside))
        per_window = window + node_gather_seconds(w.param_bytes, c) + landing
        return w.compute_seconds + inside + per_window / sync_every
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def calibrate_overlap(measured_step_seconds: float, w: Workload, c: Cluster) -> float:
    """The share of the compute that Horovod's allreduce hid in a measured step (0 to 1)."""
    exposed = measured_step_seconds - w.compute_seconds
    hidden = flat_allreduce_seconds(w.param_bytes, c) - exposed
    return min(1.0, max(0.0, hidden / w.compute_seconds))


# GPU reference workloads, fp32 parameters and gradients, batch 64 per GPU. ResNet-50: 25,557,032
# parameters; 31.8 ms per step measured on one H200 (Horovod's synthetic benchmark, BENCHMARKS.md).
# ViT-B/16: 86,567,656 parameters (torchvision); its step assumed 4.3x ResNet-50's (17.6 vs 4.1
# GFLOP per image forward): an assumption, not a measurement.
GPU_MODELS: dict[str, Workload] = {
    "resnet50": Workload(param_bytes=25_557_032 * 4, compute_seconds=0.0318),
    "vit-b16": Workload(param_bytes=86_567_656 * 4, compute_seconds=0.0318 * 4.3),
}
NVLINK_GBPS = 2400.0   # inside a node: NVLink, about 300 GB/s a GPU usable by a ring
HBM_GBYTES = 2000.0    # a GPU's memory bandwidth, for a window's launch and landing
DEFAULT_LATENCY_US = (5.0, 2.0)   # (between nodes, inside one)


MODEL_NAMES = {"resnet50": "ResNet-50", "vit-b16": "ViT-B/16"}


def cluster_rows(model: str, gpus: Sequence[int], per_node: int, inter_gbps: Sequence[float],
                 sync_every: int = 5, delay: int = 5, overlap: Optional[float] = None,
                 batch: int = 64) -> list[dict[str, Any]]:
    """Predicted images/s of each mode, a row per (GPUs, link between nodes)."""
    w = GPU_MODELS[model]
    rows = []
    for n in gpus:
        nodes = max(1, n // per_node)
        for bw in inter_gbps:
            c = Cluster(nodes, min(per_node, n), Network(bw, DEFAULT_LATENCY_US[0]),
                        Network(NVLINK_GBPS, DEFAULT_LATENCY_US[1]))
            rate = {m: c.ranks * batch / step_seconds(m, w, c, sync_every, delay, overlap, HBM_GBYTES) for m in MODES}
            rows.append({"model": model, "gpus": c.ranks, "nodes": nodes, "gbps": bw,
                         **{f"{m}_img_s": rate[m] for m in MODES}})
    return rows


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: :func:`cluster_rows`' rows, with hierarchical SSD-SGD's ratios."""
    lines = ["| GPUs | nodes | Gbit/s per node | Horovod img/s | Horovod hier img/s | SSD-SGD img/s | SSD-SGD hier "
             "img/s | hier x Horovod | hier % of no-comm |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['gpus']} | {r['nodes']} | {r['gbps']:g} | {r['horovod_img_s']:,.0f} | "
              f"{r['horovod-hier_img_s']:,.0f} | {r['ssd_img_s']:,.0f} | {r['ssd-hier_img_s']:,.0f} | "
              f"{r['ssd-hier_img_s'] / r['horovod_img_s']:.2f}x | {100 * r['ssd-hier_img_s'] / r['no-comm_img_s']:.1f}% |"
              for r in rows]
    return "\n".join(lines)


def model_heading(model: str, config: dict[str, Any]) -> str:
    return (f"{MODEL_NAMES.get(model, model)}, batch {config['batch_size']} per GPU, {config['ranks_per_node']} GPUs "
            f"per node, k = {config['sync_every']}, d = {config['delay']}:")


def render_record(record: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's predicted clusters, a table per model, from the record ``--record`` wrote."""
    from .sections import stamp_line
    out = [stamp_line(record)]
    for model in dict.fromkeys(r["model"] for r in record["rows"]):
        out += ["", model_heading(model, record["config"]), "",
                rows_table([r for r in record["rows"] if r["model"] == model])]
    return "\n".join(out) + "\n"


def row_mode(row: dict[str, Any]) -> str:
    """A benchmark row's mode in this model's terms ("ssd-hier" for "ssd k=5 d=5 hier", ...)."""
    base = {"local-sgd": "ssd"}.get(row["mode"], row["mode"])
    return f"{base}-hier" if row["name"].endswith(" hier") else base


def check_measured(sections: Sequence[tuple[float, list[dict[str, Any]]]], nodes: int, ranks_per_node: int,
                   intra_gbps: float = 10.0) -> list[dict[str, Any]]:
    """Predict every row of a ``--nodes`` comparison, (measured Mbit/s between nodes, rows) per
    bandwidth. Three numbers are calibrated on the slowest link's rows, where the network sets the
    pace: the latency between nodes (flat local SGD's blocking wait), Horovod's overlap (its step)
    and the latency inside a node (hierarchical local SGD's wait). Each row's own measured compute time is its compute:
    ranks oversubscribing the cores make it vary from run to run, and the model prices the rest."""
    def cluster(mbps: float, inter_us: float, intra_us: float) -> Cluster:
        return Cluster(nodes, ranks_per_node, Network(mbps / 1e3, inter_us), Network(intra_gbps, intra_us))

    def window(row: dict[str, Any]) -> tuple[int, int]:
        return int(row["sync_every_used"] or 1), int(row["delay_used"] or 0)

    def workload(row: dict[str, Any]) -> Workload:
        return Workload(param_bytes=row["parameter_mb"] * 2**20, compute_seconds=row["compute_ms"] / 1e3)

    def solve(f: Any, target: float) -> float:   # f increasing in the latency (us)
        lo, hi = 0.0, 1e5
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return lo

    mbps, rows = min(sections, key=lambda section: section[0])
    def blocking(hierarchical: bool) -> Optional[dict[str, Any]]:   # local SGD: its whole window is exposed
        return next((r for r in rows if r["mode"] == "local-sgd" and r["name"].endswith(" hier") == hierarchical),
                    None)
    flat, hier, hvd = blocking(False), blocking(True), next(r for r in rows if r["mode"] == "horovod")
    inter_us = solve(lambda us: step_seconds("ssd", workload(flat), cluster(mbps, us, 0.0), *window(flat)),
                     flat["step_ms"] / 1e3) if flat else DEFAULT_LATENCY_US[0]
    overlap = calibrate_overlap(hvd["step_ms"] / 1e3, workload(hvd), cluster(mbps, inter_us, 0.0))
    intra_us = solve(lambda us: step_seconds("ssd-hier", workload(hier), cluster(mbps, inter_us, us), *window(hier),
                                             overlap=overlap), hier["step_ms"] / 1e3) if hier else DEFAULT_LATENCY_US[1]
    out = []
    for mbps, rows in sections:
        for r in rows:
            predicted = step_seconds(row_mode(r), workload(r), cluster(mbps, inter_us, intra_us), *window(r),
                                     overlap=overlap)
            out.append({"mbps": mbps, "name": r["name"], "predicted_ms": 1e3 * predicted, "measured_ms": r["step_ms"],
                        "error": (1e3 * predicted - r["step_ms"]) / r["step_ms"], "inter_latency_us": inter_us,
                        "intra_latency_us": intra_us, "overlap": overlap})
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} nodecost", formatter_class=HelpFormatter,
                                 description="Predicted throughput on clusters of GPU nodes: a row per (ranks, "
                                             "bandwidth between nodes), a table per model.")
    ap.add_argument("--model", nargs="+", choices=sorted(GPU_MODELS), default=sorted(GPU_MODELS),
                    help="reference GPU workloads (see GPU_MODELS), a table each")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024], metavar="N",
                    help="rank (GPU) counts to predict, a row each")
    ap.add_argument("--ranks-per-node", type=int, default=8, help="ranks (GPUs) on each node, joined by NVLink")
    ap.add_argument("--bandwidths", type=cluster_rate, nargs="+", default=["25gbit", "100gbit", "400gbit"],
                    metavar="RATE",
                    help=f"each node's link to the others, a row each: {RATE_HELP} (the table gives Gbit/s)")
    ap.add_argument("--sync-every", type=int, default=5, help="k: steps per window")
    ap.add_argument("--delay", type=int, default=5, help="d: steps a window's allreduce overlaps")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per step on each rank")
    ap.add_argument("--overlap", type=float, default=None,
                    help="share of the compute Horovod's allreduce hides behind (default: 2/3, the backward)")
    add_record(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    check_at_least(a, 1, "ranks", "ranks_per_node", "sync_every", "batch_size")
    check_at_least(a, 0, "delay")
    if a.delay > a.sync_every:
        raise SystemExit(f"--delay ({a.delay}) must be at most --sync-every ({a.sync_every})")
    config = {"batch_size": a.batch_size, "ranks_per_node": a.ranks_per_node, "sync_every": a.sync_every,
              "delay": a.delay, "overlap": a.overlap}
    rows = []
    for model in a.model:
        model_rows = cluster_rows(model, a.ranks, a.ranks_per_node, [gbps(r) for r in a.bandwidths], a.sync_every,
                                  a.delay, a.overlap, a.batch_size)
        print(f"\n{model_heading(model, config)}\n\n{rows_table(model_rows)}")
        rows += model_rows
    if a.record:
        from .sections import write_rows_record
        write_rows_record(Path(a.record), f"{PROG} nodecost " + " ".join(argv), rows, config)
