"""The drop-in wrapper in one process (a one-rank fake communicator): API, protocol, errors."""
from __future__ import annotations

import contextlib
import copy
import re
import pickle
import warnings

import pytest
import torch
from torch import nn

import ssd_allreduce
from ssd_allreduce.algorithm import glu_beta_for
from fakes import LocalCommunicator


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _wrap(model, comm=None, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw.setdefault("sync_every", 2)
    kw.setdefault("warmup_steps", 1)
    return ssd_allreduce.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), named_buffers=model.named_buffers(),
        backend=comm or LocalCommunicator(), **kw)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_returns_the_same_optimizer_still_an_instance_of_its_class():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ssd_allreduce.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                             backend=LocalCommunicator())
    assert opt is sgd and isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGD"
    with pytest.raises(ValueError, match="already wrapped"):
        ssd_allreduce.DistributedOptimizer(opt, backend=LocalCommunicator())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sync_every=0), "sync_every must be an integer >= 1, got 0"),
    (dict(sync_every=3, delay=4), "delay must be an integer in [0, sync_every=3], got 4"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0 or 'auto' (until the gradient noise reaches "
                            "the ranks), got -1"),
    (dict(glu_beta=2.0), "glu_beta must be a number in [0, 1], got 2.0"),
    (dict(nonfinite="ignore"), "nonfinite must be one of ('raise', 'skip'), got 'ignore'"),
    (dict(backend="nccl"), "backend must be one of ('horovod', 'torch', 'mpi')"),
    (dict(op="max"), "op must be one of"),
    (dict(op="sum"), "op=Sum is not supported: after the warm-up SSD-SGD averages the model delta"),
    (dict(backward_passes_per_step=0), "backward_passes_per_step must be an integer >= 1, got 0"),
    (dict(op="adasum"), "keep hvd.DistributedOptimizer(op=hvd.Adasum) for Adasum"),
    (dict(average_moments=True), "average_moments carries Adam's moments (exp_avg, exp_avg_sq); SGD has none"),
])
def test_bad_arguments_say_what_to_change(kwargs, fragment):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("backend", LocalCommunicator())
    with pytest.raises(ValueError) as err:
        ssd_allreduce.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kwargs)
    assert fragment in str(err.value)


def test_parameters_that_are_not_named_are_rejected():
    model, other = _model(), nn.Linear(2, 2)
    opt = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="not in named_parameters"):
        ssd_allreduce.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           backend=LocalCommunicator())


def test_step_without_gradients_is_an_error():
    model = _model()
    opt = _wrap(model)
    with pytest.raises(RuntimeError, match="call loss.backward"):
        opt.step()


def test_more_backward_passes_than_declared_is_an_error():
    """Counted by backward hooks, which (as Horovod's) exist only with more than one rank."""
    model = _model()
    opt = _wrap(model, LocalCommunicator(mirrors=2))
    x = torch.randn(4, 4)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="Increase backward_passes_per_step"):
        model(x).sum().backward()
    model2 = _model()
    opt2 = _wrap(model2, LocalCommunicator(mirrors=2), backward_passes_per_step=2)
    model2(x).sum().backward()
    model2(x).sum().backward()
    opt2.step()
    assert opt2.ssd_stats.steps == 1 and opt.ssd_stats.steps == 0


def test_pickling_the_optimizer_points_to_state_dict():
    opt = _wrap(_model())
    with pytest.raises(TypeError, match="optimizer.state_dict"):
        pickle.dumps(opt)


def test_window_stays_in_flight_and_is_polled_then_lands():
    model = _model()
    comm = LocalCommunicator(pending_polls=1, mirrors=2)
    opt = _wrap(model, comm, sync_every=3, delay=3, warmup_steps=0)
    _train(model, opt, 3)                       # window launched at step 2
    assert opt.window_in_flight
    _train(model, opt, 3, start=3)              # polled at 3 (pending), 4 (done), lands at 5
    assert opt.ssd_stats.polls_pending == 1 and opt.ssd_stats.windows_landed == 1
    # one flat buffer, and in a collective of its own the flag that tells every rank whether one
    # stepped without gradients
    assert {(f"{opt._ssd_name}.delta", 1), (f"{opt._ssd_name}.delta.flag", 1),
            (f"{opt._ssd_name}.global_weights", 1)} <= set(comm.calls)


