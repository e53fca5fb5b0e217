"""Real ranks (horovodrun/Gloo, torchrun/Gloo, mpirun) against the single-process simulator."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, WORKERS, horovodrun, launcher_env, mpirun, run_ranks, torchrun
from reference import ReferenceSSD
from ssd_allreduce.bench.netns import ShapedNetwork, namespaces_available
from ssd_allreduce.simulator import Simulator

sys.path.insert(0, str(WORKERS))
import problem  # noqa: E402

pytestmark = pytest.mark.multirank
WORKER = str(WORKERS / "ssd_ranks.py")
STEPS = 12
N_PARAMS = len(list(problem.make_model().parameters()))


def load(out: Path, size: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


def parse(spec: str) -> tuple[int, int, float, int]:
    k, d, beta, warmup = spec.split(",")
    return int(k), int(d), float(beta), int(warmup)


def simulator_for(spec: str, workers: int) -> Simulator:
    k, d, beta, warmup = parse(spec)
    return Simulator(problem.make_model(), problem.make_sgd, workers, sync_every=k, delay=d,
                     warmup_steps=warmup, glu_beta=beta)


def assert_matches_simulator(ranks: list[dict], spec: str, steps: int = STEPS, rtol: float = 1e-5,
                             atol: float = 1e-6) -> None:
    """Every step, and the result of ``finish()`` after the last one, as the oracle computes them."""
    torch.set_num_threads(1)
    sim = simulator_for(spec, len(ranks))
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
    ref = ReferenceSSD(problem.make_model, problem.OPTIMIZERS[optimizer], len(ranks), k=k, d=d, T=warmup, beta=beta)
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


HOROVOD_CONFIGS = ["2,1,0.5,3", "3,3,1.0,2", "4,0,0.25,1", "4,4,0.0,0", "3,2,0.5,0", "1,0,0.5,0"]


@pytest.fixture(scope="module")
def horovod_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("horovod")
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(out), "--steps", str(STEPS),
                         "--configs", ";".join(HOROVOD_CONFIGS), "--horovod-baseline"))
    return load(out, 2)


@pytest.mark.parametrize("spec", HOROVOD_CONFIGS)
def test_horovod_matches_simulator_and_reference(horovod_ranks, spec):
    assert_matches_simulator(horovod_ranks, spec)
    assert_matches_reference(horovod_ranks, spec)
    assert_global_weights_identical(horovod_ranks, spec)


def test_four_ranks_match_the_simulator_and_the_reference(tmp_path):
    specs = ["3,2,0.5,2", "2,2,0.25,0"]
    run_ranks(horovodrun(4, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", ";".join(specs)),
              timeout=180)
    ranks = load(tmp_path, 4)
    for spec in specs:
        assert_matches_simulator(ranks, spec)
        assert_matches_reference(ranks, spec)
        assert_global_weights_identical(ranks, spec)


def test_fp16_compressed_delta_is_averaged_on_real_ranks(tmp_path):
    """The delta (and the warm-up's gradients) travel as float16: the result follows the float32
    oracle to within 1e-2 while the weights move by about 0.3 over the run (measured: 4e-3), W
    stays bit-identical on every rank, and half the bytes are sent."""
    spec = "2,2,0.5,2"
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", spec,
                         "--compression", "fp16"))
    ranks = load(tmp_path, 2)
    assert_matches_simulator(ranks, spec, rtol=0, atol=1e-2)
    assert_global_weights_identical(ranks, spec)
    moved = max((a - b).abs().max() for a, b in zip(ranks[0]["configs"][spec]["final"],
                                                       problem.model_tensors(problem.make_model())))
    assert moved > 0.1
    with pytest.raises(AssertionError):   # but it is not the float32 result: it was rounded
        assert_matches_simulator(ranks, spec, rtol=1e-7, atol=1e-8)
    model = problem.make_model()
    stats = ranks[0]["configs"][spec]["stats"]
    grad_bytes = sum(p.numel() * 2 for p in model.parameters())
    state_bytes = sum(t.numel() * 2 for t in problem.model_tensors(model))
    assert stats["bytes_allreduced"] == 2 * grad_bytes + stats["windows_launched"] * state_bytes


@pytest.mark.parametrize("backend", ["horovod", "torch", "mpi"])
@pytest.mark.parametrize("wire", ["int8", "bf16"])
def test_int8_and_bf16_deltas_are_averaged_identically_on_every_backend(tmp_path, backend, wire):
    """int8 (a scale per chunk) and bfloat16, with error feedback. int8 deltas, and bfloat16 where
    the backend cannot sum it (Horovod, MPI), are gathered and summed in rank order on each rank,
    so W stays bit-identical; the result follows the float32 oracle to within the rounding the
    residual carries over (measured: under 1e-2)."""
    spec = "2,2,0.5,2"
    launch = {"horovod": horovodrun, "torch": torchrun, "mpi": mpirun}[backend]
    run_ranks(launch(2, WORKER, "--backend", backend, "--out", str(tmp_path), "--configs", spec,
                     "--compression", wire))
    ranks = load(tmp_path, 2)
    assert_matches_simulator(ranks, spec, rtol=0, atol=2e-2)
    assert_global_weights_identical(ranks, spec)
    with pytest.raises(AssertionError):   # it was rounded
        assert_matches_simulator(ranks, spec, rtol=1e-5, atol=1e-6)


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


def test_torch_distributed_backend_matches_simulator(tmp_path):
    specs = ["2,1,0.5,3", "3,3,0.25,0"]
    run_ranks(torchrun(2, WORKER, "--backend", "torch", "--out", str(tmp_path), "--configs", ";".join(specs)))
    ranks = load(tmp_path, 2)
    for spec in specs:
        assert_matches_simulator(ranks, spec)
        assert_global_weights_identical(ranks, spec)


def test_mpi4py_backend_matches_simulator(tmp_path):
    spec = "3,2,0.5,2"
    run_ranks(mpirun(2, WORKER, "--backend", "mpi", "--out", str(tmp_path), "--configs", spec))
    ranks = load(tmp_path, 2)
    assert_matches_simulator(ranks, spec)
    assert_global_weights_identical(ranks, spec)


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


def test_resume_from_state_dict_continues_exactly(tmp_path):
    spec = "3,2,0.5,2"   # windows launch at steps 4, 7, 10, 13 and land 2 steps later
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(full), "--configs", spec,
                         "--steps", "14", "--save-at", "7"))
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(resumed), "--configs", spec,
                         "--steps", "14", "--resume-from", str(full)))
    ckpt = torch.load(full / "ckpt_rank0.pt", weights_only=False)
    assert ckpt["optimizer"]["ssd_sgd"]["window"]["launched_at"] == 7  # saved with a window in flight
    for a, b in zip(load(full, 2), load(resumed, 2)):
        assert all(torch.equal(x, y) for x, y in zip(a["configs"][spec]["final"], b["configs"][spec]["final"]))
        assert a["configs"][spec]["stats"]["windows_landed"] == b["configs"][spec]["stats"]["windows_landed"]


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


@pytest.mark.parametrize("size", [2, 4])
def test_horovods_resume_pattern_loads_on_rank_0_and_broadcasts(tmp_path, size):
    """Rank 0 alone loads a checkpoint saved with a window in flight, then Horovod's broadcasts:
    every rank continues from rank 0's SSD-SGD state, exactly as if each had loaded the file."""
    worker = str(WORKERS / "horovod_resume.py")
    run_ranks(horovodrun(size, worker, "--out", str(tmp_path), "--phase", "save"), timeout=180)
    for phase in ("broadcast", "everyone"):
        out = run_ranks(horovodrun(size, worker, "--out", str(tmp_path), "--phase", phase), timeout=180)
        assert all(f"rank {r} resumed by {phase}: 14 steps" in out for r in range(size)), out
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


def test_a_skipped_nonfinite_window_recovers_on_real_ranks():
    out = run_ranks(horovodrun(2, str(WORKERS / "nonfinite_skip.py")), timeout=120)
    lines = [re.search(rf"rank {r}: landed (\d+), skipped (\d+), finite (\w+), W (\S+)", out) for r in (0, 1)]
    assert all(lines), out
    for line in lines:
        assert (line[1], line[2], line[3]) == ("7", "1", "True"), out
    assert lines[0][4] == lines[1][4]


def test_sparse_embedding_gradients_are_averaged_like_dense_ones():
    out = run_ranks(horovodrun(2, str(WORKERS / "sparse_ranks.py")), timeout=120)
    for r in (0, 1):
        assert re.search(rf"rank {r}: max \|sparse - dense\| [0-9.e-]+, warm-up allreduces 3", out), out


@pytest.mark.parametrize("at, stop, launched", [(2, 2, 2), (5, 7, 5)], ids=["warm-up", "delay stage"])
def test_a_step_without_gradients_on_one_rank_stops_every_rank_with_the_same_error(at, stop, launched):
    """In the warm-up the flag rides with the gradients (all stop at once); after it, with the window
    launched at step 5, which lands 2 steps later."""
    proc = subprocess.run(horovodrun(2, str(WORKERS / "one_rank_error.py"), "--at", str(at)), env=launcher_env(),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    message = (f"stopped at step {stop}: 1 of 2 ranks called optimizer.step() without any gradient at or "
               f"before step {launched}: call loss.backward() before optimizer.step() on every rank")
    assert proc.returncode != 0 and all(f"rank {r} {message}" in proc.stdout for r in (0, 1)), proc.stdout


@pytest.mark.parametrize("flags", [[], ["--fp16-allreduce", "--batches-per-allreduce", "2",
                                        "--gradient-predivide-factor", "2", "--scheduler"]],
                         ids=["plain", "fp16-accumulate-scheduler"])
def test_a_horovod_example_script_learns_with_the_optimizer_line_switched(flags):
    """The same script, Horovod's optimizer and then SSD-SGD's: both learn the digits alike."""
    accuracy = {}
    for optimizer in ("horovod", "ssd"):
        out = run_ranks(horovodrun(2, str(WORKERS / "horovod_mnist_style.py"), "--optimizer", optimizer, *flags),
                        timeout=180)
        accuracy[optimizer] = float(re.findall(r"epoch 2: test accuracy ([0-9.]+)", out)[-1])
    assert accuracy["horovod"] > 0.85 and accuracy["ssd"] > 0.85, accuracy
    assert abs(accuracy["ssd"] - accuracy["horovod"]) < 0.05, accuracy


@pytest.mark.parametrize("what, message", [
    ("settings", "rank 1 runs SSD-SGD with other settings than rank 0 (rank 0 vs rank 1: sync_every: 2 vs 3; "
                 "delay: 2 vs 3): pass the same settings on every rank"),
    ("model", "rank 1's model differs from rank 0's at tensor #4: rank 0 has ('4.bias', (10,), 'torch.float32'), "
              "rank 1 has ('4.bias', (12,), 'torch.float32') (name, shape, dtype); every rank must build the same model"),
    ("cast", "rank 0: parameter '0.bias' is now torch.float64 on cpu, it was torch.float32 on cpu when the optimizer was "
             "built: the model was moved or cast after wrapping"),
])
def test_ranks_that_built_different_optimizers_all_stop_at_the_first_step(what, message):
    proc = subprocess.run(horovodrun(2, str(WORKERS / "mismatch.py"), "--what", what), env=launcher_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0 and all(f"rank {r} refused: {message}" in proc.stdout for r in (0, 1)), proc.stdout


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


def test_with_adamw_and_the_same_data_on_every_rank_k1_d0_is_synchronous_adamw(tmp_path):
    """Where every rank sees the same gradient, the local moments agree and the averaged AdamW
    steps are synchronous AdamW's, step for step."""
    run_ranks(horovodrun(2, WORKER, "--backend", "horovod", "--out", str(tmp_path), "--configs", "1,0,0.5,0",
                         "--optimizer", "adamw", "--same-data", "--horovod-baseline"))
    for rec in load(tmp_path, 2):
        for step, (ssd, hvd_step) in enumerate(zip(rec["configs"]["1,0,0.5,0"]["after_step"], rec["horovod_baseline"])):
            torch.testing.assert_close(ssd[:N_PARAMS], hvd_step[:N_PARAMS], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step}: {m}")
