"""Self-tuned windows (``sync_every="auto"``, ``delay="auto"``) on a clock the test moves: the
choice from the warm-up, the re-checks, resumes, and steps that all launch or land a window."""
from __future__ import annotations

import math
import pickle
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ssd_allreduce
from fakes import LocalCommunicator
from ssd_allreduce.delay.tuner import WindowTuner
from threaded import run_threads


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _wrap(model, comm, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ssd_allreduce.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(), backend=comm, **kw)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


class _Clock:
    """A stand-in for ``time.perf_counter`` that moves only when told: step and collective times
    are then exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _SlowCommunicator(LocalCommunicator):
    """Two mirrored ranks whose collectives take ``seconds`` on ``clock`` to arrive: a poll says
    so only once they have passed, a wait moves the clock to their arrival."""

    def __init__(self, clock: _Clock, seconds: float) -> None:
        super().__init__(mirrors=2)
        self.clock, self.seconds = clock, seconds

    def allreduce_async_(self, tensors, name, **kw):
        handle = super().allreduce_async_(tensors, name, **kw)
        handle.arrives = self.clock.now + self.seconds
        return handle

    def poll(self, handle):
        return super().poll(handle) and self.clock.now >= handle.arrives

    def synchronize(self, handle):
        self.clock.now = max(self.clock.now, handle.arrives)
        super().synchronize(handle)


def _train_timed(clock, model, opt, steps, start=0, step_seconds=0.01):
    for step in range(start, start + steps):
        clock.now += step_seconds        # the compute a step takes
        _train(model, opt, 1, start=step)


def test_choose_window_hides_the_collective_and_keeps_the_windows_own_cost_small():
    from ssd_allreduce.delay.tuner import choose_window
    auto = dict(sync_every=None, max_sync_every=16, auto_delay=True)
    assert choose_window(0.004, 0.010, 0.0, **auto) == (4, 4)        # 1.5 x 10 ms within 4 steps of 4 ms
    assert choose_window(0.004, 0.100, 0.0, **auto) == (16, 16)      # nothing hides it: the widest
    assert choose_window(0.004, 0.0, 0.0, **auto) == (1, 1)
    # a window costing 0.4 ms: k = 3 is the first within 3 % of k = 16's step time, and one step
    # hides its 1 ms collective (the delay is chosen apart from the window: it costs quality)
    assert choose_window(0.004, 0.001, 0.0004, **auto) == (3, 1)
    # a window costing 4 ms: k = 11 is the first within 3 % (4.36 ms a step against 4.25 ms at k = 16),
    # and 3 steps of 4 ms hide 1.5 x 7 ms
    assert choose_window(0.004, 0.007, 0.004, **auto) == (11, 3)
    assert choose_window(0.004, 0.010, 0.0, sync_every=8, max_sync_every=16, auto_delay=True) == (8, 4)
    assert choose_window(0.004, 0.100, 0.0, sync_every=8, max_sync_every=16, auto_delay=True) == (8, 8)


def _delta_over_gradient_bytes(model):
    params = sum(p.numel() for p in model.parameters())
    return (params + sum(b.numel() for b in model.buffers() if b.is_floating_point())) / params


def test_auto_window_is_chosen_from_the_warmups_step_time_and_its_collectives(monkeypatch):
    """Steps of 10 ms and warm-up allreduces of 40 ms, so a delta (with BatchNorm's statistics)
    of about 49 ms: k = ceil(1.5 * 49 / 10) = 8; the windows then follow it. The network speeds
    up (5 ms a window): a re-check from the windows' own times (they arrive within a step, as the
    polls see, so 10 ms) shrinks it to ceil(1.5 * 10 / 10) = 2."""
    from ssd_allreduce.delay import tuner as autotune
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(autotune, "RETUNE_EVERY", 2)
    model = _model()
    comm = _SlowCommunicator(clock, 0.04)
    opt = _wrap(model, comm, sync_every="auto", warmup_steps=6)
    _train_timed(clock, model, opt, 7)
    first = opt._ssd_engine.tuner.log[0]
    collective_ms = 40 * _delta_over_gradient_bytes(model)
    k = math.ceil(1.5 * collective_ms / 10)
    assert k == 8 and first == {"step": 6, "compute_ms": pytest.approx(10), "collective_ms": pytest.approx(collective_ms),
                                "window_ms": 0.0, "sync_every": k, "delay": k}
    assert opt.ssd_stats.sync_every == k and opt._ssd_engine.clock.next_launch == 6 + k - 1
    comm.seconds = 0.005
    _train_timed(clock, model, opt, 3 * k, start=7)
    assert opt.ssd_stats.windows_launched == 3
    retuned = opt._ssd_engine.tuner.log[1]
    assert retuned["step"] == 6 + 3 * k - 1 and retuned["collective_ms"] == pytest.approx(10)
    assert retuned["sync_every"] == opt.ssd_stats.sync_every == 2          # from the third launch on
    assert opt._ssd_engine.clock.next_launch == retuned["step"] + 2


def test_an_auto_window_resumes_from_a_checkpoint_with_the_window_it_chose(monkeypatch):
    """The clock, with its count of windows, is in the checkpoint: the resumed run re-checks at the
    same launch (the 2nd here) and chooses the same window."""
    from ssd_allreduce.delay import tuner as autotune
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(autotune, "RETUNE_EVERY", 2)
    model = _model()
    opt = _wrap(model, _SlowCommunicator(clock, 0.02), sync_every="auto", warmup_steps=5)
    _train_timed(clock, model, opt, 10)       # the window launched at 8 was seen arriving at 9
    assert opt._ssd_engine.clock.sync_every == math.ceil(1.5 * 20 * _delta_over_gradient_bytes(model) / 10)
    saved = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    twin = _model()
    twin.load_state_dict(saved["model"])
    resumed = _wrap(twin, _SlowCommunicator(clock, 0.02), sync_every="auto", warmup_steps=5)
    resumed.load_state_dict(saved["opt"])
    assert resumed._ssd_engine.clock.as_tuple() == opt._ssd_engine.clock.as_tuple()
    _train_timed(clock, model, opt, 12, start=10)
    _train_timed(clock, twin, resumed, 12, start=10)
    retuned = opt._ssd_engine.tuner.log[-1]
    again = resumed._ssd_engine.tuner.log[-1]
    assert retuned["step"] == again["step"] == 5 + 3 * 4 - 1 and again["sync_every"] == retuned["sync_every"]
    assert resumed._ssd_engine.clock.as_tuple() == opt._ssd_engine.clock.as_tuple()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_an_auto_window_resumed_at_the_end_of_the_warmup_waits_for_timed_steps(monkeypatch):
    """Saved before any delay-stage step, resumed: no rank has timed a step, so every rank takes
    the provisional window and chooses at the first launch after enough timed steps."""
    from ssd_allreduce.delay import tuner as autotune
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    model = _model()
    opt = _wrap(model, _SlowCommunicator(clock, 0.02), sync_every="auto", warmup_steps=6)
    _train_timed(clock, model, opt, 6)
    saved = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    twin = _model()
    twin.load_state_dict(saved["model"])
    resumed = _wrap(twin, _SlowCommunicator(clock, 0.02), sync_every="auto", warmup_steps=6)
    resumed.load_state_dict(saved["opt"])
    _train_timed(clock, twin, resumed, 1, start=6)
    tuner = resumed._ssd_engine.tuner
    assert resumed.ssd_stats.sync_every == autotune.PROVISIONAL and resumed._ssd_engine.clock.check_due()
    assert tuner.log == []
    _train_timed(clock, twin, resumed, 10, start=7)       # launches at 10 (3 timed steps) and 15
    assert not resumed._ssd_engine.clock.check_due() and tuner.log[-1]["step"] == 15
    assert resumed._ssd_engine.clock.sync_every == tuner.log[-1]["sync_every"]


class _CountingCommunicator(_SlowCommunicator):
    def __init__(self, clock: _Clock, seconds: float) -> None:
        super().__init__(clock, seconds)
        self.agreements = 0   # allgather_object calls: the tuner's blocking agreement

    def allgather_object(self, obj):
        self.agreements += 1
        return super().allgather_object(obj)


@pytest.mark.parametrize("window, slow", [(dict(sync_every="auto"), (8, 8)), (dict(sync_every=1, delay="auto"), (1, 1))],
                         ids=["k auto", "k=1, d auto"])
def test_when_every_step_launches_or_lands_a_window_it_is_rechecked_every_few_windows_and_follows_the_network(
        monkeypatch, window, slow):
    """Compute-bound (10 ms steps, instant collectives): a window at every step, so every step is
    a "window step" and none times plain compute. The window is still re-checked every
    RETUNE_EVERY windows (one blocking agreement each, not one per step), and when the network
    slows to 50 ms a window the window grows to hide it (k = ceil(1.5 x 50 / 10) = 8)."""
    from ssd_allreduce.delay import tuner
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(tuner, "RETUNE_EVERY", 5)
    comm = _CountingCommunicator(clock, 0.0)
    model = _model()
    opt = _wrap(model, comm, warmup_steps=6, **window)
    _train_timed(clock, model, opt, 7)
    engine = opt._ssd_engine
    assert engine.clock.sync_every == 1 and engine.clock.delay in (0, 1)   # every step a window step
    agreed, launched = comm.agreements, engine.clock.launches
    _train_timed(clock, model, opt, 20, start=7)
    rechecks, windows = comm.agreements - agreed, engine.clock.launches - launched
    assert 1 <= rechecks <= math.ceil(windows / tuner.RETUNE_EVERY), (rechecks, windows)
    comm.seconds = 0.05
    _train_timed(clock, model, opt, 40, start=27)
    assert (engine.clock.sync_every, engine.clock.delay) == slow


def test_an_auto_delay_stays_overlapped_where_no_collective_time_was_measured():
    from ssd_allreduce.delay.tuner import choose_window
    assert choose_window(0.004, 0.0, 0.0, sync_every=8, max_sync_every=16, auto_delay=True) == (8, 1)


def test_a_window_cost_the_steps_do_not_show_is_fitted_from_periods_at_two_windows(monkeypatch):
    """On shared cores a window's collective slows every step around it, not only its launch and
    landing: here each step takes 4 ms plus 4 ms per window, spread evenly over the window's k
    steps, so a step's own timing sees no window cost and the model alone keeps k = 1. The first
    re-check probes k = 2; the periods at 1 and 2 (8 and 6 ms a step) give the cost, 4 ms, and
    the window widens to the smallest within 3 % of the widest's step time. Each new window is
    re-checked after PROBE_WINDOWS windows (fewer than RETUNE_EVERY, here 8)."""
    from ssd_allreduce.delay import tuner
    from ssd_allreduce.delay.tuner import fitted_window_cost
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(tuner, "RETUNE_EVERY", 8)
    model = _model()
    opt = _wrap(model, _SlowCommunicator(clock, 0.0), sync_every="auto", warmup_steps=6)
    engine = opt._ssd_engine
    for step in range(80):
        k = engine.clock.sync_every if engine.clock is not None else 1
        clock.now += 0.004 + 0.004 / k
        _train(model, opt, 1, start=step)
    chosen = [(entry["sync_every"], entry["window_ms"]) for entry in engine.tuner.log]
    assert chosen[0] == (1, 0.0) and chosen[1][0] == tuner.PROBE, chosen      # the model alone, then the probe
    # a window not run yet is re-checked after PROBE_WINDOWS windows, not RETUNE_EVERY (8 here)
    checked_at = [entry["step"] for entry in engine.tuner.log]
    assert checked_at[2] - checked_at[1] == tuner.PROBE_WINDOWS * tuner.PROBE, checked_at
    assert chosen[2] == (10, pytest.approx(4.0)), chosen     # 4 + 4/10 ms is within 3 % of 4 + 4/16
    # the window run next is measured too (4.4 ms a step) and fits the same cost; its steps, 4.4 ms,
    # are the compute now, so the smallest window within 3 % of the widest is 11
    assert engine.tuner.measured == {1: pytest.approx(0.008), 2: pytest.approx(0.006), 10: pytest.approx(0.0044)}
    assert chosen[3] == (11, pytest.approx(4.0)) and engine.clock.sync_every == 11, chosen
    # the delay apart from the window: the collective, seen arrived by the next step's poll, is timed
    # at about a step, and 1.5 of it hides in 2 steps, at the probe's window and the wider ones alike
    assert [entry["delay"] for entry in engine.tuner.log] == [1, 2, 2, 2] and engine.clock.delay == 2
    assert fitted_window_cost({4: 0.005}) is None
    assert fitted_window_cost({1: 0.008, 2: 0.006, 4: 0.005}) == pytest.approx(0.004)
    assert fitted_window_cost({1: 0.005, 2: 0.006}) == 0.0   # slower at the wider window: no cost found


def test_a_joining_rank_without_step_times_merges_the_others_table_and_chooses_alike():
    """Two ranks re-check together: rank 0 has run windows 4 and 8 (its table), rank 1 has just
    joined (none). Both end with the same table (rank 0's, and this period's time at 8, the
    slower rank's) and the same window: the collectives that follow are the same on every rank."""
    def rank(comm):
        tuner = WindowTuner(comm, None, 16, True)
        if comm.rank == 0:
            tuner.measured = {4: 0.009, 8: 0.0065}
        stats = SimpleNamespace(windows_launched=0, windows_landed=0, comm_wait_seconds=0.0)
        step_s = 0.005 if comm.rank == 0 else 0.006     # rank 1 is the slower
        for i in range(6):
            tuner.step_done(100.0 + i * step_s, stats)
        return tuner.retune(30, 8, 8), tuner.measured

    (chosen0, table0), (chosen1, table1) = run_threads(2, rank)
    assert table0 == table1 == {4: 0.009, 8: pytest.approx(0.006)}
    # the fitted cost, (9 - 6) ms / (1/4 - 1/8) = 24 ms a window, on 6 ms steps: k = 14 is the
    # smallest whose step is within 3 % of k = 16's; no collective was timed, so it lands a step late
    assert chosen0 == chosen1 == (14, 1)