def test_finish_lands_the_window_in_flight():
    model = _model()
    opt = _wrap(model, sync_every=4, delay=4, warmup_steps=0)
    _train(model, opt, 5)                       # launched at step 3, one local step since
    snapshot = [v.clone() for v in opt._ssd_engine.state.snapshot.views]
    before = [p.detach().clone() for p in opt._ssd_engine.params]
    global_before = [v.clone() for v in opt.global_weights]
    ssd_allreduce.finish()
    assert not opt.window_in_flight and opt.ssd_stats.windows_landed == 1
    beta = glu_beta_for(1)   # the default, "auto": by the steps since the launch
    for i, p in enumerate(opt._ssd_engine.params):
        delta = snapshot[i] - global_before[i]            # one rank: the average is its own delta
        expected = global_before[i] + delta + beta * (before[i] - snapshot[i]) + (1 - beta) * 1 / 4 * delta
        torch.testing.assert_close(p.detach(), expected)


def test_nonfinite_delta_can_be_skipped_with_a_warning():
    model = _model()
    opt = _wrap(model, sync_every=2, delay=0, warmup_steps=0, nonfinite="skip")
    _train(model, opt, 2)
    global_before = [v.clone() for v in opt.global_weights]
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="window skipped"):
        _train(model, opt, 2, start=2)
    assert opt.ssd_stats.windows_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(opt.global_weights, global_before))


@pytest.mark.parametrize("compression", [ssd_allreduce.Compression.none, ssd_allreduce.Compression.fp16])
def test_state_dict_resume_in_a_new_optimizer_continues_exactly(compression):
    """fp16 also carries the error-feedback residual through the checkpoint."""
    model = _model()
    opt = _wrap(model, comm=LocalCommunicator(pending_polls=5, mirrors=2), sync_every=3, delay=2, warmup_steps=2,
                compression=compression)
    _train(model, opt, 5)                            # window launched at step 4, in flight
    assert opt.window_in_flight and opt._ssd_engine.state.window.inflight is not None
    saved = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    assert saved["opt"]["ssd_sgd"]["window"]["launched_at"] == 4
    _train(model, opt, 7, start=5)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = _wrap(resumed, LocalCommunicator(mirrors=2), sync_every=3, delay=2, warmup_steps=2, compression=compression)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 7, start=5)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.ssd_stats.windows_landed == opt.ssd_stats.windows_landed


def test_loading_a_checkpoint_of_another_schedule_is_an_error():
    model = _model()
    opt = _wrap(model, sync_every=2)
    _train(model, opt, 3)
    opt2 = _wrap(_model(), sync_every=4)
    with pytest.raises(ValueError, match="build the optimizer with the checkpoint's settings to resume$"):
        opt2.load_state_dict(opt.state_dict())


def test_a_checkpoint_whose_delay_was_k_names_the_flag_that_resumes_it():
    """A run of a release whose delay defaulted to k, resumed with the same arguments: delay 'auto' now."""
    model = _model()
    opt = _wrap(model, sync_every=2, delay=2, warmup_steps=5)
    _train(model, opt, 6)
    opt2 = _wrap(_model(), sync_every=2, warmup_steps=5)
    with pytest.raises(ValueError, match=r"delay: 2 vs 'auto'.*pass delay=k, --delay K\)"):
        opt2.load_state_dict(opt.state_dict())


def test_synchronize_then_clip_inside_skip_synchronize():
    model = _model()
    opt = _wrap(model, warmup_steps=3)
    x = torch.randn(6, 4)
    model(x).pow(2).sum().backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with opt.skip_synchronize():
        opt.step()
    assert opt.ssd_stats.warmup_allreduces == 1
    model(x).pow(2).sum().backward()
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    assert opt.ssd_stats.warmup_allreduces == 2


