"""What the wrapper costs per step where there is no network to save: one process, world size 1,
the same model stepped by the plain optimizer, by ``hvd.DistributedOptimizer`` and by SSD-SGD in
its warm-up and in its delay stage, rounds interleaved, medians reported.

    python -m ssd_allreduce.bench overhead                  # a many-small-tensor and a few-large model
    python -m ssd_allreduce.bench overhead --device cuda
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..cli import HelpFormatter
from ..optimizer import DistributedOptimizer
from ..train.options import BATCH_SIZE_HELP
from ..train.runlog import markdown_table
from .flags import PROG, add_record, check_at_least

WRAPPERS = ("plain", "horovod", "ssd warm-up", "ssd delay stage")


def many_small() -> nn.Module:
    """162 small tensors: 40 blocks of Linear(64) + LayerNorm, like a narrow transformer's count."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)) for _ in range(40)],
                         nn.Linear(64, 2))


def few_large() -> nn.Module:
    """6 large tensors: three Linear(1024) layers."""
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {"many small tensors": many_small, "few large tensors": few_large}


def wrap(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if kind == "horovod":
        import horovod.torch as hvd
        return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    if kind.startswith("ssd"):
        return DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                    named_buffers=model.named_buffers(), sync_every=5, delay=5,
                                    warmup_steps=10**9 if kind == "ssd warm-up" else 0)
    return opt


def step_ms(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
            device: torch.device) -> float:
    """Mean milliseconds of a training step over ``steps`` steps."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync()
    return 1e3 * (time.perf_counter() - t0) / steps


def measure(make_model: Callable[[], nn.Module], device: torch.device, batch: int, steps: int,
            rounds: int) -> dict[str, float]:
    """Median step milliseconds of each wrapper, rounds interleaved so drifts hit all alike."""
    setups = {}
    for kind in WRAPPERS:
        torch.manual_seed(0)
        model = make_model().to(device)
        width = next(model.parameters()).shape[1]
        x, y = torch.randn(batch, width, device=device), torch.randint(0, 2, (batch,), device=device)
        opt = wrap(kind, model)
        step_ms(model, opt, x, y, 5, device)       # warm caches, allocate state
        setups[kind] = (model, opt, x, y)
    times: dict[str, list[float]] = {kind: [] for kind in WRAPPERS}
    for _ in range(rounds):
        for kind, (model, opt, x, y) in setups.items():
            times[kind].append(step_ms(model, opt, x, y, steps, device))
    return {kind: statistics.median(t) for kind, t in times.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} overhead", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models train")
    ap.add_argument("--batch-size", type=int, default=32, help=BATCH_SIZE_HELP)
    ap.add_argument("--steps-per-round", type=int, default=50, help="timed steps of each wrapper in a round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, the wrappers interleaved (medians reported)")
    add_record(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    started = time.time()
    check_at_least(a, 1, "batch_size", "steps_per_round", "rounds")
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    device = torch.device(a.device)
    rows = []
    for name, make_model in MODELS.items():
        ms = measure(make_model, device, a.batch_size, a.steps_per_round, a.rounds)
        tensors = len(list(make_model().parameters()))
        for kind in WRAPPERS:
            rows.append({"model": f"{name} ({tensors})", "optimizer": kind, "ms": ms[kind],
                         "over_plain": ms[kind] - ms["plain"], "x_horovod": ms[kind] / ms["horovod"]})
    config = {"device": a.device, "batch_size": a.batch_size, "steps_per_round": a.steps_per_round,
              "rounds": a.rounds,
              "processor": torch.cuda.get_device_name(device) if a.device == "cuda" else processor()}
    print(heading(config))
    print(rows_table(rows))
    if a.record:
        from .sections import write_rows_record
        write_rows_record(Path(a.record), f"{PROG} overhead " + " ".join(argv), rows, config, time.time() - started)


def processor() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def heading(config: dict[str, Any]) -> str:
    return (f"world size 1 on {config['device']} ({config['processor']}), batch {config['batch_size']}, median of "
            f"{config['rounds']} rounds of {config['steps_per_round']} steps")


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(rows, (("model (tensors)", "model", "{}"), ("optimizer", "optimizer", "{}"),
                                 ("ms/step", "ms", "{:.3f}"), ("over plain ms", "over_plain", "{:+.3f}"),
                                 ("x horovod", "x_horovod", "{:.3f}")))


def render_record(record: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's overhead table, from the record ``--record`` wrote."""
    from .sections import stamp_line
    return f"{stamp_line(record)} {heading(record['config'])}:\n\n{rows_table(record['rows'])}\n"
