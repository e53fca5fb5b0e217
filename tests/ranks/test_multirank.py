"""Real ranks (horovodrun/Gloo, torchrun/Gloo, mpirun): one launch per backend against the
simulator and the reference, with every wire format the backend reduces its own way; and what
needs processes: Horovod's protocol and process sets, shutdown, a shaped network, memory.

The delay stage's math at 2 and 4 ranks for every configuration is ``unit/test_delay.py``'s
(threads whose collectives really average)."""
from __future__ import annotations

import re

import pytest
import torch

from launchers import WORKERS, horovodrun, mpirun, run_ranks, torchrun
from oracle import (N_PARAMS, STEPS, assert_global_weights_identical, assert_matches_reference,
                    assert_matches_simulator, load, parse)
from ssd_allreduce.bench.netns import ShapedNetwork, namespaces_available

import problem

WORKER = str(WORKERS / "ssd_ranks.py")


HOROVOD_CONFIGS = ["2,1,0.5,3", "3,3,1.0,2", "4,0,0.25,1", "1,0,0.5,0"]
# wire formats whose reduction each backend does its own way (Horovod and MPI gather 16-bit floats
# they cannot sum, every backend gathers int8): W must stay bit-identical and follow the oracle
WIRES = ["2,2,0.5,2,fp16", "2,2,0.5,2,bf16", "2,2,0.5,2,int8"]
LOSSLESS = {"torch": ["2,1,0.5,3", "3,3,0.25,0"], "mpi": ["3,2,0.5,2"]}
BIG = 1_000_000   # idle parameters: a copy of the model (4 MB) would show in what a step allocates


@pytest.fixture(scope="module")
def horovod_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("horovod")
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(out), "--steps", str(STEPS),
                         "--configs", ";".join(HOROVOD_CONFIGS + WIRES), "--horovod-baseline"))
    return load(out, 2)


@pytest.mark.parametrize("spec", HOROVOD_CONFIGS)
def test_horovod_matches_simulator_and_reference(horovod_ranks, spec):
    assert_matches_simulator(horovod_ranks, spec)
    assert_matches_reference(horovod_ranks, spec)
    assert_global_weights_identical(horovod_ranks, spec)


def assert_lossy_wire_follows_the_oracle(ranks: list[dict], spec: str, big: int = 0) -> None:
    """Within the rounding the residual carries over (measured: under 1e-2), never float32's
    result exactly, W bit-identical."""
    assert_matches_simulator(ranks, spec, rtol=0, atol=2e-2, big=big)
    assert_global_weights_identical(ranks, spec)
    with pytest.raises(AssertionError):
        assert_matches_simulator(ranks, spec, rtol=1e-5, atol=1e-6, big=big)


@pytest.mark.parametrize("spec", WIRES)
def test_horovod_reduces_every_wire_format_identically_on_every_rank(horovod_ranks, spec):
    assert_lossy_wire_follows_the_oracle(horovod_ranks, spec)
    stats = horovod_ranks[0]["configs"][spec]["stats"]
    if spec.endswith("fp16"):   # half the bytes: gradients and deltas go as float16
        model = problem.make_model()
        grad_bytes = sum(p.numel() * 2 for p in model.parameters())
        state_bytes = sum(t.numel() * 2 for t in problem.model_tensors(model))
        assert stats["bytes_allreduced"] == 2 * grad_bytes + stats["windows_launched"] * state_bytes