def test_compressed_formats_send_half_or_a_quarter_of_the_bytes():
    """fp16 and bf16 halve warm-up gradients and deltas; int8 sends a quarter of the delta's bytes
    plus a float32 scale per chunk, and float16 warm-up gradients (they have no error feedback)."""
    sent = {}
    for name in ("none", "fp16", "bf16", "int8"):
        model = _model()
        opt = _wrap(model, LocalCommunicator(mirrors=2), sync_every=2, delay=1, warmup_steps=2,
                    compression=getattr(ssd_allreduce.Compression, name))
        _train(model, opt, 6)
        stats = opt.ssd_stats
        sent[name] = (stats.warmup_bytes_allreduced, stats.bytes_allreduced - stats.warmup_bytes_allreduced)
    assert sent["fp16"][0] * 2 == sent["bf16"][0] * 2 == sent["int8"][0] * 2 == sent["none"][0] > 0
    assert sent["fp16"][1] * 2 == sent["bf16"][1] * 2 == sent["none"][1] > 0
    model = _model()
    tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    numel = sum(t.numel() for t in tensors)
    chunks = -(-numel // ssd_allreduce.Compression.int8.CHUNK)
    assert sent["int8"][1] == 2 * (chunks * ssd_allreduce.Compression.int8.CHUNK + 4 * chunks)   # 2 windows


def test_int8_rounds_each_chunk_to_its_own_scale_and_keeps_nonfinite_values_nonfinite():
    int8 = ssd_allreduce.Compression.int8
    torch.manual_seed(0)
    x = torch.cat([torch.randn(int8.CHUNK) * 1e-3, torch.randn(int8.CHUNK + 7) * 10])
    packed, ctx = int8.compress(x)
    assert packed.dtype == torch.int8 and packed.numel() == 3 * int8.CHUNK + 3 * 4
    error = (int8.decompress(packed, ctx) - x).abs()
    for part, scale in ((slice(0, int8.CHUNK), 1e-3), (slice(int8.CHUNK, None), 10)):
        assert error[part].max() <= x[part].abs().max() / 127 / 2 * (1 + 1e-6)     # half a step of its chunk
        assert error[part].max() < scale * 0.05
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[5] = bad
        assert not torch.isfinite(int8.decompress(*int8.compress(y))[:int8.CHUNK]).all()
    gathered = torch.cat([int8.compress(x)[0], int8.compress(2 * x)[0]])
    torch.testing.assert_close(int8.mean_of_gathered(gathered, 2, ctx),
                               (int8.decompress(*int8.compress(x)) + int8.decompress(*int8.compress(2 * x))) / 2)


@pytest.mark.parametrize("warmup", [5, 0])
def test_grad_scaler_skips_nonfinite_steps_but_keeps_the_schedule(warmup):
    model = _model()
    opt = _wrap(model, sync_every=2, delay=1, warmup_steps=warmup)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    reference = _model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    # a finite step: unscaled gradients, same update as plain SGD
    opt.zero_grad(), ref_opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    # during warm-up, scaler.step() without synchronize() + unscale_() first is warned about
    with pytest.warns(UserWarning, match="Horovod's pattern") if warmup else contextlib.nullcontext():
        scaler.step(opt)
    scaler.update()
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    if warmup:  # (after warm-up the first step also takes W, identical here)
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b)
    # an overflowing step: skipped, but counted
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.ssd_stats.steps == 2
    if warmup:
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 4


def test_groups_split_the_warmup_allreduce():
    model = _model()
    comm = LocalCommunicator(mirrors=2)
    opt = _wrap(model, comm, warmup_steps=2, groups=2)
    _train(model, opt, 1)
    grads = [c for c in comm.calls if ".grad." in c[0]]
    assert [name for name, _ in grads] == [f"{opt._ssd_name}.grad.0", f"{opt._ssd_name}.grad.1"]
    assert sum(n for _, n in grads) == len(list(model.parameters())) + 1     # and the flag
    with pytest.raises(ValueError, match="a parameter can only appear once in groups"):
        w = model[0].weight
        _wrap(_model(), groups=[[w], [w]])


def test_sparse_gradients_average_sparse_or_as_dense_during_warmup():
    def run(**kw):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 3, sparse=True)
        opt = ssd_allreduce.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                                 named_parameters=emb.named_parameters(),
                                                 backend=LocalCommunicator(mirrors=2), warmup_steps=2, **kw)
        before = emb.weight.detach().clone()
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
        return before, emb
    for kw in ({}, {"sparse_as_dense": True}):
        before, emb = run(**kw)
        assert emb.weight.grad.is_sparse
        torch.testing.assert_close(emb.weight[1], before[1] - 0.1)      # lr x gradient of ones
        torch.testing.assert_close(emb.weight[5], before[5])


