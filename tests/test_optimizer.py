"""The drop-in wrapper in one process (a one-rank fake communicator): API, protocol, errors."""
from __future__ import annotations

import contextlib
import pickle
import warnings

import pytest
import torch
from torch import nn

import ssd_allreduce
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
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(glu_beta=2.0), "glu_beta must be a number in [0, 1], got 2.0"),
    (dict(nonfinite="ignore"), "nonfinite must be one of ('raise', 'skip'), got 'ignore'"),
    (dict(backend="nccl"), "backend must be one of ('horovod', 'torch', 'mpi')"),
    (dict(op="max"), "op must be one of"),
    (dict(op="sum"), "op=Sum is not supported: after the warm-up SSD-SGD averages the model delta"),
    (dict(backward_passes_per_step=0), "backward_passes_per_step must be an integer >= 1, got 0"),
    (dict(op="adasum"), "keep hvd.DistributedOptimizer(op=hvd.Adasum) for Adasum"),
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
    model = _model()
    opt = _wrap(model)
    x = torch.randn(4, 4)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="Increase backward_passes_per_step"):
        model(x).sum().backward()
    model2 = _model()
    opt2 = _wrap(model2, backward_passes_per_step=2)
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
    assert opt.window_in_flight and opt._ssd_engine.window.handle is not None
    _train(model, opt, 3, start=3)              # polled at 3 (pending), 4 (done), lands at 5
    assert opt.ssd_stats.polls_pending == 1 and opt.ssd_stats.windows_landed == 1
    # one flat buffer, plus the flag that tells every rank whether one stepped without gradients
    assert (f"{opt._ssd_name}.delta", 2) in comm.calls and (f"{opt._ssd_name}.global_weights", 1) in comm.calls


def test_finish_lands_the_window_in_flight():
    model = _model()
    opt = _wrap(model, sync_every=4, delay=4, warmup_steps=0)
    _train(model, opt, 5)                       # launched at step 3, one local step since
    snapshot = [v.clone() for v in opt._ssd_engine.snapshot.views]
    before = [p.detach().clone() for p in opt._ssd_engine.params]
    global_before = [v.clone() for v in opt.global_weights]
    ssd_allreduce.finish()
    assert not opt.window_in_flight and opt.ssd_stats.windows_landed == 1
    beta = ssd_allreduce.optimizer.DEFAULT_GLU_BETA
    for i, p in enumerate(opt._ssd_engine.params):
        delta = snapshot[i] - global_before[i]            # one rank: the average is its own delta
        expected = global_before[i] + delta + beta * (before[i] - snapshot[i]) + (1 - beta) * 1 / 4 * delta
        torch.testing.assert_close(p.detach(), expected)


def test_nonfinite_delta_raises_and_leaves_global_weights_untouched():
    model = _model()
    opt = _wrap(model, sync_every=2, delay=0, warmup_steps=0)
    _train(model, opt, 2)
    global_before = [v.clone() for v in opt.global_weights]
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        _train(model, opt, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(opt.global_weights, global_before))


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
    assert opt.window_in_flight and opt._ssd_engine.window.handle is not None
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
    with pytest.raises(ValueError, match="build the optimizer with the checkpoint's settings"):
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


def test_fp16_compression_halves_the_bytes():
    sizes = {}
    for name, compression in (("none", ssd_allreduce.Compression.none), ("fp16", ssd_allreduce.Compression.fp16)):
        model = _model()
        opt = _wrap(model, LocalCommunicator(mirrors=2), sync_every=2, delay=1, warmup_steps=2,
                    compression=compression)
        _train(model, opt, 6)
        sizes[name] = opt.ssd_stats.bytes_allreduced
    assert sizes["fp16"] * 2 == sizes["none"] > 0


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
        "grad.0", "global_weights", "delta"}


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


def test_a_skipped_window_brings_nonfinite_weights_and_momentum_back_and_a_run_of_skips_raises():
    model = _model()
    opt = _wrap(model, sync_every=2, delay=0, warmup_steps=0, nonfinite="skip", max_skipped_windows=2)
    _train(model, opt, 2)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="window skipped"):
        _train(model, opt, 2, start=2)
    assert all(torch.equal(p.detach(), w) for p, w in zip(opt._ssd_engine.params, opt.global_weights))
    assert all(bool(torch.isfinite(s["momentum_buffer"]).all()) for s in opt.state.values())
    _train(model, opt, 2, start=4)                  # the next window lands
    assert (opt.ssd_stats.windows_landed, opt.ssd_stats.windows_skipped) == (2, 1)
    with pytest.raises(FloatingPointError, match="and so were the 2 windows before it"):
        for step in range(6, 20):
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _train(model, opt, 1, start=step)
    assert opt.ssd_stats.windows_skipped == 1 + 3     # the third in a row raised


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


def test_a_lossy_wire_format_sends_what_rounding_lost_with_the_next_window():
    """Error feedback: at each launch the wire carries Q(s - W + e) and e becomes what Q lost, so
    what was sent plus the residual is exactly the delta plus the residual before."""
    model = _model()
    opt = _wrap(model, LocalCommunicator(pending_polls=10**6, mirrors=2), sync_every=2, delay=2, warmup_steps=0,
                compression=ssd_allreduce.Compression.fp16)
    engine = opt._ssd_engine
    residual_before = None
    for launch in range(3):
        _train(model, opt, 2, start=2 * launch)          # a window launches at steps 1, 3, 5
        window = engine.window
        sent = [w.float() for w in window.wire]
        expected = [s - w for s, w in zip(engine.snapshot.buffers, engine.global_.buffers)]
        if residual_before is not None:
            expected = [x + e for x, e in zip(expected, residual_before)]
        assert all(torch.equal(x, d) for x, d in zip(expected, engine.delta.buffers))   # s - W + e
        assert all(torch.equal(q + e, d) for q, e, d in zip(sent, engine.residual.buffers, engine.delta.buffers))
        assert any(bool(e.abs().max() > 0) for e in engine.residual.buffers)       # fp16 did round
        residual_before = [e.clone() for e in engine.residual.buffers]
        engine.land(elapsed=2)               # what arrives is the float16 average, decompressed
