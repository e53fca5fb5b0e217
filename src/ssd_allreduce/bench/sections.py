"""The comparison's results as a committed record (``compare --record docs/results/NAME.json``)
and the sections of docs/BENCHMARKS.md written from such records: a table per network, or one
row per network for the self-tuning window against the fixed ones."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .collect import write_atomically


def write_record(results: dict[str, Any], path: Path) -> None:
    """``results`` with the measurement's provenance (``report.provenance``) to ``path``."""
    from .report import provenance
    path.parent.mkdir(parents=True, exist_ok=True)
    record = record_of(results, provenance(results["command"]))
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


def write_rows_record(path: Path, command: str, rows: list[dict[str, Any]], config: dict[str, Any],
                      seconds: Optional[float] = None) -> None:
    """A table's rows (computed or measured) with the command that made them and its provenance."""
    from .report import provenance
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**provenance(command), "config": config, "rows": rows}
    if seconds is not None:
        record["seconds"] = seconds
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {path}")


def stamp_line(record: dict[str, Any]) -> str:
    """The command that wrote a record, its commit, date, machine and versions."""
    return (f"Command: `{record['command']}` (commit {record['commit']}, {record['date']}; {record['machine']}; "
            f"Python {record['python']}, torch {record['torch']}, Horovod {record['horovod']}).")


def record_of(results: dict[str, Any], stamp: dict[str, str]) -> dict[str, Any]:
    """``results`` without the training curves, after ``stamp`` (the command, commit, machine...)."""
    record = {**stamp, "config": results["config"],
              "bandwidths": [{**s, "rows": [{k: v for k, v in r.items() if k != "curve"} for r in s["rows"]]}
                             for s in results["bandwidths"]]}
    if "seconds" in results:
        record["seconds"] = results["seconds"]
    if results.get("node_cost_model"):
        record["node_cost_model"] = results["node_cost_model"]
    return record


def provenance_line(record: dict[str, Any]) -> str:
    c = record["config"]
    return (f"Command: `{record['command']}` (commit {record['commit']}, {record['date']}; {record['machine']}; "
            f"Python {record['python']}, torch {record['torch']}, Horovod {record['horovod']}; {c['ranks']} ranks, "
            f"{c['model']} on {c['data']}, batch {c['batch_size']} per rank, {c['repeats']} repeat(s) with the "
            f"modes interleaved, medians).")


def _network(section: dict[str, Any]) -> str:
    measured = f" (measured {section['measured_mbps']:.0f} Mbit/s)" if section.get("measured_mbps") else ""
    return f"{section['rate']}{measured}"


def _spread(row: dict[str, Any]) -> str:
    values = row.get("images_per_sec_repeats") or [row["images_per_sec"]]
    return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else "-"


def render_comparison(record: dict[str, Any]) -> str:
    """A table per network: every mode's steady img/s (the range over repeats), its ratios to
    Horovod and to the no-communication limit, accuracy, bytes and time to the target; then the
    targets met or missed and the cost model's check."""
    config = record["config"]
    nodes = config.get("nodes", 1) > 1
    straggler = config.get("slow_rank", -1) >= 0 and config.get("slow_fraction", 0) > 0
    out = [provenance_line(record), ""]
    for s in record["bandwidths"]:
        out += [f"**{_network(s)}**", "",
                "| mode | img/s | over repeats |" + (" rank img/s min/med/max |" if straggler else "")
                + " x horovod | x no-comm | test acc | B/step |"
                + (" between nodes B/step |" if nodes else "") + " to target s |",
                "|---|---|---|" + ("---|" if straggler else "") + "---|---|---|---|" + ("---|" if nodes else "")
                + "---|"]
        for r in s["rows"]:
            target = "-" if r.get("time_to_target_s") is None else f"{r['time_to_target_s']:.1f}"
            between = f" {r['inter_node_bytes_per_step']:,.0f} |" if nodes else ""
            ranks = f" {r['rank_spread']} |" if straggler else ""
            out.append(f"| {r['name']} | {r['images_per_sec']:,.0f} | {_spread(r)} |{ranks} {r['x_horovod']:.2f} | "
                       f"{r['x_no_comm']:.2f} | {r['test_accuracy']:.4f} | {r['bytes_per_step']:,.0f} |{between} "
                       f"{target} |")
        out.append("")
        out += [f"- {t}" for t in s["targets"]]
        out += [f"- cost model, {m['name']}: predicted {m['predicted_ms']:.2f} ms/step, measured "
                f"{m['measured_ms']:.2f} ({m['error']:+.0%})" for m in s.get("cost_model", [])]
        out.append("")
    for c in record.get("node_cost_model", []):
        out.append(f"- node cost model at {c['mbps']:.0f} Mbit/s, {c['name']}: predicted {c['predicted_ms']:.2f} "
                   f"ms/step, measured {c['measured_ms']:.2f} ({c['error']:+.0%})")
    return "\n".join(out).rstrip() + "\n"


