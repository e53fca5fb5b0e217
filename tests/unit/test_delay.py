"""The delay stage in one process: N real optimizers on N threads whose collectives really average
(``support/threaded.py``), against SPEC's formulas written out anew (``support/reference.py``),
for every configuration the multi-rank tests cover, at 2 and 4 ranks, for every wire format and
the hierarchy; and what a landing decides (skip, raise, defer), the window's transport, error
feedback, checkpoints and adoption across ranks."""
from __future__ import annotations

import copy
import math
import pickle
import threading
import warnings
from typing import Any, Optional

import pytest
import torch

import problem
import ssd_allreduce
from fakes import LocalCommunicator
from reference import ReferenceSSD
from ssd_allreduce.compression import Compression
from threaded import CollectiveMismatch, run_threads

STEPS = 12
# (k, d, beta, warm-up steps): the ones the multi-rank tests ran on every backend
CONFIGS = [(2, 1, 0.5, 3), (3, 3, 1.0, 2), (4, 0, 0.25, 1), (4, 4, 0.0, 0), (3, 2, 0.5, 0), (1, 0, 0.5, 0),
           (3, 2, 0.5, 2), (2, 2, 0.25, 0)]


_seeding = threading.Lock()   # the model's initialisation seeds torch's one global generator


def build(comm, k: int, d: int, beta: float, warmup: int, optimizer: str = "sgd", **kw: Any):
    with _seeding:
        model = problem.make_model()
    opt = ssd_allreduce.DistributedOptimizer(
        problem.OPTIMIZERS[optimizer](model.parameters()), named_parameters=model.named_parameters(),
        named_buffers=model.named_buffers(), sync_every=k, delay=d, warmup_steps=warmup, glu_beta=beta,
        backend=comm, **kw)
    return model, opt


def step(model, opt, rank: int, t: int) -> None:
    x, y = problem.batch(rank, t)
    opt.zero_grad()
    problem.loss_fn(model(x), y).backward()
    opt.step()


def train(size: int, config: tuple, steps: int = STEPS, ranks_per_node: Optional[int] = None,
          **kw: Any) -> list[dict]:
    """Every rank's parameters after each step and after ``finish()``, its ``W`` after each
    landing, and its stats."""
    def rank_fn(comm):
        model, opt = build(comm, *config, **kw)
        record: dict[str, Any] = {"after_step": [], "global_weights": []}
        landed = 0
        for t in range(steps):
            step(model, opt, comm.rank, t)
            record["after_step"].append(problem.model_tensors(model))
            if opt.ssd_stats.windows_landed != landed:
                landed = opt.ssd_stats.windows_landed
                record["global_weights"].append([w.clone() for w in opt.global_weights])
        opt.finish()
        record["final"] = problem.model_tensors(model)
        record["stats"] = opt.ssd_stats.as_dict()
        return record
    return run_threads(size, rank_fn, ranks_per_node=ranks_per_node)


