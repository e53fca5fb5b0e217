"""The GPU paths: Horovod's NCCL operations, torch.distributed's side stream, AMP on CUDA.

These need a CUDA GPU and are skipped (saying so) on machines without one. One GPU suffices:
NCCL runs at world size 1, and two ranks share the GPU through Gloo to exercise the
side-stream code with real overlap."""
from __future__ import annotations

import json

import pytest
import torch

from launchers import WORKERS, horovodrun, run_ranks, torchrun
from oracle import assert_global_weights_identical, load, simulator_for
from test_train import final_states

import problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU; this machine has none")]
WORKER = str(WORKERS / "ssd_ranks.py")


def assert_close_to_simulator(ranks: list[dict], spec: str, steps: int = 12) -> None:
    """CUDA kernels round differently from the CPU oracle: compare with a float32 tolerance."""
    sim = simulator_for(spec, len(ranks))
    for step in range(steps):
        sim.step([problem.batch(r, step) for r in range(len(ranks))], problem.loss_fn)
    for r, rec in enumerate(ranks):
        torch.testing.assert_close(rec["configs"][spec]["after_step"][steps - 1],
                                   problem.model_tensors(sim.models[r]), rtol=1e-3, atol=1e-4)


def test_horovod_nccl_on_one_gpu(tmp_path):
    hvd = pytest.importorskip("horovod.torch", reason="Horovod is not installed on this machine")
    if not hvd.nccl_built():
        pytest.skip("this Horovod was built without NCCL (no CUDA toolkit at build time)")
    spec = "3,2,0.5,2"
    run_ranks(horovodrun(1, WORKER, "--backend", "horovod", "--device", "cuda", "--out", str(tmp_path),
                         "--configs", spec))
    assert_close_to_simulator(load(tmp_path, 1), spec)


def test_torch_nccl_on_one_gpu(tmp_path):
    spec = "3,3,0.5,1"
    run_ranks(torchrun(1, WORKER, "--backend", "torch", "--torch-backend", "nccl", "--device", "cuda",
                       "--out", str(tmp_path), "--configs", spec))
    assert_close_to_simulator(load(tmp_path, 1), spec)


def test_two_ranks_share_the_gpu_through_gloo(tmp_path):
    spec = "2,2,0.5,2"
    run_ranks(torchrun(2, WORKER, "--backend", "torch", "--torch-backend", "gloo", "--device", "cuda",
                       "--out", str(tmp_path), "--configs", spec))
    ranks = load(tmp_path, 2)
    assert_global_weights_identical(ranks, spec)
    assert_close_to_simulator(ranks, spec)


def test_training_driver_with_amp_on_the_gpu(tmp_path):
    run_ranks(torchrun(1, "-m", "ssd_allreduce.train", "--no-progress", "--device", "cuda", "--amp",
                       "--backend", "torch", "--mode", "ssd", "--epochs", "5", "--warmup-steps", "20",
                       "--clip-grad-norm", "5", "--out", str(tmp_path / "run")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["test_accuracy"] >= 0.9, summary
    # 5 epochs of 44 steps: 20 synchronous, then windows of 5 launched and landed on the GPU
    stats = summary["ssd_stats"]
    assert stats["steps"] == 220 and stats["warmup_allreduces"] == 20
    assert stats["windows_launched"] == 40 and stats["windows_landed"] + stats["windows_skipped"] == 40
    assert all(r["loss"] == r["loss"] for r in records if r["kind"] == "step")   # no NaN reached the model
    # the GradScaler really ran (a disabled one saves an empty state) and the state is on the GPU
    state = final_states(tmp_path / "run", 1)[0]
    assert state["scaler"]["scale"] > 0 and state["optimizer"]["ssd_sgd"]["global_weights"][0].is_cuda


def test_the_delay_stage_never_waits_on_the_gpu_from_the_host():
    """With nonfinite="raise" a landing reads its checks on the host only once they have arrived,
    so CUDA's sync debug mode, set to raise on any synchronising call, sees none in the steps."""
    from fakes import LocalCommunicator
    import ssd_allreduce
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = ssd_allreduce.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                             named_parameters=model.named_parameters(), sync_every=3,
                                             warmup_steps=2, backend=LocalCommunicator(mirrors=2))
    x, y = torch.randn(8, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    steps(6)                                   # warm-up, the first check of the ranks, the first window
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.ssd_stats.windows_landed >= 4 and opt._ssd_engine.verdicts.defers(opt._ssd_engine.state.delta)
    opt.finish()


def _kernels_under(event) -> set[str]:
    """Names of the CUDA kernels launched inside a profiled CPU event, its children included."""
    names = {k.name for k in event.kernels}
    for child in event.cpu_children:
        names |= _kernels_under(child)
    return names


def test_the_first_landing_launches_only_kernels_launched_before():
    """CUDA loads a kernel at its first launch (0.1 s for a landing's on an H200, 3 % of a short
    benchmark): the delay stage's start rehearses a window's work, so the first landing loads none."""
    from fakes import LocalCommunicator
    import ssd_allreduce
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = ssd_allreduce.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                             named_parameters=model.named_parameters(),
                                             named_buffers=model.named_buffers(), sync_every=3,
                                             warmup_steps=2, backend=LocalCommunicator(mirrors=2))
    x, y = torch.randn(8, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):   # 2 warm-up steps, the start at step 2, a launch at 4, the landing at 7
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.cuda.synchronize()
    assert opt.ssd_stats.windows_landed == 1
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    landing = next(e for e in events if e.name == "ssd_allreduce.land")
    before = set().union(*(set(k.name for k in e.kernels) for e in events
                           if e.time_range.end <= landing.time_range.start))
    first_time = _kernels_under(landing) - before
    assert _kernels_under(landing) and not first_time, first_time
    opt.finish()