def render_auto_window(record: dict[str, Any]) -> str:
    """One row per network: the fixed windows' img/s (a fixed k with ``d=auto``: and the delay
    it chose), the self-tuned one's and the window it chose, and its ratio to the best fixed
    window, k and d both fixed (the range over repeats, against that median)."""
    first = record["bandwidths"][0]["rows"]
    fixed = [r["name"] for r in first if r["mode"] == "ssd" and r["sync_every_used"] is not None
             and "k=auto" not in r["name"]]
    out = [provenance_line(record), "",
           "| network | " + " | ".join(name.replace("ssd ", "") for name in fixed)
           + " | auto (chose) | auto / best fixed | over repeats |",
           "|---|" + "---|" * (len(fixed) + 3)]
    for s in record["bandwidths"]:
        rows = {r["name"]: r for r in s["rows"]}
        auto = next(r for r in s["rows"] if "k=auto" in r["name"])
        best = max((n for n in fixed if "d=auto" not in n), key=lambda n: rows[n]["images_per_sec"])
        cells = [(f"**{rows[n]['images_per_sec']:,.0f}**" if n == best else f"{rows[n]['images_per_sec']:,.0f}")
                 + (f" (d={rows[n]['delay_used']})" if "d=auto" in n else "") for n in fixed]
        base = rows[best]["images_per_sec"]
        repeats = auto.get("images_per_sec_repeats") or [auto["images_per_sec"]]
        spread = (f"{min(repeats) / base:.2f}–{max(repeats) / base:.2f}" if len(repeats) > 1 else "-")
        out.append(f"| {_network(s)} | " + " | ".join(cells) + f" | {auto['images_per_sec']:,.0f} "
                   f"(k={auto['sync_every_used']}, d={auto['delay_used']}) | {auto['images_per_sec'] / base:.3f} "
                   f"| {spread} |")
    return "\n".join(out) + "\n"


def render_detailed(record: dict[str, Any]) -> str:
    """Every measured column per network (results.md's tables), the targets and the cost models."""
    from .compare import network_tables
    return "\n".join([provenance_line(record), "", *network_tables(record)]).rstrip() + "\n"


def render_warmup(record: dict[str, Any]) -> str:
    """The synchronous warm-up's own rate against Horovod's, per network: whole runs where all but
    the last few steps are warm-up."""
    c = record["config"]
    out = [provenance_line(record), "",
           f"| network | mode | img/s ({c['warmup_steps']} steps of warm-up in the run) | Horovod img/s | ratio |",
           "|---|---|---|---|---|"]
    for s in record["bandwidths"]:
        horovod = next(r for r in s["rows"] if r["mode"] == "horovod")["run_images_per_sec"]
        out += [f"| {_network(s)} | {r['name']} | {r['run_images_per_sec']:,.0f} | {horovod:,.0f} | "
                f"**{r['run_images_per_sec'] / horovod:.2f}** |" for r in s["rows"] if r["mode"] == "ssd"]
    return "\n".join(out) + "\n"