def assert_matches_reference(ranks: list[dict], config: tuple, optimizer: str = "sgd", rtol: float = 1e-5,
                             atol: float = 1e-6, ranks_per_node: Optional[int] = None, **reference: Any) -> None:
    k, d, beta, warmup = config
    ref = ReferenceSSD(problem.make_model, problem.OPTIMIZERS[optimizer], len(ranks), k=k, d=d, T=warmup, beta=beta,
                       ranks_per_node=ranks_per_node, **reference)
    for t in range(len(ranks[0]["after_step"])):
        ref.step([problem.batch(r, t) for r in range(len(ranks))], problem.loss_fn)
        for r, rec in enumerate(ranks):
            torch.testing.assert_close(rec["after_step"][t], ref.tensors(r), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{config} rank {r} step {t}: {m}")
    ref.finish()
    for r, rec in enumerate(ranks):
        torch.testing.assert_close(rec["final"], ref.tensors(r), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{config} rank {r} after finish(): {m}")


def assert_global_weights_identical(ranks: list[dict]) -> None:
    first = ranks[0]["global_weights"]
    assert first, "no window landed"
    for r, rec in enumerate(ranks[1:], start=1):
        assert len(rec["global_weights"]) == len(first)
        for i, (mine, ref) in enumerate(zip(rec["global_weights"], first)):
            assert all(torch.equal(a, b) for a, b in zip(mine, ref)), f"W differs on rank {r} after landing {i}"


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "k{}d{}b{}T{}".format(*c))
def test_ranks_follow_the_reference_step_by_step_with_w_bit_identical(size, config):
    ranks = train(size, config)
    assert_matches_reference(ranks, config)
    if config[3] < STEPS - config[0]:
        assert_global_weights_identical(ranks)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("config", [(2, 1, 0.5, 3), (3, 3, 0.5, 0)], ids=lambda c: "k{}d{}T{}".format(c[0], c[1], c[3]))
def test_overwrite_landings_follow_the_reference_with_w_bit_identical(size, config):
    """The GLU ablation's baseline: a landing sets every rank's weights to W."""
    ranks = train(size, config, compensation="overwrite")
    assert_matches_reference(ranks, config, overwrite=True)
    assert_global_weights_identical(ranks)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("outer", [dict(outer_lr=0.7, outer_momentum=0.9), dict(outer_lr=1.3, outer_momentum=0.5,
                                                                                 outer_nesterov=False)],
                         ids=["nesterov", "heavy ball"])
def test_the_outer_optimizer_follows_the_reference_with_w_bit_identical(size, outer):
    config = (3, 3, 0.5, 2)
    ranks = train(size, config, **outer)
    ref_kw = dict(outer_lr=outer["outer_lr"], outer_mu=outer["outer_momentum"],
                  nesterov=outer.get("outer_nesterov", True))
    assert_matches_reference(ranks, config, **ref_kw)
    assert_global_weights_identical(ranks)
    with pytest.raises(AssertionError):   # it is not the core algorithm
        assert_matches_reference(ranks, config)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("config", [(3, 3, 0.5, 2), (2, 1, 0.75, 0), (4, 0, 0.5, 1)], ids=lambda c: "k{}d{}b{}T{}".format(*c))
def test_the_drift_correction_follows_the_reference_with_w_bit_identical(size, config):
    """Each rank's batches differ: after the first landing every local step also moves by the
    window's average step less the rank's own."""
    ranks = train(size, config, drift_correction=True)
    assert_matches_reference(ranks, config, drift=True)
    assert_global_weights_identical(ranks)
    with pytest.raises(AssertionError):
        assert_matches_reference(ranks, config)


def test_the_drift_corrections_sum_to_zero_over_the_ranks():
    """Each is the average step less the rank's own: together they move ``W`` by nothing."""
    def rank_fn(comm):
        model, opt = build(comm, 2, 1, 0.5, 0, drift_correction=True)
        for t in range(11):
            step(model, opt, comm.rank, t)
        state = opt._ssd_engine.state
        return torch.cat(list(state.correction.buffers)), torch.cat(list(state.correction_before.buffers))
    corrections = run_threads(4, rank_fn)
    for which in (0, 1):
        mine = torch.stack([c[which] for c in corrections])
        assert mine.abs().max() > 1e-4
        torch.testing.assert_close(mine.sum(0), torch.zeros_like(mine[0]), rtol=0, atol=1e-6)


def test_the_drift_correction_follows_the_hierarchical_reference():
    config = (3, 2, 0.5, 2)
    ranks = train(4, config, ranks_per_node=2, local_sync=True, drift_correction=True)
    assert_matches_reference(ranks, config, ranks_per_node=2, drift=True)


def test_beta_chosen_by_the_delay_follows_the_reference():
    from ssd_allreduce.algorithm import glu_beta_for
    assert [glu_beta_for(d) for d in (0, 1, 2, 3, 4, 5, 10)] == [0.75, 0.75, 0.75, 0.625, 0.5, 0.5, 0.5]
    config = (3, 3, "auto", 2)
    ranks = train(2, config)
    assert_matches_reference(ranks, (3, 3, glu_beta_for, 2))


@pytest.mark.parametrize("scale", [2.0, "auto"])
def test_adamws_local_steps_at_a_scaled_learning_rate_follow_the_reference(scale):
    """After the warm-up the local AdamW steps run at sqrt(ranks) x the learning rate ("auto", 2 at
    4 ranks); the warm-up's do not."""
    config = (3, 2, 0.5, 2)
    ranks = train(4, config, optimizer="adamw", local_lr_scale=scale)
    assert_matches_reference(ranks, config, optimizer="adamw", lr_scale=2.0)


def test_sgds_local_steps_keep_the_learning_rate_under_auto():
    assert_matches_reference(train(2, (1, 0, "auto", 0), local_lr_scale="auto"), (1, 0, 0.5, 0))   # synchronous


@pytest.mark.parametrize("config", [(1, 0, 0.5, 3), (3, 2, 0.5, 2)], ids=["k1d0", "k3d2"])
def test_with_adamw_the_moments_stay_on_each_rank_as_the_reference_keeps_them(config):
    """At the library's default local learning rate for AdamW: sqrt(2) x the schedule's at 2 ranks."""
    assert_matches_reference(train(2, config, optimizer="adamw"), config, optimizer="adamw", lr_scale=math.sqrt(2))


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("config", [(3, 2, 0.5, 2), (1, 1, 0.75, 1), (2, 0, 0.5, 3)], ids=lambda c: "k{}d{}b{}T{}".format(*c))
def test_averaged_moments_follow_the_reference_with_w_bit_identical(size, config):
    """Each rank's batches differ, so its moments do: they land as the ranks' mean at the launch
    plus the rank's own change since."""
    ranks = train(size, config, optimizer="adamw", local_lr_scale=1.0, average_moments=True)
    assert_matches_reference(ranks, config, optimizer="adamw", moments=True)
    assert_global_weights_identical(ranks)
    with pytest.raises(AssertionError):   # the moments made a difference
        assert_matches_reference(ranks, config, optimizer="adamw")


def test_averaged_moments_follow_the_hierarchical_reference():
    config = (2, 1, 0.5, 2)
    ranks = train(4, config, ranks_per_node=2, optimizer="adamw", local_lr_scale=1.0, average_moments=True)
    assert_matches_reference(ranks, config, optimizer="adamw", ranks_per_node=2, moments=True)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("wire", ["fp16", "bf16", "int8"])
def test_lossy_wire_formats_follow_the_reference_to_their_rounding_with_w_bit_identical(size, wire):
    """The residual carries what rounding lost to the next window: within 2e-2 of float32 (the
    weights move by about 0.3), never exactly it, and ``W`` the same bits everywhere."""
    config = (2, 2, 0.5, 2)
    ranks = train(size, config, compression=getattr(Compression, wire))
    assert_matches_reference(ranks, config, rtol=0, atol=2e-2)
    assert_global_weights_identical(ranks)
    with pytest.raises(AssertionError):
        assert_matches_reference(ranks, config)


@pytest.mark.parametrize("wire", ["none", "int8"])
def test_two_nodes_of_two_ranks_follow_the_hierarchical_reference(wire):
    """Gradients averaged inside a node every step, windows between the nodes on each rank's
    shard: a node's ranks hold the same parameters, and ``W`` is the same everywhere."""
    config = (3, 2, 0.5, 2)
    ranks = train(4, config, ranks_per_node=2, local_sync=True, compression=getattr(Compression, wire))
    tolerance = dict(rtol=1e-5, atol=1e-6) if wire == "none" else dict(rtol=0, atol=2e-2)
    assert_matches_reference(ranks, config, ranks_per_node=2, **tolerance)
    assert_global_weights_identical(ranks)
    n = len(list(problem.make_model().parameters()))
    for t in range(STEPS):
        for a, b in ((0, 1), (2, 3)):
            assert all(torch.equal(x, y) for x, y in zip(ranks[a]["after_step"][t][:n], ranks[b]["after_step"][t][:n]))


def test_one_rank_per_node_is_flat_ssd_sgd():
    config = (3, 2, 0.5, 2)
    ranks = train(4, config, ranks_per_node=1, local_sync=True)
    assert_matches_reference(ranks, config)


def test_the_automatic_choice_stays_flat_on_one_node_and_refuses_uneven_nodes_on_every_rank():
    def layout(comm):
        _, opt = build(comm, 3, 2, 0.5, 2)
        return opt.node_layout
    assert run_threads(4, layout, ranks_per_node=4) == [None] * 4
    assert run_threads(4, layout, ranks_per_node=2) == ["2 node(s) x 2 rank(s)"] * 4
    errors = run_threads(3, lambda comm: build(comm, 3, 2, 0.5, 2, local_sync=True), nodes=["a", "a", "b"],
                         expect_errors=True)
    message = "local_sync=True needs the same number of ranks on every node, this job has 2 node(s) x 2/1 rank(s)"
    assert all(isinstance(e, ValueError) and message in str(e) for e in errors), errors


def test_a_hierarchical_window_in_flight_resumes_bit_for_bit():
    """Saved with a window in flight, each rank holding its own averaged shard; resumed by every
    rank from its own state: the landing gathers the shards and the run ends bit for bit."""
    kw = dict(local_sync=True)
    full = run_threads(4, lambda comm: _run_and_save(comm, kw, save_at=7, total=14), ranks_per_node=2)
    assert full[1][0]["opt"]["ssd_sgd"]["window"]["launched_at"] == 7
    assert full[1][0]["opt"]["ssd_sgd"]["shard"] == [1, 2]

    def resumed(comm):
        model, opt = build(comm, 3, 2, 0.5, 2, **kw)
        model.load_state_dict(full[comm.rank][0]["model"])
        opt.load_state_dict(full[comm.rank][0]["opt"])
        for t in range(8, 14):
            step(model, opt, comm.rank, t)
        return problem.model_tensors(model)
    for (_, expected), got in zip(full, run_threads(4, resumed, ranks_per_node=2)):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_one_node_is_synchronous_sgd_throughout():
    config = (3, 2, 0.5, 2)
    ranks = train(4, config, ranks_per_node=4, local_sync=True)
    assert_matches_reference(ranks, (1, 0, 0.5, STEPS))   # all warm-up: synchronous SGD
    assert ranks[0]["stats"]["windows_launched"] == 0


def test_the_window_is_in_flight_while_local_steps_run_then_lands():
    def rank_fn(comm):
        model, opt = build(comm, 3, 3, 0.5, 0)
        for t in range(3):
            step(model, opt, comm.rank, t)              # window launched at step 2
        in_flight = opt.window_in_flight
        for t in range(3, 6):                           # polled at 3 (pending), 4 (arrived), lands at 5
            step(model, opt, comm.rank, t)
        return in_flight, opt.ssd_stats.polls_pending >= 1, opt.ssd_stats.windows_landed
    # at least one poll finds it pending (more where the other thread has not launched yet)
    assert run_threads(2, rank_fn, pending_polls=1) == [(True, True, 1)] * 2


def test_the_collective_runs_on_the_deltas_own_buffer_and_the_stage_holds_three_copies():
    """No packing copy: the buffer the allreduce is given is the delta's storage (the missing-
    gradient flag goes in a collective of its own), and W, the snapshot and the delta are all
    the extra memory a lossless window holds."""
    def rank_fn(comm):
        model, opt = build(comm, 2, 2, 0.5, 1)
        for t in range(3):
            step(model, opt, comm.rank, t)
        state = opt._ssd_engine.state
        sent = [flats for name, flats in comm.sent if name.endswith(".delta")]
        same = all(f.data_ptr() == d.data_ptr() for f, d in zip(sent[-1], state.delta.buffers))
        model_bytes = sum(t.numel() * t.element_size() for t in problem.model_tensors(model))
        return same, len(sent[-1]), opt.extra_state_bytes, 3 * model_bytes
    for same, buffers, extra, three_copies in run_threads(2, rank_fn):
        assert same and buffers == 1 and extra == three_copies


# ---------------------------------------------------------------------------- non-finite windows
def test_nonfinite_delta_raises_and_leaves_global_weights_untouched():
    def rank_fn(comm):
        model, opt = build(comm, 2, 0, 0.5, 0)
        for t in range(2):
            step(model, opt, comm.rank, t)
        before = [w.clone() for w in opt.global_weights]
        if comm.rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="window launched at step 3 is not finite.*nonfinite='skip'"):
            for t in range(2, 4):
                step(model, opt, comm.rank, t)
        return all(torch.equal(a, b) for a, b in zip(opt.global_weights, before))
    assert run_threads(2, rank_fn) == [True, True]


