"""``python -m ssd_allreduce.bench collect``: finished runs below a directory become one table (one row
per run, throughput against the baseline), one JSON file and one plot; an unfinished run is listed
as such, and a directory without runs is refused naming it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssd_allreduce.bench import collect


def write_run(run_dir: Path, mode: str, steady: float | None, **args) -> None:
    """A run directory as the driver leaves it: a start record, steps, and (if finished) a summary."""
    run_dir.mkdir(parents=True)
    records = [{"kind": "start", "mode": mode, "ranks": 4, "args": {"mode": mode, "compression": "none", **args}},
               {"kind": "step", "step": 1, "wall": 0.1, "loss": 2.0},
               {"kind": "step", "step": 2, "wall": 0.2, "loss": 1.5}]
    if steady is not None:
        records.append({"kind": "summary", "mode": mode, "ranks": 4, "steps": 2, "steady_images_per_sec": steady,
                        "bytes_per_step": 1000.0, "test_accuracy": 0.9, "wall_seconds": 0.2,
                        "local_sync_nodes": "2 node(s) x 2 rank(s)" if mode == "ssd" else None,
                        "ssd_stats": {"sync_every": args.get("sync_every"), "delay": args.get("delay")}
                        if mode == "ssd" else None})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_every_run_below_a_directory_is_a_row_against_the_baseline(tmp_path: Path) -> None:
    write_run(tmp_path / "job" / "horovod", "horovod", 100.0)
    write_run(tmp_path / "job" / "ssd", "ssd", 250.0, sync_every=5, delay=5)
    write_run(tmp_path / "job" / "late", "ssd", None, sync_every=10, delay=10)
    assert collect.main([str(tmp_path / "job")]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "job" / "results.json").read_text())}
    assert sorted(rows) == ["horovod", "late", "ssd"]
    assert rows["ssd"]["x_baseline"] == pytest.approx(2.5) and rows["horovod"]["x_baseline"] == pytest.approx(1.0)
    assert (rows["ssd"]["k"], rows["ssd"]["d"], rows["ssd"]["nodes"]) == (5, 5, "2 node(s) x 2 rank(s)")
    assert rows["late"]["status"] == "did not finish" and rows["late"]["steps"] == 2
    table = (tmp_path / "job" / "results.md").read_text()
    assert "| ssd | ssd | 5 | 5 | none |" in table and "over horovod's" in table
    assert (tmp_path / "job" / "results.png").stat().st_size > 0


def test_several_directories_and_an_output_elsewhere(tmp_path: Path) -> None:
    write_run(tmp_path / "a" / "run", "ssd", 10.0, sync_every=2, delay=2)
    write_run(tmp_path / "b" / "run", "ssd", 20.0, sync_every=4, delay=2)
    text = collect.collect([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert "| a/run |" in text and "| b/run |" in text and "no horovod or ddp run" in text
    assert (tmp_path / "out" / "results.md").exists()


def test_a_directory_without_runs_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=rf"no run below {tmp_path}"):
        collect.main([str(tmp_path)])