def test_two_optimizers_of_one_process_use_their_own_collective_names():
    comm = LocalCommunicator(mirrors=2)
    first, second = _model(), _model()
    opt_a, opt_b = _wrap(first, comm, warmup_steps=1), _wrap(second, comm, warmup_steps=1)
    _train(first, opt_a, 3)                     # warm-up, start, launch at step 2
    _train(second, opt_b, 3)
    names_a = {n for n, _ in comm.calls if n.startswith(opt_a._ssd_name + ".")}
    names_b = {n for n, _ in comm.calls if n.startswith(opt_b._ssd_name + ".")}
    assert opt_a._ssd_name != opt_b._ssd_name and names_a and names_b
    assert {n.split(".", 2)[2] for n in names_a} == {n.split(".", 2)[2] for n in names_b} == {
        "grad.0", "global_weights", "delta", "delta.flag"}


def test_an_lr_scheduler_built_before_wrapping_steps_through_ssd_sgd():
    """Horovod scripts may build the scheduler on the plain optimizer and wrap it afterwards."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)
    opt = ssd_allreduce.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                             backend=LocalCommunicator(), sync_every=2, warmup_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no "lr_scheduler.step() before optimizer.step()"
        for step in range(5):
            _train(model, opt, 1, start=step)
            sched.step()
    assert opt.ssd_stats.steps == 5 and opt.ssd_stats.windows_launched == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_a_step_patched_on_the_instance_before_wrapping_is_refused():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step = lambda closure=None: None
    with pytest.raises(ValueError, match="wrap the optimizer first"):
        ssd_allreduce.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                           backend=LocalCommunicator())


@pytest.mark.parametrize("after_steps", [0, 3])
def test_a_model_cast_after_wrapping_is_named_with_what_to_do(after_steps):
    """.to(float64) replaces BatchNorm's buffers: caught before the first step or the next window."""
    model = _model()
    opt = _wrap(model, sync_every=2, warmup_steps=1)
    _train(model, opt, after_steps)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"parameter '0.bias' is now torch.float64 on cpu, it was "
                                           r"torch.float32 on cpu .* build the optimizer"):
        for step in range(after_steps, after_steps + 3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def test_a_frozen_layer_stays_put_and_joins_the_windows_once_unfrozen():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    model[0].requires_grad_(False)
    opt = ssd_allreduce.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                             backend=LocalCommunicator(), sync_every=2, warmup_steps=2)
    frozen = model[0].weight.detach().clone()
    _train(model, opt, 6)                           # warm-up and two windows
    assert torch.equal(model[0].weight, frozen)
    index = opt._ssd_param_names.index("0.weight")
    assert torch.equal(opt.global_weights[index], frozen)
    model[0].requires_grad_(True)
    _train(model, opt, 4, start=6)                  # launched at 7, landed at 9: carries its delta
    assert not torch.equal(opt.global_weights[index], frozen)


def test_add_param_group_after_wrapping_says_what_to_do_instead():
    model, extra = _model(), nn.Linear(2, 2)
    opt = _wrap(model)
    with pytest.raises(ValueError, match="Add every parameter group before wrapping"):
        opt.add_param_group({"params": extra.parameters()})