def test_a_deferred_check_lands_a_nonfinite_delta_as_zero_and_raises_at_the_next_launch():
    """On CUDA a landing's checks are read on the host later (no drained queue): forced here. The
    verdict is read at the next launch, a step every rank reaches alike, so all stop there."""
    def rank_fn(comm):
        model, opt = build(comm, 4, 1, 0.5, 0)
        opt._ssd_engine.verdicts.defer = True
        for t in range(5):                            # windows launched at 3, 7, 11; the first lands at 4
            step(model, opt, comm.rank, t)
        before = [w.clone() for w in opt.global_weights]
        if comm.rank == 0:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        for t in range(5, 11):                        # the NaN window: launched at 7, landed (as zero) at 8
            step(model, opt, comm.rank, t)
        unchanged = all(torch.equal(a, b) for a, b in zip(opt.global_weights, before))
        pending = opt._ssd_engine.verdicts.pending is not None and opt.ssd_stats.windows_landed == 2
        with pytest.raises(FloatingPointError, match="window launched at step 7 is not finite"):
            step(model, opt, comm.rank, 11)
        return unchanged and pending
    assert run_threads(2, rank_fn) == [True, True]


@pytest.mark.parametrize("wire", ["none", "fp16", "bf16", "int8"])
def test_a_skipped_window_recovers_with_every_wire_format(wire):
    """One rank's weights go non-finite: the window is skipped on both ranks, that rank goes back to
    ``W``, and training goes on. The residual is the one from before the skipped window (its
    rounding never reached ``W``), so the next windows are finite."""
    def rank_fn(comm):
        model, opt = build(comm, 2, 2, 0.5, 1, nonfinite="skip", compression=getattr(Compression, wire))
        for t in range(6):                            # windows launched at 2, 4 (landed at 4, 6)
            step(model, opt, comm.rank, t)
        state = opt._ssd_engine.state
        if comm.rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        step(model, opt, comm.rank, 6)                # lands the window of 4, launches the NaN one
        residual = None if state.residual is None else [e.clone() for e in state.residual.buffers]
        for t in range(7, 9):                         # the NaN window lands at 8: skipped
            step(model, opt, comm.rank, t)            # (warnings are process-wide: not caught per thread)
        skipped = opt.ssd_stats.windows_skipped == 1
        kept = residual is None or all(torch.equal(a, b) for a, b in zip(state.residual.buffers, residual))
        for t in range(9, 16):
            step(model, opt, comm.rank, t)
        opt.finish()
        finite = all(bool(torch.isfinite(t).all()) for t in problem.model_tensors(model))
        return skipped, kept, finite, opt.ssd_stats.windows_skipped, [w.clone() for w in opt.global_weights]
    (s0, k0, f0, n0, w0), (s1, k1, f1, n1, w1) = run_threads(2, rank_fn)
    assert s0 and s1 and k0 and k1 and f0 and f1 and n0 == n1 == 1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_a_run_of_skipped_windows_raises_and_weights_and_momentum_come_back_finite():
    model = problem.make_model()
    opt = ssd_allreduce.DistributedOptimizer(
        problem.make_sgd(model.parameters()), named_parameters=model.named_parameters(),
        named_buffers=model.named_buffers(), sync_every=2, delay=0, warmup_steps=0, nonfinite="skip",
        max_skipped_windows=2, backend=LocalCommunicator())
    for t in range(2):
        step(model, opt, 0, t)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="window skipped"):
        for t in range(2, 4):
            step(model, opt, 0, t)
    assert all(torch.equal(p.detach(), w) for p, w in zip(opt._ssd_engine.params, opt.global_weights))
    assert all(bool(torch.isfinite(s["momentum_buffer"]).all()) for s in opt.state.values())
    with pytest.raises(FloatingPointError, match="and so were the 2 windows before it"):
        for t in range(4, 20):
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step(model, opt, 0, t)
    assert opt.ssd_stats.windows_skipped == 3     # the third in a row raised


