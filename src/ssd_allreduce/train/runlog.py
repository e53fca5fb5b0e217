"""What a run leaves behind: ``metrics.jsonl`` (per step, per epoch, summary), a comparison table
of finished runs, and a PNG of loss and accuracy against wall time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

METRICS = "metrics.jsonl"

SUMMARY_COLUMNS = (
    ("mode", "mode", "{}"), ("ranks", "ranks", "{}"), ("steps", "steps", "{}"),
    ("img/s", "images_per_sec", "{:.0f}"), ("steady img/s", "steady_images_per_sec", "{:.0f}"),
    ("steady step ms", "steady_step_ms", "{:.2f}"), ("steady compute ms", "steady_compute_ms", "{:.2f}"),
    ("steady comm wait ms", "steady_comm_wait_ms", "{:.2f}"),
    ("bytes/step", "bytes_per_step", "{:,.0f}"), ("test acc", "test_accuracy", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"), ("wall s", "wall_seconds", "{:.1f}"),
)


class RunLog:
    """Appends JSON lines to ``<run>/metrics.jsonl`` (rank 0 only; other ranks get a no-op)."""

    def __init__(self, run_dir: Union[str, Path], enabled: bool) -> None:
        self.path = Path(run_dir) / METRICS
        self._file = None
        self.set_enabled(enabled)

    def set_enabled(self, enabled: bool) -> None:
        """Write (this process is rank 0) or not; an elastic job's rank 0 may change."""
        if enabled and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        elif not enabled and self._file is not None:
            self._file.close()
            self._file = None

    def write(self, kind: str, **record: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"kind": kind, **record}) + "\n")
            if kind != "step":
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory of ssd_allreduce.train?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_summary(run_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    summaries = [r for r in read(run_dir) if r["kind"] == "summary"]
    return summaries[-1] if summaries else None


Column = tuple[str, str, str]
"""(header, key of the row, format of a present value)."""


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table, one line per row; a missing or None value shows as ``-``."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]], baseline_mode: str = "horovod") -> str:
    """Markdown table of run summaries, with steady-state throughput (after the warm-up steps)
    relative to the baseline and to no-comm."""
    by_mode = {r["mode"]: r for r in rows}
    ratios = {f"x {baseline_mode}": by_mode.get(baseline_mode), "x no-comm": by_mode.get("no-comm")}
    with_ratios = []
    for r in rows:
        row = dict(r)
        for column, ref in ratios.items():
            ok = ref is not None and ref.get("steady_images_per_sec") and r.get("steady_images_per_sec")
            row[column] = r["steady_images_per_sec"] / ref["steady_images_per_sec"] if ok else None
        with_ratios.append(row)
    return markdown_table(with_ratios, SUMMARY_COLUMNS + tuple((c, c, "{:.2f}") for c in ratios))


def summarize(run_dirs: Iterable[Union[str, Path]]) -> str:
    rows = []
    for d in run_dirs:
        s = latest_summary(d)
        if s is None:
            raise ValueError(f"{d} has no summary: the run did not finish")
        rows.append(dict(s, run=str(d)))
    return format_table(rows)


def plot(run_dirs: Sequence[Union[str, Path]], out: Union[str, Path]) -> Path:
    """Training loss and test accuracy against wall time, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for d in run_dirs:
        records = read(d)
        label = next((r["mode"] for r in records if r["kind"] == "start"), Path(d).name)
        steps = [r for r in records if r["kind"] == "step"]
        epochs = [r for r in records if r["kind"] == "epoch"]
        ax_loss.plot([r["wall"] for r in steps], [r["loss"] for r in steps], label=label, lw=0.8)
        ax_acc.plot([r["wall"] for r in epochs], [r["test_accuracy"] for r in epochs], "o-", label=label)
    ax_loss.set(xlabel="wall time (s)", ylabel="training loss (rank 0)", yscale="log")
    ax_acc.set(xlabel="wall time (s)", ylabel="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
