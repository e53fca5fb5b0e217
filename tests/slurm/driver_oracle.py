"""What a run of the training driver must end with, from the hierarchical simulator: the same data
shards, the same initial weights (rank 0's, as the driver broadcasts them), the same optimizer, the
same SSD-SGD settings, with exact means in place of the allreduces. And what the run left: each
rank's last checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from ssd_allreduce.settings import SSDSettings
from ssd_allreduce.simulator import Simulator
from ssd_allreduce.train.driver import load_data, seed_everything
from ssd_allreduce.train.options import build_parser

RTOL, ATOL = 1e-5, 1e-6
"""The hierarchical tests' tolerance (tests/ranks/test_hierarchical.py)."""


@dataclass
class FinalState:
    """Every rank's model state and SSD-SGD's global weights ``W`` (None where a rank has none)."""

    models: list[dict[str, torch.Tensor]]
    global_weights: list[torch.Tensor | None]
    steps: int


def simulate_driver(train_args: Sequence[str], ranks: int, ranks_per_node: int) -> FinalState:
    """The end of ``python -m ssd_allreduce.train <train_args>`` on ``ranks`` ranks, nodes of
    ``ranks_per_node`` consecutive ranks; --mode ssd, an in-memory data set, one epoch or more
    (the driver lands the window in flight before each epoch's evaluation: ``finish()``)."""
    args = build_parser().parse_args([*train_args, "--out", "unused"])
    if args.mode != "ssd" or not isinstance(args.sync_every, int) or not isinstance(args.warmup_steps, int):
        raise ValueError("the oracle follows --mode ssd with numbers for --sync-every and --warmup-steps")
    torch.set_num_threads(1)
    seed_everything(args.seed)
    shards = []
    for rank in range(ranks):
        batches, _, builder, _ = load_data(args, SimpleNamespace(rank=rank, size=ranks))
        if rank == 0:
            model = builder()   # the driver broadcasts rank 0's initial weights
        shards.append(batches)
    lr = args.lr * ranks

    def make_sgd(params):
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    # the library's default delay: a number where the warm-up is too short to time, else "auto",
    # which the simulator cannot follow (it measures no time) and refuses
    delay = SSDSettings(sync_every=args.sync_every, delay=args.delay, warmup_steps=args.warmup_steps).delay
    sim = Simulator(model, make_sgd, ranks, sync_every=args.sync_every, delay=delay, warmup_steps=args.warmup_steps,
                    glu_beta=args.glu_beta, compensation=args.compensation, ranks_per_node=ranks_per_node)
    cross_entropy = nn.CrossEntropyLoss()

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(out.flatten(0, -2), y.flatten())

    steps = 0
    for epoch in range(args.epochs):
        for batches in zip(*(shard.epoch(epoch) for shard in shards)):
            sim.step(list(batches), loss_fn)
            steps += 1
        sim.finish()
    flat_w = None if sim.global_ is None else torch.cat([t.detach().flatten() for t in sim.global_.buffers])
    return FinalState([m.state_dict() for m in sim.models], [flat_w] * ranks, steps)


def load_final_checkpoints(run_dir: Path, ranks: int) -> FinalState:
    """Each rank's model and ``W`` from the newest checkpoint of a run directory."""
    root = Path(run_dir) / "checkpoints"
    newest = root / (root / "latest").read_text().strip()
    states = [torch.load(newest / f"rank-{r}.pt", weights_only=True, map_location="cpu") for r in range(ranks)]
    weights = []
    for state in states:
        w = state["optimizer"].get("ssd_sgd", {}).get("global_weights")
        weights.append(None if w is None else torch.cat([t.flatten() for t in w]))
    return FinalState([s["model"] for s in states], weights, states[0]["position"]["global_step"])


def summary(run_dir: Path) -> dict:
    """The driver's summary record of a run (its last one)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    found = [r for r in records if r["kind"] == "summary"]
    assert found, f"{run_dir}: no summary in metrics.jsonl (the run did not finish): {records[-3:]}"
    return found[-1]


def assert_matches(run: FinalState, oracle: FinalState) -> None:
    """Same step count, ``W`` bit-identical on every rank, and every rank's weights as the oracle's."""
    assert run.steps == oracle.steps, f"the run made {run.steps} steps, the oracle {oracle.steps}"
    assert all(w is not None for w in run.global_weights), "a rank has no global weights W"
    for rank, w in enumerate(run.global_weights[1:], start=1):
        assert torch.equal(w, run.global_weights[0]), f"W differs between rank 0 and rank {rank}"
    torch.testing.assert_close(run.global_weights[0], oracle.global_weights[0], rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"W against the simulator: {m}")
    for rank, (mine, expected) in enumerate(zip(run.models, oracle.models)):
        for name, value in expected.items():
            torch.testing.assert_close(mine[name], value, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank} {name} against the simulator: {m}")