# ---------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("name", ["fp16", "bf16", "int8"])
def test_error_feedback_sends_what_rounding_lost_with_the_next_window(name):
    """The wire carries Q(s - W + e); when the window lands, e becomes exactly what Q lost (sent +
    e = s - W + e_before, bit for bit); until then e is the one from before."""
    compression = getattr(Compression, name)
    model = problem.make_model()
    opt = ssd_allreduce.DistributedOptimizer(
        problem.make_sgd(model.parameters()), named_parameters=model.named_parameters(),
        named_buffers=model.named_buffers(), sync_every=2, delay=2, warmup_steps=0, compression=compression,
        backend=LocalCommunicator(pending_polls=10**6, mirrors=2))
    state = opt._ssd_engine.state
    before = None
    for launch in range(3):
        for t in range(2 * launch, 2 * launch + 2):      # a window launches at steps 1, 3, 5
            step(model, opt, 0, t)
        inflight = state.window.inflight
        sent = [compression.decompress(w, c).float() for w, c in zip(inflight.wire, inflight.contexts)]
        expected = [s - w for s, w in zip(state.snapshot.buffers, state.global_.buffers)]
        if before is not None:
            expected = [x + e for x, e in zip(expected, before)]
            assert all(torch.equal(e, b) for e, b in zip(state.residual.buffers, before))   # not yet updated
        assert all(torch.equal(x, d) for x, d in zip(expected, state.delta.buffers))       # s - W + e
        opt._ssd_engine.land(elapsed=2)      # what arrives is the mirrored average: what was sent
        assert all(torch.equal(q + e, x) for q, e, x in zip(sent, state.residual.buffers, expected))
        assert any(bool(e.abs().max() > 0) for e in state.residual.buffers)                 # it did round
        before = [e.clone() for e in state.residual.buffers]


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_hierarchical_error_feedback_keeps_what_the_nodes_shard_lost(name):
    """Two nodes of two ranks whose BatchNorm statistics differ inside the node: a rank sends its
    shard of the node's delta plus its residual, and after the landing its residual is exactly
    what rounding lost of that (x - Q^-1(Q(x))), not of its own statistics' delta."""
    compression = getattr(Compression, name)

    def rank_fn(comm):
        model, opt = build(comm, 2, 2, 0.5, 0, local_sync=True, compression=compression)
        stage = opt._ssd_engine
        sent, checked, launched, landed = None, 0, 0, 0
        for t in range(9):
            step(model, opt, comm.rank, t)
            if opt.ssd_stats.windows_landed != landed:
                landed = opt.ssd_stats.windows_landed
                for x, e in zip(sent, stage.shards.part(stage.state.residual)):
                    q, ctx = compression.compress(x)
                    assert torch.equal(e, x - compression.decompress(q, ctx).float())
                checked += 1
            if opt.ssd_stats.windows_launched != launched:
                launched = opt.ssd_stats.windows_launched
                sent = [p.clone() for p in stage.shards.part(stage.state.delta)]   # in flight: x itself
        return checked
    assert run_threads(4, rank_fn, ranks_per_node=2, pending_polls=10**6) == [3] * 4


