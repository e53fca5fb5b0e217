"""Alpha-beta cost model: Horovod (allreduce every step) versus SSD-SGD.

All functions are pure Python. Times are seconds, sizes are bytes, link
bandwidths are Gbit/s (10**9 bit/s), latencies are microseconds.

Model summary (N ranks, B bytes of parameters, per-rank compute C per step):

* ring allreduce: ``T_ar = 2(N-1) alpha + 2(N-1)/N * B / bw``.
* Horovod: the gradient allreduce starts during backward, so only
  ``max(0, T_ar - backward_fraction * C)`` is exposed per step.
* SSD-SGD (sync every k steps, delay d): one allreduce per window of k steps,
  hidden behind d steps of compute; exposed ``max(0, T_ar - d * C)`` plus a
  memory-bound launch/landing cost, amortised over k steps.
* no-comm: ``C`` per step, the upper limit for any scheme.
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..cli import HelpFormatter
from .flags import PROG, RATE_HELP, add_record, cluster_rate, gbps

DEFAULT_MEMORY_BW_GBYTES = 100.0
"""Device memory bandwidth (GB/s) used for SSD's launch/landing copies."""


@dataclass(frozen=True)
class Network:
    """Per-link alpha-beta network: bandwidth in Gbit/s, latency in microseconds; ``shared_by``
    ranks send through the same link at once (1: a link per rank, as on a cluster; N: one
    emulated link that every rank of a machine crosses, as the benchmark's shaped loopback)."""

    bandwidth_gbps: float
    latency_us: float = 5.0
    shared_by: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.shared_by, numbers.Integral) or self.shared_by < 1:
            raise ValueError(f"Network.shared_by must be an integer >= 1, got {self.shared_by!r}")
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"Network.bandwidth_gbps must be > 0, got {self.bandwidth_gbps!r}")
        if not self.latency_us >= 0:
            raise ValueError(f"Network.latency_us must be >= 0, got {self.latency_us!r}")


@dataclass(frozen=True)
class Workload:
    """One rank's training step.

    ``param_bytes``: size of the parameters (= gradients) that are allreduced.
    ``compute_seconds``: forward + backward + update time of one step on one rank.
    ``backward_fraction``: share of ``compute_seconds`` spent in backward, which
    Horovod overlaps its gradient allreduce with.
    """

    param_bytes: float
    compute_seconds: float
    backward_fraction: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        if not self.param_bytes >= 0:
            raise ValueError(f"Workload.param_bytes must be >= 0, got {self.param_bytes!r}")
        if not self.compute_seconds > 0:
            raise ValueError(f"Workload.compute_seconds must be > 0, got {self.compute_seconds!r}")
        if not 0.0 <= self.backward_fraction <= 1.0:
            raise ValueError(
                f"Workload.backward_fraction must be in [0, 1], got {self.backward_fraction!r}"
            )


@dataclass
class Prediction:
    """Predicted per-step time and throughput of one mode on one cluster."""

    mode: str
    ranks: int
    bandwidth_gbps: float
    step_seconds: float
    throughput: float
    """Samples per second over all ranks."""
    speedup_vs_baseline: float
    fraction_of_no_comm: float
    """Throughput divided by the no-communication throughput (1.0 = no comm cost)."""


def _check_ranks(ranks: int) -> None:
    if not isinstance(ranks, numbers.Integral) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")


def ring_allreduce_seconds(nbytes: float, ranks: int, net: Network) -> float:
    """Time of a ring allreduce of ``nbytes`` over ``ranks`` ranks (0 for one rank)."""
    _check_ranks(ranks)
    if not nbytes >= 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    if ranks == 1:
        return 0.0
    alpha = net.latency_us * 1e-6
    bytes_per_second = net.bandwidth_gbps * 1e9 / 8.0 / net.shared_by
    steps = 2 * (ranks - 1)
    return steps * alpha + steps / ranks * nbytes / bytes_per_second


def no_comm_step_seconds(w: Workload) -> float:
    """Step time without any communication: the compute time."""
    return w.compute_seconds


def baseline_step_seconds(w: Workload, ranks: int, net: Network) -> float:
    """Horovod step time: compute plus the part of the gradient allreduce not hidden.

    Assumes the allreduce can overlap the whole backward pass, i.e. the first
    gradient buckets are ready early in backward. Horovod cannot finish before
    the last bucket is produced, so this optimistic overlap makes the baseline
    fast and the predicted SSD speedup conservative.
    """
    t_ar = ring_allreduce_seconds(w.param_bytes, ranks, net)
    exposed = max(0.0, t_ar - w.backward_fraction * w.compute_seconds)
    return w.compute_seconds + exposed


