"""The command lines users type, read as they are: every --help lists every subcommand, every
option has help text, one vocabulary across the driver and the benchmarks, --version; the parsers
are walked in this process, and one bad flag is run as a process."""
from __future__ import annotations

import argparse
import importlib
import subprocess
from typing import Iterator

import pytest

from launchers import PYTHON, REPO, launcher_env
from ssd_allreduce import __version__, cli
from ssd_allreduce.bench import cli as bench_cli
from ssd_allreduce.bench import language
from ssd_allreduce.train import options

pytestmark = pytest.mark.timeout(120)

OLD_NAMES = {"--bandwidth", "--straggler", "--batch-per-rank", "--inter-gbps", "--gpus", "--per-node", "--width",
             "--layers", "--steps", "--sim-workers", "--ablation", "--ablation-k", "--ablation-workers",
             "--ablation-epochs", "--ablation-warmup", "--ablation-seeds"}
"""Names the commands used before one vocabulary: none may come back."""


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the package's commands (subcommands whose module this installation lacks,
    or that parse by hand, are left out)."""
    yield "train", options.build_parser()
    yield "train summarize", options.build_summarize_parser()
    yield "bench", bench_cli.build_parser()
    yield "bench --workload gpt", language.build_parser()
    for name in bench_cli.SUBCOMMANDS:
        if not bench_cli.module_path(name).exists():
            continue
        module = importlib.import_module(f"ssd_allreduce.bench.{name}")
        if hasattr(module, "build_parser"):
            yield f"bench {name}", module.build_parser()


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_option_of_every_command_has_help():
    checked = 0
    for command, parser in parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:   # test hooks (--fault-at, --preempt-at-step)
                assert action.option_strings in (["--fault-at"], ["--preempt-at-step"]), (command, action)
                continue
            assert action.help and action.help.strip(), f"{command}: {action.option_strings or action.dest} has no help"
            checked += 1
    assert checked > 100


def test_every_help_lists_every_subcommand():
    bench = bench_cli.build_parser().format_help()
    for name in bench_cli.SUBCOMMANDS:
        assert f"\n    {name}" in bench, name
    assert "compare" in bench and "Options without a subcommand go to compare" in bench
    train = options.build_parser().format_help()
    assert "python -m ssd_allreduce.train summarize RUN_DIR" in train and "summarize RUN_DIR [RUN_DIR ...]" in train
    usage = cli.usage()
    assert all(f"  {name}" in usage for name in cli.COMMANDS)


def test_one_name_for_one_thing():
    train = options_of(options.build_parser())
    for command, parser in parsers():
        flags = options_of(parser)
        assert not OLD_NAMES & set(flags), f"{command} still takes {sorted(OLD_NAMES & set(flags))}"
        # a flag that names a driver concept is the driver's name, with the driver's meaning of the value
        for flag in {"--batch-size", "--warmup-steps", "--sync-every", "--delay", "--glu-beta", "--max-steps",
                     "--slow-rank", "--slow-fraction", "--gpt-width", "--gpt-layers", "--gpt-heads"} & set(flags):
            assert flag in train
    compare = options_of(importlib.import_module("ssd_allreduce.bench.compare").build_parser())
    gpt = options_of(language.build_parser())
    for flag in ("--ranks", "--bandwidths", "--batch-size", "--warmup-steps", "--slow-rank", "--slow-fraction"):
        assert flag in compare, flag
    for flag in ("--ranks", "--bandwidths", "--max-steps", "--gpt-width", "--gpt-layers", "--gpt-heads", "--sim-ranks"):
        assert flag in gpt, flag
    for name in ("costmodel", "nodecost"):
        flags = options_of(importlib.import_module(f"ssd_allreduce.bench.{name}").build_parser())
        assert {"--ranks", "--bandwidths", "--batch-size"} <= set(flags), name


def test_every_help_shows_the_defaults():
    train = options.build_parser().format_help()
    assert "(default: epoch)" in train and "(default: 5)" in train and "(default: )" not in train
    for command, parser in parsers():
        assert "(default: None)" not in parser.format_help(), command


@pytest.mark.parametrize("main", [lambda: options.build_parser().parse_args(["--version"]),
                                  lambda: bench_cli.main(["--version"])])
def test_version(capsys, main):
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


def test_version_of_the_one_command(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"ssd-allreduce {__version__}\n"


def test_a_bad_flag_stops_the_driver_with_the_message_on_stderr(tmp_path):
    """The one check as a process: the driver starts, checks its flags, and exits non-zero."""
    proc = subprocess.run([PYTHON, "-m", "ssd_allreduce.train", "--no-progress", "--sync-every", "0",
                           "--out", str(tmp_path / "run")], env=launcher_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0 and "--sync-every must be >= 1, got 0" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
