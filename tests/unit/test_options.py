"""The command lines' flag checks, in this process: the driver's parser, ``check_args`` and the
SSD-SGD settings it checks; the benchmarks' parsers and checks. What a user sees is the message
of the SystemExit (or of argparse's error on stderr)."""
from __future__ import annotations

import argparse
import inspect
import math
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from ssd_allreduce import DistributedOptimizer, SSDSettings
from ssd_allreduce.bench import cli as bench_cli
from ssd_allreduce.bench import compare, costmodel, language, nodecost
from ssd_allreduce.settings import DEFAULT_WARMUP_STEPS
from ssd_allreduce.train import driver
from ssd_allreduce.train.options import WARMUP_EPOCH, build_parser, check_args, warmup_steps_for

DIGITS = ["--data", "digits", "--model", "cnn", "--epochs", "2"]
ELASTIC = ["--elastic", "--commit-every", "10", "--warmup-steps", "10", "--sync-every", "4", "--epochs", "400"]


def refusal(capsys: pytest.CaptureFixture[str], call, *args) -> str:
    """What ``call(*args)`` says when it refuses its input: a SystemExit's message, an argparse
    error on stderr, or a ValueError's message; fails when it accepts."""
    try:
        call(*args)
    except SystemExit as exc:
        assert exc.code != 0, "exited with status 0"
        return f"{exc.code if isinstance(exc.code, str) else ''}{capsys.readouterr().err}"
    except ValueError as exc:
        return str(exc)
    pytest.fail(f"{call.__name__}{args} accepted its input")


def start_training(*flags: str, size: int = 1) -> argparse.Namespace:
    """What the driver does with its flags before the first step, up to loading the data: parse,
    check for a job of ``size`` ranks (the backend alone: "horovod" unless one is named), shard."""
    args = build_parser().parse_args(list(flags))
    check_args(args, "horovod" if args.backend == "auto" else args.backend, size)
    driver.load_data(args, SimpleNamespace(size=size, rank=0))
    return args


@pytest.mark.parametrize("flags, message", [
    (["--sync-every", "0"], "--sync-every must be >= 1, got 0"),
    (["--sync-every", "4", "--delay", "9"], "--delay must be an integer in [0, --sync-every=4], got 9"),
    (["--glu-beta", "2"], "--glu-beta must be a number in [0, 1], got 2.0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    (["--batch-size", "5000"], "batch_size 5000 is larger than the shard"),
    (["--slow-rank", "3"], "--slow-rank must be a rank below 1 and --slow-fraction >= 0, got 3 and 0.0"),
    (["--slow-rank", "0", "--slow-fraction", "-1"], "--slow-fraction >= 0, got 0 and -1.0"),
    (["--model", "gpt"], "--model gpt trains on --data stdlib and nothing else"),
    (["--data", "stdlib", "--model", "gpt", "--shards", "label-skew"],
     "--shards label-skew does not apply to --data stdlib: use label-skew for images, by-package for stdlib"),
    (["--shards", "by-package"], "--shards by-package does not apply to --data digits"),
    (["--data", "stdlib", "--model", "gpt", "--gpt-width", "30"], "--gpt-width (30) must be a multiple of --gpt-heads (4)"),
    (["--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--mode", "local-sgd", "--sync-every", "auto"], "--sync-every auto and --delay auto tune SSD-SGD's window"),
    (["--sync-every", "auto", "--warmup-steps", "2"], "--warmup-steps must be >= 5, got 2"),
    (["--sync-every", "often"], "argument --sync-every: expected an integer or auto, got 'often'"),
    (["--warmup-steps", "soon"], "argument --warmup-steps: expected an integer or epoch, got 'soon'"),
    (["--fp16-allreduce", "--compression", "int8"], "--fp16-allreduce is --compression fp16; it contradicts"),
    (["--mode", "horovod", "--compression", "int8"], "--compression int8 is SSD-SGD's"),
    (["--mode", "ddp", "--backend", "horovod"], "--mode ddp needs torch.distributed"),
    (["--mode", "horovod", "--backend", "torch"], "--mode horovod needs the Horovod backend"),
    (["--data", "cifar10"], "--data cifar10 needs --data-dir"),
])
def test_out_of_range_flags_say_what_to_change(capsys, flags, message):
    assert message in refusal(capsys, start_training, *DIGITS, *flags)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "ssd", "--resume"], "--resume is for restarting a job that stopped"),
    (["--mode", "no-comm"], "got backend horovod, --mode no-comm, --data digits"),
    (["--mode", "ssd", "--backend", "mpi"], "got backend mpi, --mode ssd"),
    (["--mode", "ssd", "--amp"], "no --amp (loss scales are not carried across a change of ranks)"),
    (["--mode", "ssd", "--warmup-steps", WARMUP_EPOCH], "--elastic needs --warmup-steps as a number of steps"),
])
def test_elastic_is_refused_where_it_cannot_work(capsys, flags, message):
    assert message in refusal(capsys, start_training, "--data", "digits", "--model", "cnn", *ELASTIC, *flags)


