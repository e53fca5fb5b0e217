"""The training driver as users run it: real launchers, resume, bad input (every mode learning the
digits is the short comparison of test_bench.py)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from launchers import PYTHON, REPO, horovodrun, launcher_env, mpirun, run_bounded, run_ranks, torchrun
from ssd_allreduce.train.data import write_cifar10_fixture
from ssd_allreduce.train.runlog import latest_summary as summary

TRAIN = ["-m", "ssd_allreduce.train", "--no-progress", "--data", "digits", "--model", "cnn"]


def final_states(run: Path, ranks: int) -> list[dict]:
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return [torch.load(latest / f"rank-{r}.pt", weights_only=False) for r in range(ranks)]


def test_an_auto_window_and_int8_deltas_learn_the_digits(tmp_path):
    """The window the ranks agreed on is in the summary and was used: 10 x 22 steps, 20 of warm-up;
    it lands after the fewest steps that hide its allreduce (at most k). Without OMP_NUM_THREADS
    the two ranks share this machine's CPUs."""
    run = tmp_path / "auto"
    out = run_ranks(horovodrun(2, *TRAIN, "--mode", "ssd", "--sync-every", "auto", "--compression", "int8",
                               "--epochs", "10", "--warmup-steps", "20", "--out", str(run)),
                    env={"OMP_NUM_THREADS": None})
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    alone = subprocess.run([PYTHON, "-c", "import torch; print(torch.get_num_threads())"], text=True, check=True,
                           capture_output=True, env=launcher_env({"OMP_NUM_THREADS": None}), timeout=60)
    default, share = int(alone.stdout), max(1, len(os.sched_getaffinity(0)) // 2)   # torch's own, the ranks'
    assert start["threads"] == min(default, share), (start, default)
    assert ("2 rank(s) on this node: " in out) == (share < default), out
    s = summary(run)
    k = s["ssd_stats"]["sync_every"]
    assert 1 <= k <= 16 and 1 <= s["ssd_stats"]["delay"] <= k and s["test_accuracy"] >= 0.85, s
    assert s["ssd_stats"]["windows_launched"] >= (10 * 22 - 20) // 16


def test_adamw_with_averaged_moments_learns_the_digits(tmp_path):
    """SSD-SGD with its moments averaged (--average-moments): they travel in the windows; its
    warm-up ends where the ranks' gradient noise reaches their number (--warmup-steps auto).
    (Horovod's mode with AdamW: the GPT comparison in test_bench.py.)"""
    run = tmp_path / "ssd"
    run_ranks(horovodrun(2, *TRAIN, "--mode", "ssd", "--optimizer", "adamw", "--lr", "0.002", "--epochs", "4",
                         "--average-moments", "--warmup-steps", "auto", "--out", str(run)))
    assert summary(run)["test_accuracy"] >= 0.9, summary(run)
    state = final_states(run, 2)[0]["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["state"].values())))
    # W holds the parameters, the float buffers and both moments of every parameter
    ssd, model = state["ssd_sgd"], final_states(run, 2)[0]["model"]
    assert ssd["settings"]["average_moments"] and {key for _, key in ssd["moments"]} == {"exp_avg", "exp_avg_sq"}
    moments = sum(s[key].numel() for s in state["state"].values() for key in ("exp_avg", "exp_avg_sq"))
    assert moments == 2 * sum(p.numel() for name, p in model.items() if name in ssd["names"] and "running" not in name)
    assert sum(w.numel() for w in ssd["global_weights"]) == sum(model[n].numel() for n in ssd["names"]) + moments
    end = ssd["warmup"]["end"]   # every step of the warm-up averaged the gradients, none after it
    assert 10 <= end < summary(run)["steps"] and ssd["stats"]["warmup_allreduces"] == end, ssd["warmup"]


GPT = ["-m", "ssd_allreduce.train", "--no-progress", "--data", "stdlib", "--model", "gpt", "--corpus-bytes", "300000",
       "--context", "32", "--gpt-width", "64", "--gpt-layers", "2", "--epochs", "1", "--checkpoint-every", "0"]


def test_a_gpt_learns_the_standard_library_with_adamw_and_by_package_shards(tmp_path):
    """Each rank its own packages, with the drift correction: each rank keeps (and saves) its own."""
    run_ranks(horovodrun(2, *GPT, "--mode", "ssd", "--optimizer", "adamw", "--lr", "0.003", "--no-lr-scaling",
                         "--shards", "by-package", "--max-steps", "60", "--eval-every", "20", "--eval-samples", "256",
                         "--warmup-steps", "10", "--drift-correction", "--out", str(tmp_path)))
    saved = [state["optimizer"]["ssd_sgd"] for state in final_states(tmp_path, 2)]
    assert all(s["settings"]["drift_correction"] for s in saved)
    own = [torch.cat([b.flatten() for b in s["drift_correction"]]) for s in saved]
    assert own[0].abs().max() > 0 and not torch.equal(own[0], own[1])
    assert torch.equal(saved[0]["global_weights"][0], saved[1]["global_weights"][0])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r["test_loss"] for r in records if r["kind"] == "eval"]
    assert len(curve) == 3 and curve[0] > curve[-1] and curve[-1] < 3.3, curve   # ln 256 = 5.55 at the start
    s = summary(tmp_path)
    assert s["ssd_stats"]["windows_landed"] >= 9 and s["steps"] == 60, s


def test_ranks_with_different_corpora_all_stop_saying_why(tmp_path):
    """Each rank builds the corpus from its own Python: here rank 1's is another size."""
    cmd = " ".join([PYTHON, *GPT, "--max-steps", "2", "--out", str(tmp_path),
                    "--corpus-bytes", "$((300000 + 1000 * HOROVOD_RANK))"])
    proc = run_bounded(horovodrun(2)[:-1] + ["bash", "-c", f"exec {cmd}"], env=launcher_env(),
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    for rank in (0, 1):
        assert f"rank {rank}: the standard-library corpus of rank(s) [1] differs from rank 0's" in proc.stdout, proc.stdout
    assert proc.returncode != 0


def test_torchrun_ssd_and_ddp(tmp_path):
    for mode in ("ssd", "ddp"):
        run_ranks(torchrun(2, *TRAIN, "--mode", mode, "--backend", "torch", "--epochs", "10",
                           "--warmup-steps", "20", "--out", str(tmp_path / mode)))
        assert summary(tmp_path / mode)["test_accuracy"] >= 0.85


def test_mpirun_with_the_mpi4py_backend(tmp_path):
    run_ranks(mpirun(2, *TRAIN, "--mode", "ssd", "--backend", "mpi", "--epochs", "10", "--warmup-steps", "20",
                     "--out", str(tmp_path / "mpi")))
    assert summary(tmp_path / "mpi")["test_accuracy"] >= 0.85


def _where(state: dict) -> tuple[int, int, int]:
    return tuple(state["position"][k] for k in ("epoch", "step_in_epoch", "global_step"))


def _assert_same_final_weights(a: Path, b: Path) -> None:
    for x, y in zip(final_states(a, 2), final_states(b, 2)):
        assert _where(x) == _where(y)
        for name, tensor in x["model"].items():
            assert torch.equal(tensor, y["model"][name]), name
        assert x["optimizer"]["ssd_sgd"]["step"] == y["optimizer"]["ssd_sgd"]["step"]


SSD_RUN = ["--mode", "ssd", "--epochs", "3", "--warmup-steps", "10", "--sync-every", "4", "--delay", "3",
           "--signal-check-every", "1"]
# a fixed delay: "auto" would choose from each run's own timings, and the runs compared differ


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """SSD_RUN from start to end: what a preempted and resumed run must end with."""
    full = tmp_path_factory.mktemp("uninterrupted")
    run_ranks(horovodrun(2, *TRAIN, *SSD_RUN, "--out", str(full)))
    return full


def test_preempted_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path, uninterrupted):
    cut = tmp_path / "cut"
    out = run_ranks(horovodrun(2, *TRAIN, *SSD_RUN, "--out", str(cut), "--preempt-at-step", "31"))
    assert "checkpoint" in out and "written at step 31" in out      # mid-epoch 1, window in flight
    state = final_states(cut, 2)[0]
    assert _where(state) == (1, 9, 31) and state["position"]["train_seconds"] > 0
    assert state["optimizer"]["ssd_sgd"]["window"] is not None
    run_ranks(horovodrun(2, *TRAIN, *SSD_RUN, "--out", str(cut), "--resume"))
    _assert_same_final_weights(uninterrupted, cut)


def test_a_real_sigusr1_checkpoints_and_resume_matches(tmp_path, uninterrupted):
    """SIGUSR1 to both ranks of a run under way, once its first epoch's records are written. Rank
    1 sleeps 20 x its compute each step (the weights do not change: the window's delay is fixed),
    so the signal lands long before the run's 66 steps end; without periodic checkpoints, the
    preemption's is the one to resume from."""
    cut = tmp_path / "cut"
    args = [*SSD_RUN, "--checkpoint-every", "0", "--out", str(cut)]
    slow = ["--slow-rank", "1", "--slow-fraction", "20"]
    proc = subprocess.Popen(horovodrun(2, *TRAIN, *args, *slow), env=launcher_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = cut / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.exists() or '"kind": "epoch"' not in metrics.read_text()):
            time.sleep(0.1)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.name().startswith("python") and p.cmdline()[1:3] == ["-m", "ssd_allreduce.train"]]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        for p in ranks:
            os.kill(p.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:   # the launcher's session (Horovod's middleman then ends the ranks)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "preemption signal" in out, out
    preempted = [json.loads(line) for line in metrics.read_text().splitlines() if '"preempted"' in line]
    assert preempted and preempted[0]["step"] < 3 * 22
    run_ranks(horovodrun(2, *TRAIN, *args, "--resume"))
    _assert_same_final_weights(uninterrupted, cut)


def test_cifar10_directory_trains_resnet20(tmp_path):
    write_cifar10_fixture(tmp_path / "cifar", n_train_per_batch=40, n_test=40)
    run_ranks(horovodrun(2, "-m", "ssd_allreduce.train", "--no-progress", "--data", "cifar10", "--data-dir",
                         str(tmp_path / "cifar"), "--model", "resnet20", "--augment", "--batch-size", "16",
                         "--epochs", "1", "--warmup-steps", "2", "--out", str(tmp_path / "run")))
    s = summary(tmp_path / "run")
    assert s["steps"] == (5 * 40 // 2) // 16 and s["parameter_bytes"] == 269_722 * 4


def _single(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_bounded([PYTHON, *TRAIN, "--epochs", "2", *args], env=launcher_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> Path:
    """One process, 3 epochs, a checkpoint after each (steps 44, 88, 132): the run the
    checkpoint tests damage, plant into or resume differently, each in a copy of its own."""
    run = tmp_path_factory.mktemp("three-epochs") / "run"
    r = _single(run.parent, "--out", str(run), "--epochs", "3", "--keep-checkpoints", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    return run


@pytest.fixture
def run_copy(tmp_path, three_epochs) -> Path:
    return Path(shutil.copytree(three_epochs, tmp_path / "run"))


def test_missing_cifar10_names_the_expected_files(tmp_path):
    r = _single(tmp_path, "--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "data_batch_1" in r.stderr and "test_batch" in r.stderr


def test_damaged_newest_checkpoints_are_passed_over_for_the_newest_intact_one(tmp_path, run_copy):
    """The newest checkpoint overwritten with garbage, the one before it truncated: both are passed
    over, each named, for the oldest."""
    run = run_copy
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000044", "step-00000088", "step-00000132"]
    (checkpoints[-1] / "rank-0.pt").write_bytes(b"not a checkpoint")
    truncated = checkpoints[-2] / "rank-0.pt"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    r = _single(tmp_path, "--out", str(run), "--resume", "--epochs", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    for damaged in checkpoints[1:]:
        assert f"passed over a damaged checkpoint: {damaged}" in r.stdout, r.stdout
    assert r.stdout.count("is corrupt or truncated") == 2, r.stdout
    assert f"resumed from {checkpoints[0]} at epoch 1, step 44" in r.stdout
    assert summary(run)["steps"] == 4 * 44
    # only damaged ones left: every rank stops, naming each and what to do
    for c in sorted((run / "checkpoints").glob("step-*")):
        (c / "rank-0.pt").write_bytes(b"x")
    r = _single(tmp_path, "--out", str(run), "--resume", "--epochs", "5")
    assert r.returncode != 0 and "no intact checkpoint to resume from" in r.stderr


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_later_ones(tmp_path, run_copy):
    run = run_copy
    r = _single(tmp_path, "--out", str(run), "--resume", str(run / "checkpoints" / "step-00000044"),
                "--epochs", "2", "--keep-checkpoints", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(c.name for c in (run / "checkpoints").glob("step-*")) == ["step-00000044", "step-00000088"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000088"
    # alone nothing is sent: the payload per step is 0, not the warm-up's gradients subtracted
    assert summary(run)["bytes_per_step"] == 0 and summary(run)["ssd_stats"]["warmup_bytes_allreduced"] == 0


class Payload:
    """Unpickled, it runs ``command``: what a checkpoint planted by someone else could hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, run_copy):
    """A file planted in a shared run directory, even with a matching checksum in the manifest,
    is not unpickled: loading accepts tensors and plain values only."""
    run, marker = run_copy, tmp_path / "executed"
    directory = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    torch.save({"model": Payload(f"touch {marker}")}, directory / "rank-0.pt")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["rank-0.pt"] = hashlib.sha256((directory / "rank-0.pt").read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    # the planted one alone: every rank stops, saying why
    alone = Path(shutil.copytree(run, tmp_path / "alone"))
    for older in sorted((alone / "checkpoints").glob("step-*"))[:-1]:
        shutil.rmtree(older)
    r = _single(tmp_path, "--out", str(alone), "--resume", "--epochs", "4")
    assert r.returncode != 0 and "was refused: it holds more than tensors and plain values" in r.stderr
    assert not marker.exists()
    # beside intact ones: passed over, as a damaged one is, for the newest intact one
    r = _single(tmp_path, "--out", str(run), "--resume", "--epochs", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "was refused: it holds more than tensors and plain values" in r.stdout and not marker.exists()
    assert f"resumed from {run / 'checkpoints' / 'step-00000088'} at epoch 2, step 88" in r.stdout


def test_an_unwritable_checkpoint_directory_stops_every_rank_before_the_first_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_bounded(horovodrun(2, *TRAIN, "--out", str(blocker / "run")), env=launcher_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert re.search(rf"\[{rank}\]<stderr>:.*cannot write checkpoints to {blocker}/run/checkpoints "
                         rf"\(rank 0: NotADirectoryError.*rank 1: NotADirectoryError", proc.stdout), proc.stdout
    assert '"kind": "step"' not in proc.stdout


def test_checkpoint_of_another_model_or_world_size_is_refused(tmp_path, run_copy):
    run = run_copy
    r = _single(tmp_path, "--out", str(run), "--resume", "--epochs", "4", "--model", "mlp")
    assert r.returncode != 0 and "its model is 'cnn', this run's is 'mlp'" in r.stderr
    out = run_bounded(horovodrun(2, *TRAIN, "--epochs", "4", "--out", str(run), "--resume"), env=launcher_env(),
                      capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "written by 1 ranks and this job has 2" in out.stdout + out.stderr


# the flags' checks (check_args, the SSD-SGD settings, the shards) run in this process: tests/unit/test_options.py


@pytest.mark.timed   # beside another test's ranks, the sleeping rank was given the cores and ran ahead
def test_a_straggler_rank_computes_slower_by_the_fraction_asked(tmp_path):
    """--slow-rank/--slow-fraction (the benchmark's too): alone (no-comm), rank 1 runs at
    about 1 / (1 + fraction) of rank 0's pace; sleeps of a millisecond overshoot on a busy 2-core
    machine, so the bounds are loose, but a slowdown that compounds step after step fails them."""
    run_ranks(horovodrun(2, *TRAIN, "--mode", "no-comm", "--epochs", "2", "--warmup-steps", "0",
                         "--out", str(tmp_path / "run"),
                         "--slow-rank", "1", "--slow-fraction", "1.0"))
    fast, slow = summary(tmp_path / "run")["rank_images_per_sec"]
    assert 0.15 < slow / fast < 0.75, (fast, slow)


def test_gpu_training_through_a_horovod_without_nccl_is_refused_with_what_to_do():
    from ssd_allreduce.train.launch import check_horovod_gpu_support

    check_horovod_gpu_support(use_cuda=False, nccl_built=False)     # CPU training needs no NCCL
    check_horovod_gpu_support(use_cuda=True, nccl_built=True)
    with pytest.raises(SystemExit, match="built without NCCL.*--backend torch"):
        check_horovod_gpu_support(use_cuda=True, nccl_built=False)


def test_slurm_task_count_is_checked_only_where_srun_started_the_ranks_itself():
    from ssd_allreduce.train.launch import check_slurm_step

    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}
    check_slurm_step(4, "horovod", step)                                   # srun --mpi=pmix: one job of 4
    with pytest.raises(SystemExit, match=r"srun started 4 tasks .* has 1 rank\(s\) through horovod.*--mpi=pmix"):
        check_slurm_step(1, "horovod", step)                               # 4 tasks, each alone
    with pytest.raises(SystemExit, match="has 2 rank"):
        check_slurm_step(2, "mpi", step)
    check_slurm_step(1, "horovod", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})    # the batch step: no srun step
    # launchers that run one srun task per node and start the ranks themselves
    for launcher in ({"HOROVOD_RANK": "0"}, {"TORCHELASTIC_RUN_ID": "x"}, {"OMPI_COMM_WORLD_SIZE": "8"},
                     {"MPI_LOCALNRANKS": "4"}, {"WORLD_SIZE": "8"}):   # the last: set by hand in `srun --pty`
        check_slurm_step(8, "horovod", {**step, **launcher})


def test_training_driver_on_emulated_nodes(tmp_path):
    """``python -m ssd_allreduce.train`` under horovodrun, each rank told its node by $SSD_NODE:
    the automatic choice turns hierarchical SSD-SGD on, and the run learns."""
    out = tmp_path / "run"
    train = (f"SSD_NODE=node$((HOROVOD_RANK / 2)) exec {sys.executable} -m ssd_allreduce.train --no-progress "
             f"--mode ssd --epochs 3 --warmup-steps 10 --out {out}")
    log = run_ranks(horovodrun(4)[:-1] + ["bash", "-c", train], timeout=270)
    assert log.count("hierarchical SSD-SGD on 2 node(s) x 2 rank(s)") == 1   # said once, by rank 0
    s = summary(out)
    assert s["local_sync_nodes"] == "2 node(s) x 2 rank(s)", s
    assert s["test_accuracy"] >= 0.9 and s["ssd_stats"]["node_allreduces"] > 0