def test_a_plain_optimizer_state_loads_and_starts_at_the_warmup():
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, plain, 2)
    opt = _wrap(model, sync_every=2, warmup_steps=3)
    _train(model, opt, 5)
    assert opt.global_weights is not None
    opt.finish()
    opt.load_state_dict(plain.state_dict())
    assert opt.ssd_stats.steps == 0 and opt.global_weights is None and not opt.window_in_flight
    assert all(torch.equal(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"])
               for p in model.parameters())
    _train(model, opt, 1)
    assert opt.ssd_stats.warmup_allreduces == 1


def test_alone_nothing_is_sent_gradients_and_deltas_are_their_own_averages():
    model, mirrored = _model(), _model()
    comm = LocalCommunicator()
    opt = _wrap(model, comm, warmup_steps=3, sync_every=2, delay=1)
    twin = _wrap(mirrored, LocalCommunicator(mirrors=2), warmup_steps=3, sync_every=2, delay=1)
    _train(model, opt, 9)
    _train(mirrored, twin, 9)
    assert [name for name, _ in comm.calls] == [f"{opt._ssd_name}.global_weights"]
    assert opt.ssd_stats.bytes_allreduced == 0 and opt.ssd_stats.windows_landed == 2   # launched at 4, 6, 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), mirrored.state_dict().values()))


def test_synchronize_without_gradients_stops_every_rank_too():
    model = _model()
    opt = _wrap(model, LocalCommunicator(mirrors=2), warmup_steps=3)
    with pytest.raises(RuntimeError, match="2 of 2 ranks called optimizer.step\\(\\) without any gradient"):
        opt.synchronize()


def _calls_named(comm, fragment):
    return [name for name, _ in comm.calls if fragment in name]


def test_warmup_buckets_start_during_backward_in_the_same_order_on_every_rank():
    """Buckets run from the last layer to the first; each starts from its last gradient's hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    comm = LocalCommunicator(mirrors=2)
    opt = _wrap(model, comm, warmup_steps=2, groups=[[model[4].weight, model[4].bias], [model[2].weight],
                                                      [model[2].bias], [model[0].weight, model[0].bias]])
    assert [[tuple(p.shape) for p in b] for b in opt._ssd_averager.buckets][:2] == [[(2, 8), (2,)], [(8,)]]
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert _calls_named(comm, ".grad.") == []     # the first step compares the ranks before any collective
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert _calls_named(comm, ".grad.") == [f"{opt._ssd_name}.grad.{i}" for i in range(4)] * 2   # before step()
    assert opt.ssd_stats.warmup_allreduces_in_backward == 4
    opt.step()
    assert opt.ssd_stats.warmup_allreduces == 2 and len(_calls_named(comm, ".grad.")) == 8


def test_a_bucket_waiting_for_an_unused_parameter_holds_back_the_later_ones_until_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(3, 3))   # the last is never used
    comm = LocalCommunicator(mirrors=2)
    opt = _wrap(model, comm, warmup_steps=3, groups=3)
    opt._ssd_checked = True     # as after a first step
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model[1](model[0](torch.randn(6, 4))), torch.randint(0, 2, (6,))).backward()
    assert _calls_named(comm, ".grad.") == [] and opt.ssd_stats.warmup_allreduces_in_backward == 0
    opt.step()
    assert _calls_named(comm, ".grad.") == [f"{opt._ssd_name}.grad.{i}" for i in range(3)]
    assert torch.equal(model[2].weight.grad, torch.zeros(3, 3))     # zeros sent for the unused layer
    assert not torch.equal(model[0].weight, before[0]) and torch.equal(model[2].weight, before[4])


class _ByNameCommunicator(LocalCommunicator):
    """Matches collectives by name, as Horovod does."""

    matches_by_name = True


def test_with_horovod_each_gradient_starts_as_soon_as_it_is_ready_and_the_flag_goes_alone():
    """Horovod fuses what is ready itself: one allreduce per parameter, in whatever order backward
    produces them, even past a parameter that has no gradient yet."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(3, 3))   # the last is never used
    comm = _ByNameCommunicator(mirrors=2)
    opt = _wrap(model, comm, warmup_steps=2)
    opt._ssd_checked = True     # as after a first step
    assert [len(b) for b in opt._ssd_averager.buckets] == [1] * 6
    nn.functional.cross_entropy(model[1](model[0](torch.randn(6, 4))), torch.randint(0, 2, (6,))).backward()
    started = _calls_named(comm, ".grad.")
    assert len(started) == 4 and opt.ssd_stats.warmup_allreduces_in_backward == 4   # all but the unused two
    opt.step()
    assert sorted(_calls_named(comm, ".grad.")) == sorted(f"{opt._ssd_name}.grad.{i}" for i in range(6))
    assert _calls_named(comm, ".flag") == [f"{opt._ssd_name}.flag"]
    assert all(n == 1 for name, n in comm.calls if ".grad." in name)             # no flag fused in


def test_with_several_backward_passes_per_step_a_bucket_starts_after_the_last():
    model = _model()
    comm = LocalCommunicator(mirrors=2)
    opt = _wrap(model, comm, warmup_steps=2, backward_passes_per_step=2)
    opt._ssd_checked = True     # as after a first step
    x = torch.randn(4, 4)
    model(x).sum().backward()
    assert _calls_named(comm, ".grad.") == []
    model(x).sum().backward()
    assert len(_calls_named(comm, ".grad.")) == len(opt._ssd_averager.buckets) == 1   # a small model: one bucket
    opt.step()


def test_buckets_without_groups_fill_about_a_mebibyte_from_the_last_parameter():
    from ssd_allreduce.warmup import make_buckets
    params = [torch.zeros(1 << 17), torch.zeros(1 << 17), torch.zeros(10), torch.zeros(1 << 18), torch.zeros(5)]
    buckets = make_buckets(params, None)
    assert [[p.numel() for p in b] for b in buckets] == [[5, 1 << 18], [10, 1 << 17, 1 << 17]]


def test_ranks_that_list_the_parameters_in_another_order_stop_before_any_warmup_collective():
    class OtherOrder(LocalCommunicator):
        def allgather_object(self, obj):
            return [obj, dict(obj, buckets=obj["buckets"][::-1])]
    model = _model()
    opt = _wrap(model, OtherOrder(mirrors=2), warmup_steps=2, groups=2)
    with pytest.raises(ValueError, match="rank 1 lists the optimizer's parameters in another order than rank 0"):
        _train(model, opt, 1)


def test_gradscaler_unscaling_covers_sparse_gradients():
    from ssd_allreduce.amp import unscale_and_find_nonfinite_ as _unscale_and_find_nonfinite_
    dense = torch.full((3,), 4.0)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([2.0, 6.0]), (4,), check_invariants=True)
    assert not _unscale_and_find_nonfinite_([dense, sparse], torch.tensor(2.0))
    assert torch.equal(dense, torch.full((3,), 2.0)) and torch.equal(sparse.to_dense(), torch.tensor([1.0, 0, 3.0, 0]))
    bad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([float("inf")]), (4,), check_invariants=True)
    assert _unscale_and_find_nonfinite_([dense, bad], None)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sync_every="auto", delay=2), "with sync_every='auto' the delay is chosen with it"),
    (dict(sync_every="auto", warmup_steps=2), "warmup_steps must be >= 5, got 2"),
    (dict(sync_every="often"), "sync_every must be an integer or 'auto', got 'often'"),
    (dict(sync_every="auto", max_sync_every=0), "max_sync_every must be an integer >= 1, got 0"),
])
def test_bad_auto_window_arguments_say_what_to_change(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        _wrap(_model(), **kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(compression=ssd_allreduce.Compression.fp16), "average_moments with compression fp16"),
    (dict(compression=ssd_allreduce.Compression.int8), "average_moments with compression int8"),
    (dict(warmup_steps=0), "warmup_steps must be >= 1, got 0"),
])
def test_averaged_moments_refuse_what_would_lose_them(kwargs, fragment):
    model = _model()
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ssd_allreduce.DistributedOptimizer(torch.optim.AdamW(model.parameters()), named_parameters=model.named_parameters(),
                                           backend=LocalCommunicator(), average_moments=True, **kwargs)


