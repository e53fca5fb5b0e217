"""Hierarchical SSD-SGD on real ranks: 4 ranks as emulated nodes (``$SSD_NODE``), each backend,
against the single-process simulator; one node is synchronous SGD, one rank per node is flat."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import WORKERS, horovodrun, launcher_env, mpirun, run_ranks, torchrun
from test_multirank import N_PARAMS, STEPS, assert_global_weights_identical, load
from ssd_allreduce.simulator import Simulator

sys.path.insert(0, str(WORKERS))
import problem  # noqa: E402

pytestmark = pytest.mark.multirank
WORKER = str(WORKERS / "ssd_ranks.py")
SPECS = "3,2,0.5,2;2,0,1.0,1"
LAUNCHERS = {"horovod": horovodrun, "torch": torchrun, "mpi": mpirun}


def run_nodes(tmp_path, backend: str, ranks_per_node: int, local_sync: str, *extra: str,
              specs: str = SPECS, ranks: int = 4) -> list[dict]:
    run_ranks(LAUNCHERS[backend](ranks, WORKER, "--backend", backend, "--out", str(tmp_path),
                                 "--configs", specs, "--ranks-per-node", str(ranks_per_node),
                                 "--local-sync", local_sync, *extra), timeout=300)
    return load(tmp_path, ranks)


def assert_matches_hierarchical_simulator(ranks: list[dict], spec: str, ranks_per_node) -> None:
    torch.set_num_threads(1)
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


def test_one_node_is_synchronous_sgd(tmp_path):
    """local_sync=True on one node of 4 ranks: every step averages gradients, as
    hvd.DistributedOptimizer does (its run is recorded by the same ranks)."""
    spec = "3,2,0.5,2"
    ranks = run_nodes(tmp_path, "horovod", 4, "on", "--horovod-baseline", specs=spec)
    for rank in ranks:
        rec = rank["configs"][spec]
        assert rec["local_sync"] and rec["stats"]["windows_launched"] == 0
        for step in range(STEPS):
            torch.testing.assert_close(rec["after_step"][step][:N_PARAMS], rank["horovod_baseline"][step][:N_PARAMS],
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")


def test_one_rank_per_node_is_flat_ssd_sgd(tmp_path):
    spec = "3,2,0.5,2"
    ranks = run_nodes(tmp_path, "horovod", 1, "on", specs=spec)
    assert all(r["configs"][spec]["local_sync"] for r in ranks)
    assert_matches_hierarchical_simulator(ranks, spec, ranks_per_node=None)   # the flat oracle
    assert_global_weights_identical(ranks, spec)


def test_automatic_choice_stays_flat_on_one_node(tmp_path):
    spec = "3,2,0.5,2"
    ranks = run_nodes(tmp_path, "torch", 4, "auto", specs=spec)
    assert not any(r["configs"][spec]["local_sync"] for r in ranks)
    assert_matches_hierarchical_simulator(ranks, spec, ranks_per_node=None)


def test_uneven_nodes_are_refused_on_every_rank(tmp_path):
    """3 ranks as nodes of 2 and 1: every rank stops with the same message, none hangs."""
    proc = subprocess.run(torchrun(3, WORKER, "--backend", "torch", "--out", str(tmp_path), "--configs", "3,2,0.5,2",
                                   "--ranks-per-node", "2", "--local-sync", "on"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
                          env=launcher_env())
    assert proc.returncode != 0, proc.stdout
    message = "local_sync=True needs the same number of ranks on every node, this job has 2 node(s) x 2/1 rank(s)"
    assert proc.stdout.count(message) >= 3, proc.stdout


def test_int8_windows_between_nodes_keep_w_identical(tmp_path):
    spec = "3,2,0.5,2"
    ranks = run_nodes(tmp_path, "horovod", 2, "on", "--compression", "int8", specs=spec)
    assert_global_weights_identical(ranks, spec)
    sim = Simulator(problem.make_model(), problem.make_sgd, 4, sync_every=3, delay=2, warmup_steps=2,
                    glu_beta=0.5, ranks_per_node=2)
    for step in range(STEPS):
        sim.step([problem.batch(r, step) for r in range(4)], problem.loss_fn)
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(rank["configs"][spec]["after_step"][STEPS - 1], problem.model_tensors(sim.models[r]),
                                   rtol=0, atol=2e-2)


def test_training_driver_on_emulated_nodes(tmp_path):
    """``python -m ssd_allreduce.train`` under horovodrun, each rank told its node by $SSD_NODE:
    the automatic choice turns hierarchical SSD-SGD on, and the run learns."""
    out = tmp_path / "run"
    train = (f"SSD_NODE=node$((HOROVOD_RANK / 2)) exec {sys.executable} -m ssd_allreduce.train --no-progress "
             f"--mode ssd --epochs 3 --warmup-steps 10 --out {out}")
    log = run_ranks(horovodrun(4)[:-1] + ["bash", "-c", train], timeout=300)
    assert log.count("hierarchical SSD-SGD on 2 node(s) x 2 rank(s)") == 1   # said once, by rank 0
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["local_sync_nodes"] == "2 node(s) x 2 rank(s)", summary
    assert summary["test_accuracy"] >= 0.9 and summary["ssd_stats"]["node_allreduces"] > 0



def test_resume_with_a_hierarchical_window_in_flight_continues_exactly(tmp_path):
    """Saved at step 7 with a window in flight (each rank holding its own averaged shard), resumed
    by every rank from its own file: the landing gathers the shards and the run ends bit for bit."""
    spec = "3,2,0.5,2"   # windows launch at steps 4, 7, 10, 13 and land 2 steps later
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    run_nodes(full, "torch", 2, "on", "--steps", "14", "--save-at", "7", specs=spec)
    run_nodes(resumed, "torch", 2, "on", "--steps", "14", "--resume-from", str(full), specs=spec)
    window = torch.load(full / "ckpt_rank1.pt", weights_only=False)["optimizer"]["ssd_sgd"]["window"]
    assert window["launched_at"] == 7 and window["shard"] == [1, 2]
    for a, b in zip(load(full, 4), load(resumed, 4)):
        assert all(torch.equal(x, y) for x, y in zip(a["configs"][spec]["final"], b["configs"][spec]["final"]))