def ssd_step_seconds(
    w: Workload,
    ranks: int,
    net: Network,
    sync_every: int,
    delay: int,
    memory_bw_gbytes: float = DEFAULT_MEMORY_BW_GBYTES,
) -> float:
    """SSD-SGD step time: one delta allreduce per ``sync_every`` steps, hidden
    behind ``delay`` local steps (``delay=0`` is blocking local SGD).

    Each window also pays a launch/landing cost of three passes over the
    parameters (snapshot the delta, then apply the averaged delta) at
    ``memory_bw_gbytes`` GB/s.
    """
    if not isinstance(sync_every, numbers.Integral) or sync_every < 1:
        raise ValueError(f"sync_every (k) must be an integer >= 1, got {sync_every!r}")
    if not isinstance(delay, numbers.Integral) or not 0 <= delay <= sync_every:
        raise ValueError(
            f"delay (d) must be an integer with 0 <= d <= sync_every={sync_every}, got {delay!r}; "
            "lower the delay or raise sync_every"
        )
    if not memory_bw_gbytes > 0:
        raise ValueError(f"memory_bw_gbytes must be > 0, got {memory_bw_gbytes!r}")
    t_ar = ring_allreduce_seconds(w.param_bytes, ranks, net)
    exposed = max(0.0, t_ar - delay * w.compute_seconds)
    launch_landing = w.param_bytes * 3.0 / (memory_bw_gbytes * 1e9)
    return w.compute_seconds + (exposed + launch_landing) / sync_every


def predict(
    w: Workload,
    ranks: int,
    net: Network,
    batch_per_rank: int,
    sync_every: int,
    delay: int,
) -> list[Prediction]:
    """Predictions for the modes ``baseline``, ``ssd`` and ``no-comm``, in that order."""
    if not isinstance(batch_per_rank, numbers.Integral) or batch_per_rank < 1:
        raise ValueError(f"batch_per_rank must be an integer >= 1, got {batch_per_rank!r}")
    steps = {
        "baseline": baseline_step_seconds(w, ranks, net),
        "ssd": ssd_step_seconds(w, ranks, net, sync_every, delay),
        "no-comm": no_comm_step_seconds(w),
    }
    samples = ranks * batch_per_rank
    return [
        Prediction(
            mode=mode,
            ranks=ranks,
            bandwidth_gbps=net.bandwidth_gbps,
            step_seconds=step,
            throughput=samples / step,
            speedup_vs_baseline=steps["baseline"] / step,
            fraction_of_no_comm=steps["no-comm"] / step,
        )
        for mode, step in steps.items()
    ]


# Reference workloads, fp32 parameters (4 bytes each).
# Parameter counts: torchvision model docs (resnet50: 25,557,032;
# vgg16: 138,357,544); ResNet-20 for CIFAR-10: 0.27M, He et al. 2016,
# "Deep Residual Learning for Image Recognition", Table 6.
# Compute per step (forward + backward + update), batch 32 on one V100-class
# GPU in fp32 -- assumptions, not measurements:
#   resnet50 ~0.10 s (NVIDIA DeepLearningExamples report ~350-400 img/s fp32);
#   vgg16    ~0.20 s (~15.5 GFLOP/img forward, x3 for training, ~7 TFLOP/s);
#   resnet20 ~0.01 s (~41 MFLOP/img forward; small-kernel/launch bound).
REFERENCE_MODELS: dict[str, Workload] = {
    "resnet50": Workload(param_bytes=25_557_032 * 4, compute_seconds=0.10),
    "resnet20": Workload(param_bytes=270_000 * 4, compute_seconds=0.01),
    "vgg16": Workload(param_bytes=138_357_544 * 4, compute_seconds=0.20),
}


def _workload(model: str | Workload) -> Workload:
    if isinstance(model, Workload):
        return model
    if model not in REFERENCE_MODELS:
        raise ValueError(
            f"unknown model {model!r}; use one of {sorted(REFERENCE_MODELS)} or pass a Workload"
        )
    return REFERENCE_MODELS[model]


