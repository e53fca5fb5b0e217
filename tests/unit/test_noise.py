"""The gradient noise estimator against gradients whose signal and noise are known, the
simulator's reading of it, and the quality study's warm-up ended by it (``warmup_steps="auto"``)."""
from __future__ import annotations

import math

import pytest
import torch

from ssd_allreduce.bench import quality
from ssd_allreduce.bench.quality_run import RunSpec, _simulation, simulate
from ssd_allreduce.bench.quality_tasks import regression
from ssd_allreduce.noise import MIN_STEPS, GradientNoise, signal_and_noise
from ssd_allreduce.simulator import Simulator


def test_signal_and_noise_are_the_two_norms_solved_for_g_and_the_spread():
    g = torch.tensor([3.0, -1.0, 2.0])
    spread = torch.tensor([[1.0, 0.5, -2.0], [-1.0, -0.5, 2.0], [0.5, 1.0, 0.0], [-0.5, -1.0, 0.0]])
    grads = g + spread                           # four ranks' gradients, the spread summing to zero
    local_sq = float(grads.square().sum(1).mean())
    mean_sq = float(grads.mean(0).square().sum())
    signal, noise = signal_and_noise(local_sq, mean_sq, 4)
    # E|g_i|^2 = |G|^2 + n and |mean|^2 = |G|^2 + n / N with n the noise of one rank's gradient,
    # and the empirical spread's mean square stands for n (N/(N-1) for the unbiased estimate)
    n = float(spread.square().sum(1).mean()) * 4 / 3
    assert local_sq == pytest.approx(signal + noise, rel=1e-6)
    assert mean_sq == pytest.approx(signal + noise / 4, rel=1e-6)
    assert noise == pytest.approx(n, rel=1e-6)


def test_the_ratio_is_read_from_running_means_once_they_have_seen_their_horizon():
    noise = GradientNoise(4, smoothing=0.5)
    assert noise.ratio == 0.0 and not noise.saturated
    noise.update(local_sq=5.0, mean_sq=2.0)           # signal 1, noise 4
    assert (noise.signal, noise.noise) == pytest.approx((1.0, 4.0)) and noise.ratio == pytest.approx(4.0)
    assert not noise.saturated                          # one step: under MIN_STEPS
    noise.update(local_sq=9.0, mean_sq=3.0)           # signal 1, noise 8: the means 1 and 6
    assert noise.ratio == pytest.approx(6.0)
    quiet = GradientNoise(4, smoothing=0.5)
    for _ in range(MIN_STEPS):
        noise.update(local_sq=9.0, mean_sq=3.0)
        quiet.update(local_sq=4.0, mean_sq=1.75)      # signal 1, noise 3: under the 4 ranks
    assert noise.saturated and quiet.ratio == pytest.approx(3.0) and not quiet.saturated
    gone = GradientNoise(2)
    gone.update(local_sq=2.0, mean_sq=1.0)             # two orthogonal gradients of one norm: no common part
    assert gone.ratio == math.inf
    with pytest.raises(ValueError, match="at least 2 ranks"):
        GradientNoise(1).update(1.0, 1.0)


def test_the_simulator_reads_the_noise_of_its_synchronous_steps_and_nothing_else():
    task = regression()
    sim = Simulator(task.make_model(0), lambda p: torch.optim.SGD(p, lr=0.05), 3, sync_every=2, delay=1,
                    warmup_steps=2, glu_beta=0.5, read_noise=True)
    shards = task.shards(3, "shuffle", 0)
    batches = [task.batch(shards[w], 0, 0, w) for w in range(3)]
    grads = []   # the noise of step 0 by hand, from the same batches and weights
    for model, (x, y) in zip(sim.models, batches):
        model.zero_grad()
        task.loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    stacked = torch.stack(grads)
    expected = signal_and_noise(float(stacked.square().sum(1).mean()), float(stacked.mean(0).square().sum()), 3)
    sim.step(batches, task.loss)
    assert (sim.noise.signal, sim.noise.noise) == pytest.approx(expected, rel=1e-6)
    for t in (1, 2, 3):
        sim.step([task.batch(shards[w], 0, t, w) for w in range(3)], task.loss)
    assert sim.noise.steps == 2   # the warm-up's steps only
    assert Simulator(task.make_model(0), lambda p: torch.optim.SGD(p, lr=0.05), 3, sync_every=2, delay=1,
                     warmup_steps=2, glu_beta=0.5).noise is None   # read only where asked


def test_an_auto_warm_up_is_the_fixed_one_that_ends_where_the_noise_reaches_the_ranks():
    spec = RunSpec("regression", 4, "adamw", "shuffle", 0, 40, 5, quality.parse_variant("2:1@auto"), evals=4)
    task = regression()
    sim, step = _simulation(RunSpec("regression", 4, "adamw", "shuffle", 0, 40, 5, quality.parse_variant("sync")),
                            task)
    steps = next(t + 1 for t in range(spec.steps) if step(t) or sim.noise.saturated)   # synchronous run's crossing
    assert MIN_STEPS <= steps < spec.steps
    auto = simulate(spec, task)
    fixed = simulate(RunSpec("regression", 4, "adamw", "shuffle", 0, 40, 5, quality.parse_variant(f"2:1@{steps}"),
                             evals=4), task)
    assert auto.warmup == steps and fixed.warmup is None
    assert auto.final["val_loss"] == fixed.final["val_loss"]
    sync = simulate(RunSpec("regression", 4, "sgd", "shuffle", 0, 40, 5, quality.parse_variant("sync"), evals=4), task)
    assert all("noise" in m for _, m in sync.curve[:-1])
    assert [("noise" in m) for _, m in auto.curve[:-1]] == [step <= steps for step, _ in auto.curve[:-1]]


def test_an_auto_warm_up_runs_on_real_ranks_as_the_librarys_rule():
    parser = quality.build_parser()
    runs = quality.plan(parser.parse_args(["--variants", "sync", "5:1@auto", "--real-ranks", "2", "--seeds", "1"]))
    assert {r.warmup for r in runs if not r.variant.sync} == {"auto"}   # real ranks: the library's rule


def test_a_plot_of_many_variants_keeps_the_windows_1_1_and_5_5_whatever_their_warm_up():
    assert quality.plotted("5:5@auto", 7) and quality.plotted("1:1@90+am", 7) and not quality.plotted("5:1@auto", 7)
