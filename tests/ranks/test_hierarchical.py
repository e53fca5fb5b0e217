"""Hierarchical SSD-SGD on real ranks: 4 ranks as 2 emulated nodes (``$SSD_NODE``) on each
backend, whose node and cross-node groups are each built its own way (Horovod: process groups of
their own; torch.distributed: subgroups; MPI: split communicators), against the simulator.

One node, one rank per node, int8 windows, resumes and uneven nodes are ``unit/test_delay.py``'s."""
from __future__ import annotations


import pytest
import torch

from launchers import WORKERS, horovodrun, mpirun, run_ranks, torchrun
from oracle import N_PARAMS, STEPS, assert_global_weights_identical, load
from ssd_allreduce.simulator import Simulator

import problem

WORKER = str(WORKERS / "ssd_ranks.py")
SPECS = "3,2,0.5,2;2,0,1.0,1"
LAUNCHERS = {"horovod": horovodrun, "torch": torchrun, "mpi": mpirun}


def run_nodes(tmp_path, backend: str, ranks_per_node: int, local_sync: str, *extra: str,
              specs: str = SPECS, ranks: int = 4) -> list[dict]:
    run_ranks(LAUNCHERS[backend](ranks, WORKER, "--backend", backend, "--out", str(tmp_path),
                                 "--configs", specs, "--ranks-per-node", str(ranks_per_node),
                                 "--local-sync", local_sync, *extra), timeout=270)
    return load(tmp_path, ranks)


def assert_matches_hierarchical_simulator(ranks: list[dict], spec: str, ranks_per_node) -> None:
    k, d, beta, warmup = spec.split(",")
    sim = Simulator(problem.make_model(), problem.make_sgd, len(ranks), sync_every=int(k), delay=int(d),
                    warmup_steps=int(warmup), glu_beta=float(beta), ranks_per_node=ranks_per_node)
    for step in range(STEPS):
        sim.step([problem.batch(r, step) for r in range(len(ranks))], problem.loss_fn)
        for r, rec in enumerate(ranks):
            torch.testing.assert_close(rec["configs"][spec]["after_step"][step], problem.model_tensors(sim.models[r]),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{spec} rank {r} step {step}: {m}")
    sim.finish()
    for r, rec in enumerate(ranks):
        torch.testing.assert_close(rec["configs"][spec]["final"], problem.model_tensors(sim.models[r]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{spec} rank {r} after finish(): {m}")


@pytest.mark.parametrize("backend", ["horovod", "torch", "mpi"])
def test_two_nodes_of_two_ranks_match_the_oracle(tmp_path, backend):
    """Chosen automatically (several nodes, several ranks on each); inside a node the parameters
    stay bit-identical, W is bit-identical everywhere, and every step matches the simulator."""
    ranks = run_nodes(tmp_path, backend, 2, "auto")
    for spec in SPECS.split(";"):
        assert all(r["configs"][spec]["local_sync"] for r in ranks)
        assert_matches_hierarchical_simulator(ranks, spec, ranks_per_node=2)
        assert_global_weights_identical(ranks, spec)
        for a, b in ((0, 1), (2, 3)):
            for step in range(STEPS):
                assert all(torch.equal(x, y) for x, y in zip(ranks[a]["configs"][spec]["after_step"][step][:N_PARAMS],
                                                             ranks[b]["configs"][spec]["after_step"][step][:N_PARAMS]))
        stats = ranks[0]["configs"][spec]["stats"]
        warmup = int(spec.split(",")[3])
        assert stats["node_allreduces"] == STEPS - warmup and stats["warmup_allreduces"] == warmup
        assert stats["windows_landed"] >= 2
