"""The documents' tables written from the measurements committed beside them: each section of
docs/BENCHMARKS.md that has a results file under docs/results/ lies between two markers,

    <!-- results:NAME -->
    ...written by `python -m ssd_allreduce.bench report`...
    <!-- /results:NAME -->

and ``report`` rewrites what lies between them from ``docs/results/NAME.json``, measuring nothing.
``report --check`` says whether the documents are what their results write (the test suite runs
it), so a published number cannot drift from its data.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..cli import HelpFormatter, add_version
from .flags import PROG

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs"


def _lazy(module: str, name: str) -> Callable[[dict[str, Any]], str]:
    """The renderer ``name`` of ``bench.module``, imported when a section is written (the
    renderers' modules import the training code; ``report`` itself stays light)."""
    def render(record: dict[str, Any]) -> str:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(record)
    return render


FAULTS = {"stop": "SIGSTOP", "kill": "SIGKILL"}
PHASES = {"warmup": "warm-up, step {}", "window": "window in flight, step {}", "evaluation": "evaluation after step {}",
          "checkpoint": "checkpoint at step {}"}
LAUNCHERS = {"horovod-gloo": "Horovod, Gloo (horovodrun)", "horovod-mpi": "Horovod, MPI (mpirun)",
             "torch-gloo": "torch.distributed, Gloo (torchrun)", "mpi4py": "mpi4py (mpirun)"}


def survivor_message(message: str) -> str:
    """What a survivor said, less its time stamp and the backend's own words (elided)."""
    text = re.sub(r"^rank \d+ at \S+: ", "", message)
    text = text.replace(": another rank stopped or froze, or a link is down", ": …").split("; stopping this rank")[0]
    return re.sub(r": \w*(?:Error|Exception)\b.*$", ": <the backend's error>", text)


def render_faults(record: dict[str, Any]) -> str:
    """docs/RELIABILITY.md's fault matrix: each injected fault, where, on which backend, how soon the
    survivor stopped (the job's end where mpirun ends it) and what it said."""
    out = [f"Measured with `{record['command']}` (commit {record['commit']}, {record['date']}; {record['machine']}; "
           f"Python {record['python']}, torch {record['torch']}, Horovod {record['horovod']}; bound "
           f"{record['bound_s']} s):", "",
           "| fault | phase | backend (launcher) | survivor stopped after | survivor's message |",
           "|---|---|---|---|---|"]
    for r in record["rows"]:
        signal, phase, step, rank = r["fault"].split(":")
        out.append(f"| {FAULTS[signal]} rank {rank} | {PHASES[phase].format(step)} | {LAUNCHERS[r['launcher']]} | "
                   f"{r['seconds']:.1f} s{' (job end)' if r['job_end'] else ''} | {survivor_message(r['message'])} |")
    return "\n".join(out) + "\n"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    **{name: _lazy("sections", "render_comparison") for name in ("compression", "compression-resnet", "straggler")},
    **{name: _lazy("sections", "render_detailed") for name in ("sweep", "nodes")},
    "auto": _lazy("sections", "render_auto_window"), "warmup": _lazy("sections", "render_warmup"),
    **{name: _lazy(name, "render_record") for name in ("costmodel", "nodecost", "ablation", "overhead")},
    "overhead-cuda": _lazy("overhead", "render_record"), "gpu-synthetic": _lazy("synthetic_rounds", "render_record"),
    **{name: _lazy("language", "render") for name in ("gpt", "gpt-delay", "gpt-schedule")}, "faults": render_faults}
"""Each section with committed results but the quality study's: its name (``docs/results/NAME.json``)
and what writes its markdown."""


def renderer(name: str) -> Optional[Callable[[dict[str, Any]], str]]:
    """What writes the markdown of ``docs/results/NAME.json``: the quality study's for every ``quality*``."""
    return _lazy("quality", "render_record") if name.startswith("quality") else RENDERERS.get(name)


def provenance(command: str) -> dict[str, str]:
    """What a results file records about its measurement: the command, commit, date, machine and versions."""
    import time

    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except Exception:   # noqa: BLE001 - absent or broken: say so in the record
            return "not importable"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        # "-dirty": the measured code (not the documents a previous section rewrote) differs from the commit
        code = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src", "scripts"],
                              capture_output=True, timeout=10)
        commit += "-dirty" if code.returncode == 1 else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"command": command, "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "python": platform.python_version(), "torch": version("torch"), "horovod": version("horovod")}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``name``'s markers replaced by ``body``."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no section {name!r}: put the lines {begin} and {end} where its table goes")
    return pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text, count=1)


def written(docs: Path) -> dict[Path, str]:
    """Every document with a results section, as ``report`` writes it."""
    out: dict[Path, str] = {}
    for results in sorted((docs / "results").glob("*.json")):
        name, render = results.stem, renderer(results.stem)
        if render is None:
            raise ValueError(f"{results}: no section of this name renders its results (bench/report.py RENDERERS)")
        body = render(json.loads(results.read_text()))
        placed = False
        for doc in sorted(docs.glob("*.md")):
            text = out.get(doc, doc.read_text())
            if markers(name)[0] in text:
                out[doc] = replace_section(text, name, body)
                placed = True
        if not placed:
            raise ValueError(f"{results} has no section: put the lines {' and '.join(markers(name))} where its "
                             f"table goes in one of {docs}/*.md")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} report", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("--docs", default=str(DOCS), help="the documents' folder (its results/ holds the measurements)")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 naming each document that differs from what its results write")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stale = []
    try:
        documents = written(Path(a.docs))
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    for doc, text in documents.items():
        if doc.read_text() == text:
            continue
        stale.append(doc)
        if not a.check:
            doc.write_text(text)
            print(f"report: rewrote {doc}")
    if a.check and stale:
        print("report: these documents differ from what their results write (run "
              f"`{PROG} report`): {', '.join(map(str, stale))}", file=sys.stderr)
        return 1
    return 0