def test_averaged_moments_refuse_adamax_when_wrapped():
    model = _model()
    with pytest.raises(ValueError, match=re.escape("Adamax keeps an infinity norm (exp_inf) instead")):
        ssd_allreduce.DistributedOptimizer(torch.optim.Adamax(model.parameters()), named_parameters=model.named_parameters(),
                                           backend=LocalCommunicator(), average_moments=True)


class _GrowingCommunicator(LocalCommunicator):
    """One rank whose job grows to ``grown_to`` ranks at the next ``refresh`` (Horovod elastic)."""

    grown_to = 1

    def refresh(self) -> None:
        self.size = self.grown_to


def test_a_change_of_ranks_rescales_adamws_local_steps_by_the_new_rank_count():
    """local_lr_scale="auto" is sqrt(ranks) for the ranks of now: after growing from 1 to 4 ranks
    the local AdamW steps run at twice the learning rate, as a plain AdamW at 2 x lr computes."""
    model, comm = _model(), _GrowingCommunicator()
    reference = copy.deepcopy(model)
    opt = ssd_allreduce.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                             named_parameters=model.named_parameters(), sync_every=8, delay=8,
                                             warmup_steps=0, backend=comm)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    _train(model, opt, 2)
    _train(reference, plain, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    comm.grown_to = 4
    opt.membership_changed()
    assert opt.window_in_flight is False
    with torch.no_grad():   # the local weights went back to W; the plain copy goes there too
        for p, w in zip(reference.parameters(), model.parameters()):
            p.copy_(w)
    plain.param_groups[0]["lr"] = 2e-2
    _train(model, opt, 2, start=2)
    _train(reference, plain, 2, start=2)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