def test_flags_that_work_pass_every_check():
    args = start_training(*DIGITS, "--mode", "ssd", "--sync-every", "4", "--delay", "2", "--fp16-allreduce")
    assert args.compression == "fp16" and args.warmup_steps == WARMUP_EPOCH
    start_training(*DIGITS, "--mode", "horovod", "--glu-beta", "2")   # SSD-SGD's knobs: not checked for horovod
    start_training(*DIGITS, "--slow-rank", "1", "--slow-fraction", "0.5", size=2)


def test_the_drift_correction_flag_reaches_the_settings():
    from ssd_allreduce.train.options import build_parser, ssd_settings
    on = build_parser().parse_args([*DIGITS, "--mode", "ssd", "--drift-correction"])
    off = build_parser().parse_args([*DIGITS, "--mode", "ssd"])
    assert ssd_settings(on).drift_correction and not ssd_settings(off).drift_correction


def test_the_averaged_moments_flag_reaches_the_settings_and_needs_adamw():
    from ssd_allreduce.train.options import build_parser, ssd_settings
    on = build_parser().parse_args([*DIGITS, "--mode", "ssd", "--optimizer", "adamw", "--average-moments"])
    assert ssd_settings(on).average_moments
    with pytest.raises(SystemExit, match="--average-moments carries Adam's moments: give --optimizer adamw"):
        start_training(*DIGITS, "--mode", "ssd", "--average-moments")
    with pytest.raises(SystemExit, match="--average-moments with --compression fp16"):
        start_training(*DIGITS, "--mode", "ssd", "--optimizer", "adamw", "--average-moments", "--compression", "fp16")


def test_one_warmup_default_the_library_constant_or_one_epoch_at_most_that():
    signature = inspect.signature(DistributedOptimizer).parameters["warmup_steps"].default
    assert signature == SSDSettings().warmup_steps == DEFAULT_WARMUP_STEPS == 500
    assert build_parser().parse_args([]).warmup_steps == WARMUP_EPOCH
    assert warmup_steps_for(WARMUP_EPOCH, 22) == 22                       # the digits at 2 ranks
    assert warmup_steps_for(WARMUP_EPOCH, 5004) == DEFAULT_WARMUP_STEPS    # ImageNet at 256 per step
    assert warmup_steps_for(7, 22) == 7
    assert f"at most {DEFAULT_WARMUP_STEPS}" in build_parser().format_help()


def test_summarize_names_what_it_needs(capsys, tmp_path):
    assert "RUN_DIR" in refusal(capsys, driver.main, ["summarize"])
    assert "is /nowhere a run directory" in refusal(capsys, driver.main, ["summarize", "/nowhere"])
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\n')
    assert f"summarize: {tmp_path} has no summary" in refusal(capsys, driver.main, ["summarize", str(tmp_path)])


def compare_checked(*flags: str) -> None:
    compare.check_args(compare.build_parser().parse_args(list(flags)))


def gpt_checked(*flags: str) -> argparse.Namespace:
    a = language.build_parser().parse_args(list(flags))
    language.check_args(a)
    return a