# ---------------------------------------------------------------------------- checkpoints
def _run_and_save(comm, build_kw: dict, save_at: int, total: int) -> tuple[dict, list]:
    """(the state saved after step ``save_at``, the parameters after ``total`` steps)."""
    model, opt = build(comm, 3, 2, 0.5, 2, **build_kw)
    saved = None
    for t in range(total):
        step(model, opt, comm.rank, t)
        if t == save_at:
            saved = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    return saved, problem.model_tensors(model)


@pytest.mark.parametrize("kw, save_at", [(dict(compression=Compression.none), 5), (dict(compression=Compression.fp16), 5),
                                         (dict(compression=Compression.int8), 5), (dict(drift_correction=True), 8),
                                         (dict(optimizer="adamw", average_moments=True), 5)],
                         ids=["none", "fp16", "int8", "drift-correction", "averaged-moments"])
def test_a_checkpoint_with_a_window_in_flight_resumes_bit_for_bit(kw, save_at):
    """Saved after a launch (launches at 4, 7, 10, 13; the drift correction's after the first landing)."""
    full = run_threads(2, lambda comm: _run_and_save(comm, kw, save_at=save_at, total=14))
    assert full[0][0]["opt"]["ssd_sgd"]["window"]["launched_at"] == save_at - 1

    def resumed(comm):
        model, opt = build(comm, 3, 2, 0.5, 2, **kw)
        model.load_state_dict(full[comm.rank][0]["model"])
        opt.load_state_dict(full[comm.rank][0]["opt"])
        for t in range(save_at + 1, 14):
            step(model, opt, comm.rank, t)
        return problem.model_tensors(model)
    for (_, expected), got in zip(full, run_threads(2, resumed)):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_a_window_restored_from_a_checkpoint_still_reports_a_rank_that_stepped_without_gradients():
    def rank_fn(comm):
        model, opt = build(comm, 3, 2, 0.5, 2)
        for t in range(4):
            step(model, opt, comm.rank, t)
        if comm.rank == 1:
            opt.zero_grad()
            opt.step()                      # step 4, no gradients: the window launched now carries it
        else:
            step(model, opt, comm.rank, 4)
        saved = pickle.loads(pickle.dumps(opt.state_dict()))
        twin_model, twin = build(comm, 3, 2, 0.5, 2)
        twin_model.load_state_dict(model.state_dict())
        twin.load_state_dict(saved)
        with pytest.raises(RuntimeError, match="1 of 2 ranks called optimizer.step\\(\\) without any gradient at or "
                                               "before step 4"):
            for t in range(5, 7):             # lands at 6
                step(twin_model, twin, comm.rank, t)
        opt.discard_window()
        return saved["ssd_sgd"]["window"]["missing"]
    assert run_threads(2, rank_fn) == [0.5, 0.5]


