"""SSD-SGD's math in one process: schedule, landing formula, simulator against plain SGD."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from ssd_allreduce.algorithm import apply_global_update_, compensate_local_, launch_window
from ssd_allreduce.delay.clock import WindowClock
from ssd_allreduce.settings import MIN_WARMUP_STEPS, SSDSettings
from ssd_allreduce.simulator import Simulator
from ssd_allreduce.tensors import FlatSpace, model_tensors

from reference import ReferenceSSD

import problem


def _launches_and_landings(clock: WindowClock, steps: int) -> tuple[list[int], list[int]]:
    launches, landings, in_flight = [], [], None
    for t in range(steps):
        if in_flight is not None and t == in_flight + clock.delay and clock.delay:
            landings.append(t)
            in_flight = None
        if clock.launches_at(t):
            launches.append(t)
            in_flight = t
            clock.advance()
    return launches, landings


def test_the_clock_launches_every_k_steps_after_the_warmup_and_lands_d_later():
    assert _launches_and_landings(WindowClock.starting(4, 2, step=3), 20) == ([6, 10, 14, 18], [8, 12, 16])
    # d = k: a window lands at the step the next one launches (landing first)
    assert _launches_and_landings(WindowClock.starting(3, 3, step=0), 10) == ([2, 5, 8], [5, 8])
    clock = WindowClock.starting(2, 0, step=0)
    assert _launches_and_landings(clock, 10)[0] == [1, 3, 5, 7, 9] and clock.launches == 5
    assert not WindowClock.starting(2, 2, 0).check_due() and WindowClock.starting(2, 2, 0, next_check=0).check_due()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sync_every=0, delay=0, warmup_steps=0), "sync_every must be an integer >= 1, got 0"),
    (dict(sync_every=4, delay=5, warmup_steps=0), "delay must be an integer in [0, sync_every=4], got 5"),
    (dict(sync_every=4, delay=-1, warmup_steps=0), "got -1"),
    (dict(sync_every=4, delay=2, warmup_steps=-3),
     "warmup_steps must be an integer >= 0 or 'auto' (until the gradient noise reaches the ranks), got -3"),
    (dict(sync_every=2.5, delay=1, warmup_steps=0), "got 2.5"),
    (dict(outer_lr=0.0), "outer_lr must be a number > 0, got 0.0"),
    (dict(outer_momentum=1.0), "outer_momentum must be a number in [0, 1), got 1.0"),
    (dict(drift_correction="yes"), "drift_correction must be True or False, got 'yes'"),
])
def test_settings_reject_bad_window_values(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        SSDSettings(**kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize("beta, compensation, fragment", [
    (1.5, "glu", "glu_beta must be a number in [0, 1], got 1.5"),
    (-0.1, "glu", "got -0.1"), (math.nan, "glu", "got nan"),
    (0.5, "average", "compensation must be one of ('glu', 'overwrite'), got 'average'"),
])
def test_settings_reject_bad_glu_values(beta, compensation, fragment):
    with pytest.raises(ValueError) as err:
        SSDSettings(glu_beta=beta, compensation=compensation)
    assert fragment in str(err.value)


def test_settings_default_the_delay_round_trip_and_name_differences():
    s = SSDSettings(sync_every=4, warmup_steps=3)
    assert s.delay == 4
    assert SSDSettings.from_dict(s.as_dict()) == s
    other = SSDSettings(sync_every=4, delay=2, warmup_steps=3, nonfinite="skip")
    assert s.differences(other) == ["delay: 4 vs 2", "nonfinite: 'raise' vs 'skip'"]
    with pytest.raises(ValueError, match="unknown SSD-SGD settings"):
        SSDSettings.from_dict(dict(s.as_dict(), momentum=0.9))


def test_flat_space_views_alias_one_buffer_per_dtype():
    like = [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64), torch.zeros(5)]
    space = FlatSpace(like)
    assert [b.numel() for b in space.buffers] == [11, 4]
    space.copy_from_([torch.full((2, 3), 1.0), torch.full((4,), 2.0, dtype=torch.float64), torch.arange(5.0)])
    assert space.buffers[0].tolist() == [1.0] * 6 + [0, 1, 2, 3, 4]
    assert space.views[1].dtype == torch.float64 and space.views[1].tolist() == [2.0] * 4
    assert space.nbytes == 11 * 4 + 4 * 8


@pytest.mark.parametrize("beta, elapsed", [(0.5, 3), (1.0, 2), (0.0, 4), (0.25, 0)])
def test_landing_matches_the_glu_formula(beta, elapsed):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 2), (5,)]
    k = 4
    w = [torch.randn(s, generator=g) for s in shapes]
    buf = [torch.randn(7, generator=g)]
    W, s, D = (FlatSpace(w + buf) for _ in range(3))
    for space in (W, s, D):
        space.copy_from_([torch.randn(x.shape, generator=g) for x in w + buf])
    W0, s0, D0 = ([v.clone() for v in space.views] for space in (W, s, D))
    w0 = [x.clone() for x in w]
    apply_global_update_(W, D)
    compensate_local_(w, buf, W, s, D, glu_beta=beta, elapsed=elapsed, sync_every=k)
    for i in range(2):
        expected = W0[i] + D0[i] + beta * (w0[i] - s0[i]) + (1 - beta) * elapsed / k * D0[i]
        torch.testing.assert_close(w[i], expected)
        torch.testing.assert_close(W.views[i], W0[i] + D0[i])
    torch.testing.assert_close(buf[0], W0[2] + D0[2])    # buffers take the averaged value


def test_overwrite_landing_replaces_local_weights():
    w = [torch.randn(4)]
    W, s, D = FlatSpace(w), FlatSpace(w), FlatSpace(w)
    W.copy_from_([torch.ones(4)]), D.copy_from_([torch.full((4,), 0.5)])
    apply_global_update_(W, D)
    compensate_local_(w, [], W, s, D, glu_beta=0.5, elapsed=2, sync_every=2, compensation="overwrite")
    assert w[0].tolist() == [1.5] * 4


def test_launch_takes_snapshot_and_delta():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    W, s, D = FlatSpace(w), FlatSpace(w), FlatSpace(w)
    W.copy_from_([torch.tensor([0.5, 0.5]), torch.tensor([1.0])])
    launch_window(w, W, s, D)
    assert s.buffers[0].tolist() == [1.0, 2.0, 3.0] and D.buffers[0].tolist() == [0.5, 1.5, 2.0]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(step: int, workers: int):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(workers)]


def test_simulator_with_sync_every_1_is_large_batch_sgd():
    """k = 1, d = 0 averages the weights after every local step: with SGD that is synchronous SGD
    on the union of the workers' batches (the gradient of the mean loss)."""
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    sim = Simulator(_mlp(), sgd, 3, sync_every=1, delay=0, warmup_steps=0, glu_beta=0.5)
    ref = _mlp()
    ref_opt = sgd(ref.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for step in range(15):
        batches = _batches(step, 3)
        sim.step(batches, loss_fn)
        ref_opt.zero_grad()
        (sum(loss_fn(ref(x), y) for x, y in batches) / 3).backward()
        ref_opt.step()
    for worker in sim.models:
        for a, b in zip(worker.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_simulator_warmup_is_large_batch_sgd_and_then_diverges_locally():
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    sim = Simulator(_mlp(), sgd, 2, sync_every=4, delay=2, warmup_steps=5, glu_beta=0.5)
    ref = _mlp()
    ref_opt = sgd(ref.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for step in range(5):
        batches = _batches(step, 2)
        sim.step(batches, loss_fn)
        ref_opt.zero_grad()
        (sum(loss_fn(ref(x), y) for x, y in batches) / 2).backward()
        ref_opt.step()
    for a, b in zip(sim.models[1].parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    sim.step(_batches(5, 2), loss_fn)
    assert not torch.equal(sim.models[0][0].weight, sim.models[1][0].weight)


@pytest.mark.parametrize("k, d, beta, warmup", [(2, 1, 0.5, 3), (3, 3, 1.0, 2), (4, 0, 0.25, 1),
                                                (3, 2, 0.0, 0), (1, 0, 0.5, 0)])
def test_simulator_matches_the_independent_reference_step_by_step_and_after_finish(k, d, beta, warmup):
    """The simulator drives ``algorithm``; the reference is SPEC's formulas written out anew."""
    workers, steps = 3, 11
    sim = Simulator(problem.make_model(), problem.make_sgd, workers, sync_every=k, delay=d,
                    warmup_steps=warmup, glu_beta=beta)
    ref = ReferenceSSD(problem.make_model, problem.make_sgd, workers, k=k, d=d, T=warmup, beta=beta)
    for step in range(steps):
        batches = [problem.batch(r, step) for r in range(workers)]
        sim.step(batches, problem.loss_fn)
        ref.step(batches, problem.loss_fn)
        for r in range(workers):
            params, buffers = model_tensors(sim.models[r])
            torch.testing.assert_close(params + buffers, ref.tensors(r), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"k={k} d={d} step {step} worker {r}: {m}")
    sim.finish()
    ref.finish()
    for r in range(workers):
        params, buffers = model_tensors(sim.models[r])
        torch.testing.assert_close(params + buffers, ref.tensors(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranks_per_node", [None, 2])
def test_the_simulators_drift_correction_matches_the_independent_reference(ranks_per_node):
    workers, steps = 4, 14
    sim = Simulator(problem.make_model(), problem.make_sgd, workers, sync_every=3, delay=2, warmup_steps=2,
                    glu_beta=0.5, ranks_per_node=ranks_per_node, drift_correction=True)
    ref = ReferenceSSD(problem.make_model, problem.make_sgd, workers, k=3, d=2, T=2, beta=0.5,
                       ranks_per_node=ranks_per_node, drift=True)
    _run(sim, workers, steps)
    _run(ref, workers, steps)
    for r in range(workers):
        params, buffers = model_tensors(sim.models[r])
        torch.testing.assert_close(params + buffers, ref.tensors(r), rtol=1e-5, atol=1e-6)
    assert any(bool(c.abs().max() > 0) for c in sim.corrections[0].buffers)


def _run(sim_or_ref, workers: int, steps: int):
    for step in range(steps):
        sim_or_ref.step([problem.batch(r, step) for r in range(workers)], problem.loss_fn)
    sim_or_ref.finish()


@pytest.mark.parametrize("ranks_per_node", [1, 2, 4])
def test_hierarchical_simulator_matches_the_independent_reference(ranks_per_node):
    workers, steps = 4, 13
    sim = Simulator(problem.make_model(), problem.make_sgd, workers, sync_every=3, delay=2,
                    warmup_steps=2, glu_beta=0.5, ranks_per_node=ranks_per_node)
    ref = ReferenceSSD(problem.make_model, problem.make_sgd, workers, k=3, d=2, T=2, beta=0.5,
                       ranks_per_node=ranks_per_node)
    _run(sim, workers, steps)
    _run(ref, workers, steps)
    for r in range(workers):
        params, buffers = model_tensors(sim.models[r])
        torch.testing.assert_close(params + buffers, ref.tensors(r), rtol=1e-5, atol=1e-6)


def test_hierarchical_with_one_node_is_synchronous_sgd_and_with_one_rank_per_node_is_flat():
    workers, steps = 4, 13

    def sim(**kw):
        s = Simulator(problem.make_model(), problem.make_sgd, workers, sync_every=3, delay=2, glu_beta=0.5, **kw)
        _run(s, workers, steps)
        return [problem.model_tensors(m) for m in s.models]

    one_node, synchronous = sim(warmup_steps=2, ranks_per_node=4), sim(warmup_steps=steps)
    torch.testing.assert_close(one_node, synchronous, rtol=0, atol=0)
    one_per_node, flat = sim(warmup_steps=2, ranks_per_node=1), sim(warmup_steps=2)
    torch.testing.assert_close(one_per_node, flat, rtol=0, atol=0)
    two_by_two = sim(warmup_steps=2, ranks_per_node=2)
    n = len(list(problem.make_model().parameters()))
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a[:n], b[:n]))  # noqa: E731
    assert same(two_by_two[0], two_by_two[1]) and same(two_by_two[2], two_by_two[3])   # a node moves as one
    assert not same(two_by_two[0], two_by_two[2]) and not same(two_by_two[0], flat[0])


def test_simulator_rejects_nodes_that_do_not_divide_the_workers():
    with pytest.raises(ValueError, match="ranks_per_node must divide"):
        Simulator(problem.make_model(), problem.make_sgd, 4, sync_every=3, delay=2, warmup_steps=0,
                  glu_beta=0.5, ranks_per_node=3)


def test_the_simulator_refuses_an_auto_window_saying_what_to_give():
    with pytest.raises(ValueError, match="fixed window.*sync_every and delay"):
        Simulator(_mlp(), lambda p: torch.optim.SGD(p, lr=0.1), 2, sync_every="auto", delay=None, warmup_steps=10,
                  glu_beta="auto")


def test_a_drift_correction_over_windows_wider_than_measured_warns_saying_so():
    with pytest.warns(UserWarning, match="drift_correction with windows of up to 5 steps: with SGD it was measured to "
                                         "help up to 2"):
        SSDSettings(sync_every=5, drift_correction=True)
    with pytest.warns(UserWarning, match="up to 16 steps"):
        SSDSettings(sync_every="auto", warmup_steps=10, drift_correction=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SSDSettings(sync_every=2, delay=1, drift_correction=True)
        SSDSettings(sync_every="auto", max_sync_every=2, warmup_steps=10, drift_correction=True)
        SSDSettings(sync_every=10, drift_correction=True, average_moments=True)   # measured to help AdamW there


def test_an_outer_step_larger_than_measured_safe_at_its_delay_warns_saying_what_to_lower():
    with pytest.warns(UserWarning, match=r"outer_lr=0.7 with outer_momentum=0.9 takes 7x each window's average.*"
                                         r"sync_every=5 and delay='auto' it was measured safe up to 1x.*"
                                         r"Lower outer_lr or outer_momentum, or use delay=1 with sync_every >= 5 "
                                         r"\(up to 1.4x\) or delay=0"):
        SSDSettings(sync_every=5, outer_lr=0.7, outer_momentum=0.9)
    with pytest.warns(UserWarning, match="1.4x each window's average in steady state; with sync_every=5 and delay=2"):
        SSDSettings(sync_every=5, delay=2, outer_lr=0.7, outer_momentum=0.5)
    with pytest.warns(UserWarning, match="with sync_every=5 and delay='auto' it was measured safe up to 1x"):
        SSDSettings(sync_every=5, outer_lr=0.7, outer_momentum=0.5)   # "auto" may choose d = 5
    with pytest.warns(UserWarning, match="with sync_every=2 and delay=1 it was measured safe up to 1x"):
        SSDSettings(sync_every=2, delay=1, outer_lr=0.7, outer_momentum=0.5)   # higher on shuffled shards
    with pytest.warns(UserWarning, match="with sync_every='auto' and delay='auto' it was measured safe up to 1x"):
        SSDSettings(sync_every="auto", warmup_steps=10, outer_lr=0.7, outer_momentum=0.5)
    with pytest.warns(UserWarning, match="1.6x each window's average in steady state; with sync_every=5 and delay=1 "
                                         "it was measured safe up to 1.4x"):
        SSDSettings(sync_every=5, delay=1, outer_lr=0.8, outer_momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SSDSettings(sync_every=5, outer_lr=0.5, outer_momentum=0.5)
        SSDSettings(sync_every=5, delay=1, outer_lr=0.7, outer_momentum=0.5)   # lower over every 600/2,000-step run measured
        SSDSettings(sync_every=10, delay=1, outer_lr=0.7, outer_momentum=0.5)
        SSDSettings(sync_every=5, delay=0, outer_lr=0.7, outer_momentum=0.9)   # DiLoCo's own, blocking


def test_the_delay_defaults_to_the_fewest_steps_that_hide_the_allreduce_where_the_warmup_can_time_them():
    """The quality study's gap grows with d at a fixed k: by default the window lands as soon as
    its allreduce is done ("auto", timed in the warm-up), or after k where the warm-up is too short
    to time; the simulator, which measures no time, asks for the delay."""
    assert SSDSettings(sync_every=5).delay == "auto"
    assert SSDSettings(sync_every=5, warmup_steps=MIN_WARMUP_STEPS).delay == "auto"
    assert SSDSettings(sync_every=5, warmup_steps=MIN_WARMUP_STEPS - 1).delay == 5
    assert SSDSettings(sync_every=5, delay=2).delay == 2 and SSDSettings(sync_every="auto").delay == "auto"
    assert SSDSettings(sync_every=1).delay == 1   # "auto" would have no other choice
    with pytest.raises(ValueError, match="the simulator runs a fixed window"):
        Simulator(_mlp(), lambda p: torch.optim.SGD(p, lr=0.1), 2, sync_every=5, delay=None, warmup_steps=10,
                  glu_beta="auto")