def cluster_rows(
    model: str | Workload,
    ranks: Sequence[int],
    bandwidths_gbps: Sequence[float],
    sync_every: int,
    delay: int,
    batch_per_rank: int,
    latency_us: float = 5.0,
) -> list[dict[str, float]]:
    """Predicted throughput, one row per (ranks, bandwidth)."""
    w = _workload(model)
    rows = []
    for n in ranks:
        for bw in bandwidths_gbps:
            base, ssd, _ = predict(w, n, Network(bw, latency_us), batch_per_rank, sync_every, delay)
            rows.append({"ranks": n, "gbps": bw, "baseline_img_s": base.throughput, "ssd_img_s": ssd.throughput,
                         "ssd_speedup": ssd.speedup_vs_baseline, "baseline_of_no_comm": base.fraction_of_no_comm,
                         "ssd_of_no_comm": ssd.fraction_of_no_comm})
    return rows


def rows_table(rows: Sequence[dict[str, float]]) -> str:
    """Markdown: :func:`cluster_rows`' rows."""
    lines = ["| ranks | Gbit/s | baseline img/s | SSD img/s | SSD speedup | baseline % of no-comm | SSD % of no-comm |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['gbps']:g} | {r['baseline_img_s']:,.0f} | {r['ssd_img_s']:,.0f} "
              f"| {r['ssd_speedup']:.2f}x | {100 * r['baseline_of_no_comm']:.1f}% | {100 * r['ssd_of_no_comm']:.1f}% |"
              for r in rows]
    return "\n".join(lines)


def cluster_table(model: str | Workload, ranks: Sequence[int], bandwidths_gbps: Sequence[float], sync_every: int,
                  delay: int, batch_per_rank: int, latency_us: float = 5.0) -> str:
    """Markdown table of predicted throughput, one row per (ranks, bandwidth)."""
    return rows_table(cluster_rows(model, ranks, bandwidths_gbps, sync_every, delay, batch_per_rank, latency_us))


def render_record(record: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's cluster table, from the record ``--record`` wrote."""
    from .sections import stamp_line
    return f"{stamp_line(record)}\n\n{rows_table(record['rows'])}\n"


def prediction_error(predicted: float, measured: float) -> float:
    """Signed relative error ``(predicted - measured) / measured`` (> 0: overestimate)."""
    if not measured > 0:
        raise ValueError(f"measured must be > 0 to compute a relative error, got {measured!r}")
    return (predicted - measured) / measured


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} costmodel", formatter_class=HelpFormatter,
        description="Predict Horovod vs SSD-SGD throughput with an alpha-beta ring model: a row per "
                    "(ranks, bandwidth).\n\n    python -m ssd_allreduce.bench costmodel --model resnet50 "
                    "--ranks 8 64 256 1024 --bandwidths 10gbit 25gbit 100gbit")
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="resnet50",
                        help="reference workload (parameters and compute per step: see REFERENCE_MODELS)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024], metavar="N",
                        help="rank counts to predict, a row each")
    parser.add_argument("--bandwidths", type=cluster_rate, nargs="+", default=["10gbit", "25gbit", "100gbit"],
                        metavar="RATE", help=f"each rank's link, a row each: {RATE_HELP} (the table gives Gbit/s)")
    parser.add_argument("--latency-us", type=float, default=5.0, help="per-hop latency in microseconds")
    parser.add_argument("--sync-every", type=int, default=5, help="k: steps per allreduce")
    parser.add_argument("--delay", type=int, default=5, help="d: steps the allreduce overlaps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step on each rank")
    parser.add_argument("--param-bytes", type=float,
                        help="custom workload: bytes allreduced (overrides --model's)")
    parser.add_argument("--compute-seconds", type=float,
                        help="custom workload: compute per step (overrides --model's)")
    add_record(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print :func:`cluster_table` for a reference or custom workload."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    w = REFERENCE_MODELS[args.model]
    overrides = {
        field: value
        for field, value in (("param_bytes", args.param_bytes),
                             ("compute_seconds", args.compute_seconds))
        if value is not None
    }
    try:
        w = dataclasses.replace(w, **overrides)
        rows = cluster_rows(w, args.ranks, [gbps(r) for r in args.bandwidths], args.sync_every, args.delay,
                            args.batch_size, latency_us=args.latency_us)
    except ValueError as err:
        parser.error(str(err))
    print(rows_table(rows))
    if args.record:
        from .sections import write_rows_record
        write_rows_record(Path(args.record), f"{PROG} costmodel " + " ".join(argv), rows,
                          {"model": args.model, **dataclasses.asdict(w), "batch_size": args.batch_size,
                           "sync_every": args.sync_every, "delay": args.delay, "latency_us": args.latency_us})


if __name__ == "__main__":
    main()
