"""What real ranks must match: the simulator and the reference, step by step, with ``W``
bit-identical on every rank. Ranks save what they saw with ``workers/ssd_ranks.py``."""
from __future__ import annotations

import math
from pathlib import Path

import torch

import problem
from reference import ReferenceSSD
from ssd_allreduce.simulator import Simulator

STEPS = 12
N_PARAMS = len(list(problem.make_model().parameters()))


def load(out: Path, size: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


def parse(spec: str) -> tuple[int, int, float, int]:
    """``"k,d,beta,warmup[,wire]"``: the window's numbers (the wire format does not change them)."""
    k, d, beta, warmup = spec.split(",")[:4]
    return int(k), int(d), float(beta), int(warmup)


def simulator_for(spec: str, workers: int, big: int = 0) -> Simulator:
    k, d, beta, warmup = parse(spec)
    return Simulator(problem.make_model(big), problem.make_sgd, workers, sync_every=k, delay=d,
                     warmup_steps=warmup, glu_beta=beta)


def assert_matches_simulator(ranks: list[dict], spec: str, steps: int = STEPS, rtol: float = 1e-5,
                             atol: float = 1e-6, big: int = 0) -> None:
    """Every step, and the result of ``finish()`` after the last one, as the oracle computes them."""
    sim = simulator_for(spec, len(ranks), big)
    for step in range(steps):
        sim.step([problem.batch(r, step) for r in range(len(ranks))], problem.loss_fn)
        for r, rec in enumerate(ranks):
            torch.testing.assert_close(rec["configs"][spec]["after_step"][step],
                                       problem.model_tensors(sim.models[r]), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{spec} rank {r} step {step}: {m}")
    sim.finish()
    for r, rec in enumerate(ranks):
        torch.testing.assert_close(rec["configs"][spec]["final"], problem.model_tensors(sim.models[r]),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{spec} rank {r} after finish(): {m}")


def assert_matches_reference(ranks: list[dict], spec: str, steps: int = STEPS, optimizer: str = "sgd") -> None:
    """The same against SPEC's formulas written out anew (no code shared with the library)."""
    k, d, beta, warmup = parse(spec)
    # the library's default local_lr_scale: sqrt(ranks) for AdamW, 1 for SGD
    lr_scale = math.sqrt(len(ranks)) if optimizer == "adamw" else 1.0
    ref = ReferenceSSD(problem.make_model, problem.OPTIMIZERS[optimizer], len(ranks), k=k, d=d, T=warmup, beta=beta,
                       lr_scale=lr_scale)
    for step in range(steps):
        ref.step([problem.batch(r, step) for r in range(len(ranks))], problem.loss_fn)
        for r, rec in enumerate(ranks):
            torch.testing.assert_close(rec["configs"][spec]["after_step"][step], ref.tensors(r),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{spec} rank {r} step {step}: {m}")
    ref.finish()
    for r, rec in enumerate(ranks):
        torch.testing.assert_close(rec["configs"][spec]["final"], ref.tensors(r), rtol=1e-5, atol=1e-6)


def assert_global_weights_identical(ranks: list[dict], spec: str) -> None:
    histories = [rec["configs"][spec]["global_weights"] for rec in ranks]
    assert histories[0], f"{spec}: no window landed"
    for r, history in enumerate(histories[1:], start=1):
        assert len(history) == len(histories[0])
        for landing, (mine, ref) in enumerate(zip(history, histories[0])):
            assert all(torch.equal(a, b) for a, b in zip(mine, ref)), \
                f"{spec}: W differs between rank 0 and rank {r} after landing {landing}"