def test_loading_a_state_reads_a_deferred_check_first_rather_than_forgetting_it():
    model = problem.make_model()
    opt = ssd_allreduce.DistributedOptimizer(
        problem.make_sgd(model.parameters()), named_parameters=model.named_parameters(), sync_every=2, delay=1,
        warmup_steps=0, backend=LocalCommunicator(mirrors=2))
    opt._ssd_engine.verdicts.defer = True
    for t in range(2):
        step(model, opt, 0, t)
    saved = opt.state_dict()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    for t in range(2, 5):                             # the NaN window launched at 3 lands (as zero) at 4
        step(model, opt, 0, t)
    assert opt._ssd_engine.verdicts.pending is not None
    with pytest.raises(FloatingPointError, match="window launched at step 3 is not finite"):
        opt.load_state_dict(saved)


def test_a_sharded_residual_is_refused_on_another_number_of_ranks_per_node():
    kw = dict(local_sync=True, compression=Compression.fp16)

    def save(comm):
        model, opt = build(comm, 3, 2, 0.5, 2, **kw)
        for t in range(9):
            step(model, opt, comm.rank, t)
        opt.finish()
        return opt.state_dict()
    states = run_threads(4, save, ranks_per_node=2)
    assert states[1]["ssd_sgd"]["shard"] == [1, 2] and states[1]["ssd_sgd"]["residual"] is not None

    def load(comm):
        _, opt = build(comm, 3, 2, 0.5, 2, **kw)
        opt.load_state_dict(states[comm.rank])
    errors = run_threads(4, load, ranks_per_node=1, expect_errors=True)
    assert all(isinstance(e, ValueError) and "another number of ranks per node" in str(e) for e in errors), errors