@pytest.mark.parametrize("flags, message", [
    (["--bandwidths", "100"], "argument --bandwidths: expected a rate such as 100mbit or 1gbit"),
    (["--bandwidths", "100mbps"], "expected a rate such as 100mbit"),
    (["--ranks", "3", "--nodes", "2"], "--ranks 3 cannot be split into --nodes 2 of equal size"),
    (["--slow-rank", "2"], "--slow-rank must be a rank below --ranks (2)"),
    (["--slow-rank", "1", "--slow-fraction", "-0.5"], "--slow-fraction >= 0"),
    (["--straggler", "0.5"], "unrecognized arguments: --straggler"),
    (["--ssd-configs", "5:9"], "--ssd-configs 5:9: need 0 <= d <= k"),
    (["--ssd-configs", "5:5/zip"], "the wire format after / is one of fp16, bf16, int8"),
    (["--data", "imagefolder"], "--data imagefolder needs --data-dir"),
    (["--data", "stdlib"], "argument --data: invalid choice: 'stdlib'"),
    (["--warmup-steps", "-3"], "--warmup-steps must be >= 0, got -3"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_the_comparison_refuses_what_cannot_run_before_any_run(capsys, flags, message):
    assert message in refusal(capsys, compare_checked, *flags)


def test_the_comparison_accepts_rates_and_the_plain_loopback():
    a = compare.build_parser().parse_args(["--bandwidths", "2.5gbit", "none", "--slow-rank", "1",
                                           "--slow-fraction", "0.5"])
    compare.check_args(a)
    assert a.bandwidths == ["2.5gbit", "none"] and a.warmup_steps == WARMUP_EPOCH


def test_the_old_ablation_flag_names_the_subcommand(capsys):
    said = refusal(capsys, compare.main, ["--ablation", "--ablation-k", "8"])
    assert "the GLU ablation is a subcommand: python -m ssd_allreduce.bench ablation" in said


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "30", "--eval-every", "20"], "--max-steps (30) must be a multiple of --eval-every (20)"),
    (["--max-steps", "40", "--warmup-steps", "40", "--eval-every", "20"], "below --max-steps (40), got 40"),
    (["--gpt-width", "30"], "--gpt-width (30) must be a multiple of --gpt-heads (4)"),
    (["--ssd-configs", "4:5"], "need 0 <= d <= k"),
    (["--ssd-configs", "4:soon"], "takes k:d pairs such as 5:5 or 5:auto, got '4:soon'"),
    (["--ablation-config", "5:auto"], "the ablation's simulator needs a fixed delay, such as 5:5"),
    (["--steps", "10"], "unrecognized arguments: --steps"),
    (["--budget-factor", "0.5"], "--budget-factor must be >= 1 (Horovod trains --max-steps), got 0.5"),
    (["--bandwidths", "fast"], "expected a rate such as 100mbit"),
])
def test_the_gpt_workload_refuses_what_cannot_run(capsys, flags, message):
    assert message in refusal(capsys, gpt_checked, *flags)


def test_the_gpt_workload_warms_up_an_eighth_of_its_steps_unless_told():
    assert gpt_checked().warmup_steps == 20
    assert gpt_checked("--max-steps", "80").warmup_steps == 10
    assert gpt_checked("--warmup-steps", "3").warmup_steps == 3


def test_a_cosine_schedule_reaches_zero_at_max_steps_where_that_comes_before_the_last_epoch():
    def factors(*flags: str) -> list[float]:
        args = build_parser().parse_args([*DIGITS, "--lr-schedule", "cosine", *flags])
        sched = driver.make_lr_schedule(args, torch.optim.SGD([torch.zeros(1)], lr=1.0), steps_per_epoch=100, size=1)
        return [sched.lr_lambdas[0](step) for step in (0, 5, 10, 100, 200)]
    assert factors("--max-steps", "10") == pytest.approx([1, 0.5, 0, 0, 0])
    assert factors() == pytest.approx([1, 0.5 * (1 + math.cos(math.pi * 5 / 200)),
                                       0.5 * (1 + math.cos(math.pi * 10 / 200)), 0.5, 0])   # DIGITS: 2 epochs


def test_the_gpt_workload_gives_the_others_a_multiple_of_horovods_steps_to_a_validation():
    a = gpt_checked("--budget-factor", "2.5", "--max-steps", "160", "--eval-every", "20")
    assert [language.Run("adamw", "shuffle", mode).steps(a.max_steps, a.budget_factor, a.eval_every)
            for mode in ("horovod", "ssd", "local-sgd")] == [160, 400, 400]
    assert language.Run("adamw", "shuffle", "ssd").steps(160, 1.1, 20) == 160
    assert gpt_checked("--ablation-config", "none").ablation_config == ""


@pytest.mark.parametrize("main, flags, message", [
    (costmodel.main, ["--bandwidths", "10"], "expected a rate such as 10gbit or 400mbit"),
    (costmodel.main, ["--batch-per-rank", "32"], "unrecognized arguments: --batch-per-rank"),
    (nodecost.main, ["--inter-gbps", "25"], "unrecognized arguments: --inter-gbps"),
    (nodecost.main, ["--delay", "7"], "--delay (7) must be at most --sync-every (5)"),
    (nodecost.main, ["--ranks-per-node", "0"], "--ranks-per-node must be >= 1, got 0"),
])
def test_the_cost_models_refuse_bad_flags(capsys, main, flags, message):
    assert message in refusal(capsys, main, flags)


