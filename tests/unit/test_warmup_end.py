"""The warm-up's end: a fixed number of steps, or where the ranks' gradient noise reaches their
number, at most ``MAX_AUTO_WARMUP_STEPS``; what ranks compare and adopt."""
from __future__ import annotations

import math

import pytest
import torch

from ssd_allreduce.noise import MIN_STEPS
from ssd_allreduce.settings import SSDSettings
from ssd_allreduce.warmup import _squared_norm
from ssd_allreduce.warmup_end import MAX_AUTO_WARMUP_STEPS, WarmupEnd

QUIET = (4.0, 1.75)   # 4 ranks: signal 1, one rank's noise 3 (under 4)
NOISY = (9.0, 3.0)    # signal 1, noise 8


def test_a_fixed_warm_up_covers_its_steps_whatever_the_noise():
    end = WarmupEnd(3)
    for t in range(3):
        assert end.covers(t)
        end.observe(t, 4, NOISY)
    assert not end.covers(3) and end.end == 3 and end.position() is None and end.state_dict() is None


def test_an_auto_warm_up_ends_after_the_first_step_whose_noise_reached_the_ranks():
    end = WarmupEnd("auto")
    for t in range(MIN_STEPS + 5):
        end.observe(t, 4, QUIET)
    assert end.end is None and end.covers(10**6)
    for t in range(MIN_STEPS + 5, 60):
        end.observe(t, 4, NOISY)
        if end.end is not None:
            break
    # the running mean (weight 0.9 on the past) of noise 3 then 8 passes 4 after 3 noisy steps
    assert end.end == MIN_STEPS + 5 + 3 and not end.covers(end.end) and end.covers(end.end - 1)
    assert end.noise.ratio >= 4


def test_noise_read_from_the_start_waits_for_the_running_means_horizon():
    end = WarmupEnd("auto")
    for t in range(MIN_STEPS):
        assert end.end is None
        end.observe(t, 4, NOISY)
    assert end.end == MIN_STEPS


def test_one_rank_has_no_noise_to_read_and_a_quiet_run_stops_at_the_cap():
    alone = WarmupEnd("auto")
    for t in range(MIN_STEPS):
        alone.observe(t, 1, None)
    assert alone.end == MIN_STEPS
    quiet = WarmupEnd("auto")
    for t in range(MAX_AUTO_WARMUP_STEPS):
        quiet.observe(t, 4, QUIET)
    assert quiet.end == MAX_AUTO_WARMUP_STEPS


def test_a_reading_that_is_not_finite_or_all_zero_is_passed_over():
    end = WarmupEnd("auto")
    for t in range(MIN_STEPS + 3):
        end.observe(t, 4, (math.inf, math.inf) if t % 2 else QUIET)   # a GradScaler overflow every other step
        end.observe(t, 4, (0.0, 0.0))                                  # no gradients at all
    assert end.end is None and end.noise.ratio == pytest.approx(3.0)
    assert all(math.isfinite(x) for x in end.position()[2:])


def test_the_squared_norm_widens_16_bit_gradients_and_takes_float64():
    grads = [torch.full((300,), 20.0, dtype=torch.float16), torch.ones(3, dtype=torch.float64), torch.ones(2)]
    assert float(_squared_norm(grads, torch.device("cpu"))) == 300 * 400.0 + 3 + 2   # 20^2 * 300 overflows fp16
    assert _squared_norm([], torch.device("cpu")).dtype == torch.float32


def test_a_reading_moves_to_another_rank_and_through_a_checkpoint():
    end = WarmupEnd("auto")
    assert end.position() is None   # fresh: what a joining rank shows
    for t in range(4):
        end.observe(t, 4, QUIET)
    joined, resumed = WarmupEnd("auto"), WarmupEnd("auto")
    joined.adopt(end.position())
    resumed.load_state_dict(end.state_dict())
    assert joined.position() == resumed.position() == end.position() == (None, 4, end.noise.signal, end.noise.noise)
    for w in (end, joined, resumed):
        for t in range(4, 20):
            w.observe(t, 4, NOISY)
    assert joined.end == resumed.end == end.end is not None
    assert end.position() == (end.end, 0, 0.0, 0.0)   # decided: the end alone travels
    resumed.load_state_dict(None)   # a checkpoint without SSD-SGD's part: from the start
    assert resumed.position() is None and resumed.end is None


def test_the_settings_take_auto_and_refuse_other_words():
    settings = SSDSettings(sync_every=4, warmup_steps="auto")
    assert settings.delay == "auto"   # the warm-up is timed: at least MIN_STEPS long
    assert SSDSettings.from_dict(settings.as_dict()) == settings
    with pytest.raises(ValueError, match="an integer >= 0 or 'auto'"):
        SSDSettings(warmup_steps="epoch")
    SSDSettings(sync_every="auto", warmup_steps="auto", average_moments=True)