@pytest.fixture(scope="module", params=["torch", "mpi"])
def flattening_backend(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """torch.distributed and MPI pack what they reduce into flat buffers: one launch each, with a
    large idle parameter so that a copy of the model would show in what a step allocates."""
    backend = request.param
    out = tmp_path_factory.mktemp(backend)
    launch = {"torch": torchrun, "mpi": mpirun}[backend]
    profile = ["--profile-memory"] if backend == "mpi" else []
    run_ranks(launch(2, WORKER, "--backend", backend, "--out", str(out), "--big", str(BIG), *profile,
                     "--configs", ";".join(LOSSLESS[backend] + WIRES[1:])))
    return backend, load(out, 2)


def test_torch_distributed_and_mpi_match_the_oracle_with_every_wire_format(flattening_backend):
    backend, ranks = flattening_backend
    for spec in LOSSLESS[backend]:
        assert_matches_simulator(ranks, spec, big=BIG)
        assert_global_weights_identical(ranks, spec)
    for spec in WIRES[1:]:
        assert_lossy_wire_follows_the_oracle(ranks, spec, big=BIG)


def test_the_delta_is_reduced_in_its_own_buffer_without_a_copy_of_the_model(flattening_backend):
    """The collective is given the delta's own storage (the missing-gradient flag goes alone). On
    MPI, counted by torch's profiler: a step that launches or lands a window allocates no more than
    a plain step (what the wrapped SGD allocates itself) plus far less than a copy of the model
    (4 MB here). The profiler is not run beside Gloo's threads, with which it can crash."""
    backend, ranks = flattening_backend
    model_bytes = sum(t.numel() * 4 for t in problem.model_tensors(problem.make_model(BIG)))
    for rec in ranks:
        window = rec["configs"][LOSSLESS[backend][-1]]
        assert window["collective_on_delta"], backend
        if backend == "mpi":
            extra = max(window["window_step_allocated"]) - max(window["plain_step_allocated"])
            assert extra < 0.05 * model_bytes, (window["window_step_allocated"], window["plain_step_allocated"])


def test_sync_every_1_equals_horovod_distributed_optimizer(horovod_ranks):
    for rec in horovod_ranks:
        for step in range(STEPS):
            torch.testing.assert_close(rec["configs"]["1,0,0.5,0"]["after_step"][step][:N_PARAMS],
                                       rec["horovod_baseline"][step][:N_PARAMS], rtol=1e-5, atol=1e-6)


def test_warmup_steps_equal_synchronous_sgd(horovod_ranks):
    warmup = parse("2,1,0.5,3")[3]
    for rec in horovod_ranks:
        for step in range(warmup):
            ssd = rec["configs"]["2,1,0.5,3"]["after_step"][step][:N_PARAMS]
            assert all(torch.equal(a, b) for a, b in zip(ssd, rec["horovod_baseline"][step][:N_PARAMS]))
        after = rec["configs"]["2,1,0.5,3"]["after_step"][warmup + 1][:N_PARAMS]
        assert not all(torch.equal(a, b) for a, b in zip(after, rec["horovod_baseline"][warmup + 1]))


def test_bytes_per_step_are_one_kth_of_the_baseline(horovod_ranks):
    model = problem.make_model()
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    state_bytes = sum(t.numel() * 4 for t in problem.model_tensors(model))
    for spec in HOROVOD_CONFIGS:
        k, _, _, warmup = parse(spec)
        stats = horovod_ranks[0]["configs"][spec]["stats"]
        windows = (STEPS - warmup) // k
        assert stats["warmup_allreduces"] == warmup and stats["windows_launched"] == windows
        assert stats["bytes_allreduced"] == warmup * grad_bytes + windows * state_bytes
        # one window of k steps sends params + BatchNorm statistics once; the baseline sends the
        # gradients every step
        per_step = (stats["bytes_allreduced"] - warmup * grad_bytes) / (windows * k)
        assert per_step / grad_bytes == pytest.approx((state_bytes / grad_bytes) / k)
        assert per_step / grad_bytes <= (1 / k) * 1.01


def test_horovod_on_an_mpi4py_sub_communicator(tmp_path):
    spec = "2,2,0.5,1"
    out = run_ranks(mpirun(3, WORKER, "--backend", "horovod", "--subset", "2", "--out", str(tmp_path),
                           "--configs", spec))
    assert "not a member of the sub-communicator; idle" in out
    ranks = load(tmp_path, 2)
    assert all(rec["size"] == 2 for rec in ranks) and not (tmp_path / "rank2.pt").exists()
    assert_matches_simulator(ranks, spec)


def test_allreduce_is_in_flight_during_local_steps(tmp_path):
    spec = "4,4,0.5,0"
    cmd = horovodrun(2, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", spec,
                     "--big", "4000000", "--steps", "12")
    ok, why = namespaces_available()
    if ok:  # a 16 MB delta over a 1 Gbit/s link takes far longer than a local step
        with ShapedNetwork("1gbit") as net:
            run_ranks(net.prefix() + cmd)
    else:
        print(f"unshaped loopback ({why})")
        run_ranks(cmd)
    for rec in load(tmp_path, 2):
        stats = rec["configs"][spec]["stats"]
        assert stats["windows_landed"] == 3
        assert stats["polls_pending"] >= 1, stats


def test_a_window_in_flight_is_landed_at_interpreter_exit():
    out = run_ranks(horovodrun(2, str(WORKERS / "exit_in_flight.py")))
    for rank in (0, 1):
        assert f"rank {rank} leaving with a window in flight: True" in out
        assert f"rank {rank} at exit: landed 1, in flight False" in out
    assert "shut down" not in out


def test_two_optimizers_in_one_process_with_windows_in_flight_together():
    out = run_ranks(horovodrun(2, str(WORKERS / "two_optimizers.py")), timeout=120)
    for name in ("D", "G"):
        lines = [re.search(rf"rank {r} {name}: landed (\d+), W checksum (\S+)", out) for r in (0, 1)]
        assert all(lines), out
        assert lines[0][1] == lines[1][1] == "4"     # 8 delay-stage steps, k = 2
        assert lines[0][2] == lines[1][2]            # W the same on both ranks


def test_horovods_resume_pattern_loads_on_rank_0_and_broadcasts(tmp_path):
    """Rank 0 alone loads a checkpoint saved with a window in flight, then Horovod's broadcasts:
    every rank continues from rank 0's SSD-SGD state, exactly as if each had loaded the file."""
    size = 2
    out = run_ranks(horovodrun(size, str(WORKERS / "horovod_resume.py"), "--out", str(tmp_path)), timeout=180)
    for way in ("broadcast", "everyone"):
        assert all(f"rank {r} resumed by {way}: 14 steps" in out for r in range(size)), out
    for r in range(size):
        broadcast = torch.load(tmp_path / f"broadcast_rank{r}.pt", weights_only=False)
        everyone = torch.load(tmp_path / f"everyone_rank{r}.pt", weights_only=False)
        assert all(torch.equal(a, b) for a, b in zip(broadcast["final"], everyone["final"])), f"rank {r}"
        assert all(torch.equal(a, b) for a, b in zip(broadcast["W"], everyone["W"])), f"rank {r}"


def test_a_process_set_without_rank_0(tmp_path):
    """4 ranks, the optimizer on the process set [2, 3]: its members follow the 2-worker oracle
    (the end-of-warm-up broadcast roots at the set's first rank), ranks 0 and 1 step alone."""
    spec = "2,1,0.5,2"
    run_ranks(horovodrun(4, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", spec,
                         "--process-set", "2,3"), timeout=180)
    ranks = load(tmp_path, 4)
    members, outsiders = ranks[2:], ranks[:2]
    assert all(rec["size"] == 2 for rec in members)
    assert_matches_simulator(members, spec)
    assert_global_weights_identical(members, spec)
    for global_rank, rec in enumerate(outsiders):
        model = problem.make_model()
        opt = problem.make_sgd(model.parameters())
        for step in range(STEPS):
            x, y = problem.batch(global_rank, step)
            opt.zero_grad()
            problem.loss_fn(model(x), y).backward()
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(rec["configs"][spec]["after_step"][step],
                                                         problem.model_tensors(model))), (global_rank, step)
        assert rec["configs"][spec]["stats"]["windows_launched"] == 0