def test_the_cost_models_take_rates(capsys):
    costmodel.main(["--ranks", "8", "--bandwidths", "10gbit", "400mbit"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["10", "0.4"]


def test_an_unknown_or_absent_benchmark_says_which_there_are(capsys):
    assert "unknown subcommand 'fly': choose from compare, ablation" in refusal(capsys, bench_cli.main, ["fly"])
    missing: Optional[str] = next((n for n in ("collect", "quality") if not bench_cli.module_path(n).exists()), None)
    if missing:
        assert f"this installation has no {bench_cli.module_path(missing)}" in refusal(capsys, bench_cli.main, [missing])


def test_a_window_may_leave_its_delay_to_the_run():
    assert compare.parse_window("5:auto") == (5, "auto") and compare.parse_window("5:2") == (5, 2)
    specs = compare.parse_modes(["5:auto"], 5, with_local_sgd=False)
    assert specs[1].name == "ssd k=5 d=auto" and specs[1].args()[:6] == ["--mode", "ssd", "--sync-every", "5",
                                                                            "--delay", "auto"]
    assert specs[1].window_used({"sync_every_used": 5, "delay_used": 2}) == (5, 2)
    a = language.build_parser().parse_args(["--ssd-configs", "5:auto", "--ablation-config", "none"])
    language.check_args(a)
    run = language.plan(a)[1]
    assert run.name == "ssd k=5 d=auto beta=auto" and run.args()[8:10] == ["--delay", "auto"]


def test_the_gpt_comparison_runs_blocking_local_sgd_unless_left_out():
    for flags, local in (([], ["local-sgd k=3"]), (["--no-local-sgd"], [])):
        a = language.build_parser().parse_args(["--ssd-configs", "5:5", "--local-sgd-every", "3",
                                                "--shards", "shuffle", "--ablation-config", "none", *flags])
        language.check_args(a)
        assert [run.name for run in language.plan(a)] == ["horovod", "ssd k=5 d=5 beta=auto", *local]


def test_the_gpt_ablation_adds_each_compensation_on_real_ranks_once():
    """The ablation's rows on real ranks (the e2e workload runs leave them out): overwrite and GLU at
    three betas, with the first optimizer and the ablation's sharding; a row the comparison already
    runs (GLU at the ablation's window and beta) is not run twice."""
    a = language.build_parser().parse_args(["--optimizers", "adamw", "sgd", "--ssd-configs", "2:2",
                                            "--glu-beta", "0.5", "--shards", "shuffle", "--no-local-sgd",
                                            "--ablation-config", "2:2", "--ablation-shards", "shuffle"])
    language.check_args(a)
    runs = language.plan(a)
    assert [(r.optimizer, r.name) for r in runs] == [
        ("adamw", "horovod"), ("adamw", "ssd k=2 d=2 beta=0.5"), ("sgd", "horovod"), ("sgd", "ssd k=2 d=2 beta=0.5"),
        ("adamw", "ssd k=2 d=2 overwrite"), ("adamw", "ssd k=2 d=2 beta=1"), ("adamw", "ssd k=2 d=2 beta=0.25")]
    overwrite = runs[4].args()
    assert overwrite[overwrite.index("--compensation") + 1] == "overwrite"
    assert runs[5].args()[-4:] == ["--compensation", "glu", "--glu-beta", "1.0"]


@pytest.mark.parametrize("flags, compensation, beta", [(["--compensation", "overwrite"], "overwrite", 0.5),
                                                    (["--glu-beta", "0.25"], "glu", 0.25)])
def test_the_drivers_compensation_flags_reach_the_optimizer(flags, compensation, beta):
    """What the GPT ablation's rows pass (tests/unit/test_delay.py checks the landings themselves)."""
    from fakes import LocalCommunicator
    from ssd_allreduce.train.launch import DistContext
    from ssd_allreduce.train.modes import make_mode

    args = build_parser().parse_args(["--mode", "ssd", "--warmup-steps", "5", "--glu-beta", "0.5", *flags])
    ctx = DistContext("horovod", 0, 1, 0, torch.device("cpu"), LocalCommunicator())
    settings = make_mode(args, torch.nn.Linear(3, 2), ctx).optimizer._ssd_settings
    assert (settings.compensation, settings.glu_beta) == (compensation, beta)


def test_ranks_on_one_node_share_its_cpus_unless_told():
    from ssd_allreduce.train.launch import threads_per_rank

    assert threads_per_rank(2, env={}, usable=8) == 4                  # horovodrun: nobody bound
    assert threads_per_rank(3, env={}, usable=2) == 1                  # more ranks than CPUs
    assert threads_per_rank(4, env={"OMP_NUM_THREADS": "6"}, usable=16) is None
    assert threads_per_rank(4, env={"OMP_NUM_THREADS": ""}, usable=16) == 4     # set but empty
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_CPUS_PER_TASK": "3"}
    assert threads_per_rank(4, env=srun, usable=3) == 3                # srun's share of this task
    assert threads_per_rank(4, env={**srun, "HOROVOD_RANK": "0"}, usable=16) == 4   # horovodrun in a step