# ---------------------------------------------------------------------------- AMP with nodes
def test_gradscaler_without_synchronize_is_refused_on_every_rank_with_local_sync():
    """Each rank's scaler would see only its own overflows before the node's average, and the
    node's ranks would stop sharing their weights: refused with Horovod's pattern as the fix."""
    def rank_fn(comm):
        model, opt = build(comm, 2, 2, 0.5, 1, local_sync=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
        for t in range(3):
            x, y = problem.batch(comm.rank, t)
            opt.zero_grad()
            scaler.scale(problem.loss_fn(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
    errors = run_threads(4, rank_fn, ranks_per_node=2, expect_errors=True)
    assert all(isinstance(e, RuntimeError) and "skip_synchronize()" in str(e) for e in errors), errors


# ---------------------------------------------------------------------------- ranks joining
def test_a_rank_that_joins_a_self_tuned_run_makes_the_same_collectives_as_the_survivor():
    """Elastic scale-up, 1 -> 2, with sync_every="auto" while the choice still waits for timed
    steps (the survivor resumed at the end of the warm-up). Whether a launch re-checks the window
    is the clock's, which the joining rank adopts from rank 0, so both make the same collective
    there; a rank deciding from its own timings made Horovod wait forever."""
    def warmup(comm):
        model, opt = build(comm, "auto", None, 0.5, 6)
        for t in range(6):
            step(model, opt, 0, t)
        return model.state_dict(), opt.state_dict()
    model_state, opt_state = run_threads(1, warmup)[0]

    def survivor_alone(comm):   # resumed alone: the delay stage starts with a provisional window
        model, opt = build(comm, "auto", None, 0.5, 6)
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        for t in range(6, 8):
            step(model, opt, 0, t)
        return comm, model, opt
    survivor_comm, model, opt = run_threads(1, survivor_alone)[0]
    assert opt._ssd_engine.clock.check_due()          # the next launch re-checks

    def scaled_up(comm):
        if comm.rank == 0:   # the survivor's communicator now spans the new world (Horovod re-initialised)
            survivor_comm.world, survivor_comm.size, survivor_comm.seq = comm.world, comm.size, 0
            opt.membership_changed()
            mine_model, mine = model, opt
        else:
            mine_model, mine = build(comm, "auto", None, 0.5, 6, local_sync=False)   # as under elastic
            mine_model.load_state_dict(model_state)
        for t in range(8, 8 + 12):
            step(mine_model, mine, comm.rank, t)
        mine.finish()
        return mine._ssd_engine.clock.as_tuple(), [w.clone() for w in mine.global_weights]
    (clock0, w0), (clock1, w1) = run_threads(2, scaled_up)
    assert clock0 == clock1 and all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_a_fresh_rank_takes_rank_0s_averaged_moments_or_every_rank_says_one_holds_none():
    """Horovod's resume with averaged moments: rank 0 loads the checkpoint, the others receive
    the wrapped optimizer's state (``hvd.broadcast_optimizer_state``) and take rank 0's choice of
    the moments that travel; a rank whose optimizer holds none of them stops every rank with the
    fix, where it used to raise alone and leave the others waiting."""
    def first(comm):
        model, opt = build(comm, 3, 3, 1.0, 2, optimizer="adamw", average_moments=True)
        for t in range(7):
            step(model, opt, comm.rank, t)
        return model.state_dict(), opt.state_dict()
    model_state, opt_state = run_threads(2, first)[0]
    plain = {k: v for k, v in opt_state.items() if k != "ssd_sgd"}   # as the broadcast leaves it

    def resumed(comm, broadcast: bool):
        model, opt = build(comm, 3, 3, 1.0, 2, optimizer="adamw", average_moments=True)
        model.load_state_dict(model_state)
        if comm.rank == 0 or broadcast:
            opt.load_state_dict(copy.deepcopy(opt_state if comm.rank == 0 else plain))
        for t in range(7, 12):
            step(model, opt, comm.rank, t)
        opt.finish()
        return opt._ssd_engine.moments.keys, [b.clone() for b in opt._ssd_engine.state.global_.buffers]
    (keys0, w0), (keys1, w1) = run_threads(2, lambda comm: resumed(comm, True))
    assert keys0 == keys1 == [tuple(k) for k in opt_state["ssd_sgd"]["moments"]]
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    errors = run_threads(2, lambda comm: resumed(comm, False), expect_errors=True)
    assert all(isinstance(e, ValueError) and "rank 1's optimizer holds no state for" in str(e) for e in errors), errors


def test_threaded_ranks_that_call_different_collectives_raise_rather_than_hang():
    def rank_fn(comm):
        if comm.rank == 0:
            comm.allgather_object("choice")
        else:
            comm.synchronize(comm.allreduce_async_([torch.ones(2)], name="delta"))
    errors = run_threads(2, rank_fn, expect_errors=True)
    assert all(isinstance(e, CollectiveMismatch) for e in errors), errors


# ---------------------------------------------------------------------------- ranks that disagree
@pytest.mark.parametrize("what, message", [
    ("settings", "rank 1 runs SSD-SGD with other settings than rank 0 (rank 0 vs rank 1: sync_every: 2 vs 3; "
                 "delay: 2 vs 3): pass the same settings on every rank"),
    ("model", "rank 1's model differs from rank 0's at tensor #4: rank 0 has ('4.bias', (10,), 'torch.float32'), "
              "rank 1 has ('4.bias', (12,), 'torch.float32') (name, shape, dtype); every rank must build the same model"),
    ("cast", "rank 0: parameter '0.bias' is now torch.float64 on cpu, it was torch.float32 on cpu when the optimizer was "
             "built: the model was moved or cast after wrapping"),
])
def test_ranks_that_built_different_optimizers_all_stop_at_the_first_step_with_the_same_error(what, message):
    def rank_fn(comm):
        odd = comm.rank == 1
        with _seeding:
            model = problem.make_model()
        if what == "model" and odd:
            model[4] = torch.nn.Linear(4 * 6 * 6, 12)
        opt = ssd_allreduce.DistributedOptimizer(problem.make_sgd(model.parameters()),
                                                 named_parameters=model.named_parameters(), backend=comm,
                                                 sync_every=3 if what == "settings" and odd else 2, warmup_steps=2)
        x, y = problem.batch(comm.rank, 0)
        if what == "cast":
            model.double()
            x = x.double()
        problem.loss_fn(model(x)[:, :10], y).backward()
        opt.step()
    errors = run_threads(2, rank_fn, expect_errors=True)
    assert all(isinstance(e, (ValueError, RuntimeError)) and message in str(e) for e in errors), errors


@pytest.mark.parametrize("at, stop, launched", [(2, 2, 2), (5, 7, 5)], ids=["warm-up", "delay stage"])
def test_a_step_without_gradients_on_one_rank_stops_every_rank_with_the_same_error(at, stop, launched):
    """In the warm-up the flag rides with the gradients (all stop at once); after it, with the
    window launched at step 5, which lands 2 steps later."""
    def rank_fn(comm):
        model, opt = build(comm, 3, 2, 0.5, 3)
        for t in range(10):
            if t == at and comm.rank == 1:
                opt.zero_grad()
                try:
                    opt.step()
                except RuntimeError as exc:
                    return t, str(exc)
                continue
            try:
                step(model, opt, comm.rank, t)
            except RuntimeError as exc:
                return t, str(exc)
    message = (f"1 of 2 ranks called optimizer.step() without any gradient at or before step {launched}: call "
               "loss.backward() before optimizer.step() on every rank")
    assert run_threads(2, rank_fn) == [(stop, message)] * 2


def test_with_adamw_and_the_same_data_on_every_rank_k1_d0_is_synchronous_adamw():
    """Where every rank sees the same gradient, the local moments agree and the averaged AdamW
    steps are synchronous AdamW's, step for step."""
    def rank_fn(comm):
        model, opt = build(comm, 1, 0, 0.5, 0, optimizer="adamw", local_lr_scale=1.0)
        after = []
        for t in range(STEPS):
            step(model, opt, 0, t)
            after.append(problem.model_tensors(model))
        return after
    with _seeding:
        alone = problem.make_model()
    adamw = problem.make_adamw(alone.parameters())
    for t, (mine, theirs) in enumerate(zip(*run_threads(2, rank_fn))):
        step(alone, adamw, 0, t)
        expected = problem.model_tensors(alone)
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")
        torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_a_state_of_the_previous_format_loads_as_without_drift_correction_and_an_older_one_is_refused():
    def rank_fn(comm):
        model, opt = build(comm, 2, 2, 0.5, 1)
        for t in range(5):
            step(model, opt, comm.rank, t)
        opt.finish()
        saved = pickle.loads(pickle.dumps(opt.state_dict()))
        ssd = saved["ssd_sgd"]
        ssd["version"] = 3    # as the previous release wrote it: no drift correction anywhere
        for key in ("drift_correction", "drift_correction_before", "drift_known"):
            del ssd[key]
        del ssd["settings"]["drift_correction"]
        _, fresh = build(comm, 2, 2, 0.5, 1)
        fresh.load_state_dict(saved)
        same = all(torch.equal(a, b) for a, b in zip(fresh.global_weights, opt.global_weights))
        ssd["version"] = 2
        with pytest.raises(ValueError, match="SSD-SGD state version 2 is not 4: it was written by another"):
            build(comm, 2, 2, 0.5, 1)[1].load_state_dict(saved)
        return same
    assert run_threads(2, rank_fn) == [True, True]


def _auto_warmup_run(comm, steps: int, save_at: Optional[int] = None, state: Optional[dict] = None):
    """A rank with warmup_steps="auto" (2:1): its parameters after each step, its warm-up's end,
    and its state saved after step ``save_at`` (or resumed from ``state`` after it)."""
    model, opt = build(comm, 2, 1, 0.5, "auto")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = save_at + 1
    after, saved = [], None
    for t in range(start, steps):
        step(model, opt, comm.rank, t)
        after.append(problem.model_tensors(model))
        if t == save_at and state is None:
            saved = pickle.loads(pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict()}))
    opt.finish()
    return {"after_step": after, "end": opt.warmup_end, "saved": saved, "final": problem.model_tensors(model)}


def test_an_auto_warm_up_ends_where_the_simulator_ends_it_then_follows_the_reference():
    """Every rank ends the warm-up at the step the simulator (the same rule on exact means) ends
    it, and the run is the reference's with that many synchronous steps."""
    from ssd_allreduce.simulator import Simulator
    ranks = run_threads(4, lambda comm: _auto_warmup_run(comm, 16))
    sim = Simulator(problem.make_model(), problem.OPTIMIZERS["sgd"], 4, sync_every=2, delay=1,
                    warmup_steps="auto", glu_beta=0.5)
    for t in range(16):
        sim.step([problem.batch(r, t) for r in range(4)], problem.loss_fn)
    assert sim.warmup.end is not None and [r["end"] for r in ranks] == [sim.warmup.end] * 4
    assert_matches_reference(ranks, (2, 1, 0.5, sim.warmup.end))


def test_an_auto_warm_up_over_two_nodes_reads_every_rank_then_follows_the_hierarchical_reference():
    ranks = train(4, (2, 1, 0.5, "auto"), steps=16, ranks_per_node=2, local_sync=True)
    ends = {r["stats"]["warmup_allreduces"] for r in ranks}   # one per warm-up step, across all 4 ranks
    flat = run_threads(4, lambda comm: _auto_warmup_run(comm, 16))
    assert ends == {flat[0]["end"]}
    assert_matches_reference(ranks, (2, 1, 0.5, flat[0]["end"]), ranks_per_node=2)


def test_an_auto_warm_up_saved_before_its_end_resumes_bit_for_bit():
    """Saved at step 5, before the noise's horizon: the resumed ranks carry its running means on."""
    full = run_threads(2, lambda comm: _auto_warmup_run(comm, 14, save_at=5))
    assert full[0]["saved"]["opt"]["ssd_sgd"]["warmup"]["steps"] == 6
    resumed = run_threads(2, lambda comm: _auto_warmup_run(comm, 14, save_at=5, state=full[comm.rank]["saved"]))
    for whole, part in zip(full, resumed):
        assert part["end"] == whole["end"] is not None
        assert all(torch.equal(a, b) for a, b in zip(whole["final"], part["final"]))


@pytest.mark.parametrize("explicit", [False, True], ids=["step", "synchronize-then-step"])
def test_a_fresh_rank_takes_rank_0s_auto_warm_up_reading(explicit):
    """Rank 0 resumes a checkpoint saved in the warm-up, rank 1 starts afresh (Horovod's resume,
    or a rank that joined): both end the warm-up where an uninterrupted run does, also where the
    loop averages first (``synchronize()``, then ``step()`` under ``skip_synchronize()``)."""
    full = run_threads(2, lambda comm: _auto_warmup_run(comm, 14, save_at=5))

    def rank_fn(comm):
        model, opt = build(comm, 2, 1, 0.5, "auto")
        saved = full[0]["saved"]
        model.load_state_dict(saved["model"])   # the weights as hvd.broadcast_parameters gives them
        if comm.rank == 0:
            opt.load_state_dict(saved["opt"])
        for t in range(6, 14):
            if not explicit:
                step(model, opt, comm.rank, t)
                continue
            x, y = problem.batch(comm.rank, t)
            opt.zero_grad()
            problem.loss_fn(model(x), y).backward()
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()
        return opt.warmup_end
    assert run_threads(2, rank_fn) == [full[0]["end"]] * 2