def test_sparse_embedding_gradients_are_averaged_like_dense_ones():
    out = run_ranks(horovodrun(2, str(WORKERS / "sparse_ranks.py")), timeout=120)
    for r in (0, 1):
        assert re.search(rf"rank {r}: max \|sparse - dense\| [0-9.e-]+, warm-up allreduces 3", out), out


def test_a_horovod_example_script_learns_with_the_optimizer_line_switched():
    """The same script (fp16 gradients, accumulation, an LR scheduler), Horovod's optimizer and
    then SSD-SGD's: both learn the digits alike."""
    flags = ["--fp16-allreduce", "--batches-per-allreduce", "2", "--gradient-predivide-factor", "2", "--scheduler"]
    accuracy = {}
    for optimizer in ("horovod", "ssd"):
        out = run_ranks(horovodrun(2, str(WORKERS / "horovod_mnist_style.py"), "--optimizer", optimizer, *flags),
                        timeout=180)
        accuracy[optimizer] = float(re.findall(r"epoch 2: test accuracy ([0-9.]+)", out)[-1])
    assert accuracy["horovod"] > 0.85 and accuracy["ssd"] > 0.85, accuracy
    assert abs(accuracy["ssd"] - accuracy["horovod"]) < 0.05, accuracy


def test_with_adamw_the_warmup_is_synchronous_adamw_and_the_windows_average_local_adamw_steps(tmp_path):
    """Averaging gradients then stepping AdamW (the warm-up) is Horovod's AdamW exactly. Averaging
    weights after local AdamW steps (k = 1, d = 0) is not, as Adam is not linear in the gradient:
    what holds is SPEC's formula with the moments kept on each rank, which the reference computes."""
    specs = ["1,0,0.5,3", "3,2,0.5,2"]
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", ";".join(specs),
                         "--optimizer", "adamw", "--horovod-baseline"))
    ranks = load(tmp_path, 2)
    for spec in specs:
        assert_matches_reference(ranks, spec, optimizer="adamw")
    for rec in ranks:
        ssd, hvd_steps = rec["configs"][specs[0]]["after_step"], rec["horovod_baseline"]
        for step in range(3):
            assert all(torch.equal(a, b) for a, b in zip(ssd[step][:N_PARAMS], hvd_steps[step][:N_PARAMS])), step
        later = max(float((a - b).abs().max()) for a, b in zip(ssd[STEPS - 1][:N_PARAMS], hvd_steps[STEPS - 1][:N_PARAMS]))
        assert later > 1e-4, later


