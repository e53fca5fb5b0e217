"""The GLU ablation: every compensation variant against synchronous SGD, with shuffled and with
label-skewed shards, on the simulator (the same math as real ranks).

    python -m ssd_allreduce.bench ablation --ranks 8 --sync-every 8 --epochs 20 --seeds 3 --warmup-steps 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..cli import HelpFormatter
from ..train.options import BATCH_SIZE_HELP, WARMUP_EPOCH, WARMUP_HELP, int_or_epoch
from .convergence import study
from .flags import PROG, add_record, check_at_least

ABLATION_BETAS = (1.0, 0.5, 0.25, 0.1)


def ablation(a: argparse.Namespace) -> list[dict[str, Any]]:
    """GLU ablation with the simulator (same math as the real ranks): compensation variants with
    shuffled and label-skewed shards, against synchronous SGD, averaged over seeds."""
    k = a.sync_every
    variants = [("ssgd", 1, 0, 1.0, "glu"), ("overwrite", k, k, 0.0, "overwrite")]
    variants += [(f"glu_beta={b}", k, k, b, "glu") for b in ABLATION_BETAS]
    rows = []
    for shards in ("shuffle", "label-skew"):
        for name, kk, d, beta, comp in variants:
            accs = [study(workers=a.ranks, sync_every=kk, delay=d, warmup_steps=a.warmup_steps,
                          glu_beta=beta, compensation=comp, shards=shards, epochs=a.epochs,
                          batch_size=a.batch_size, lr=a.lr, model_name="mlp", seed=seed)["accuracy"]
                    for seed in range(a.seeds)]
            rows.append({"shards": shards, "variant": name, "accuracy": statistics.mean(accs),
                         "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0})
            print(f"{shards:<10} {name:<14} {rows[-1]['accuracy']:.4f} ± {rows[-1]['stdev']:.4f}", flush=True)
    lines = [f"GLU ablation: `{PROG} ablation --ranks {a.ranks} --sync-every {k} --epochs {a.epochs} --seeds "
             f"{a.seeds} --warmup-steps {a.warmup_steps} --batch-size {a.batch_size} --lr {a.lr}` (simulator, MLP "
             f"on digits, k = d = {k}, mean ± stdev over seeds)", "", rows_table(rows)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a line per variant, its accuracy with each kind of shards."""
    lines = ["| variant | shuffled shards | label-skewed shards |", "|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        cell = {r["shards"]: f"{r['accuracy']:.4f} ± {r['stdev']:.4f}" for r in rows if r["variant"] == name}
        lines.append(f"| {name} | {cell['shuffle']} | {cell['label-skew']} |")
    return "\n".join(lines)


def render_record(record: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's ablation table, from the record ``--record`` wrote."""
    from .sections import stamp_line
    return f"{stamp_line(record)}\n\n{rows_table(record['rows'])}\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} ablation", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ranks", type=int, default=8, help="simulated ranks")
    ap.add_argument("--sync-every", type=int, default=8, help="k of every SSD-SGD variant (d = k)")
    ap.add_argument("--epochs", type=int, default=20, help="passes over the digits")
    ap.add_argument("--warmup-steps", type=int_or_epoch, default=WARMUP_EPOCH, metavar="N|epoch", help=WARMUP_HELP)
    ap.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of SGD (momentum 0.9) on every rank")
    ap.add_argument("--seeds", type=int, default=3, help="runs of each variant, seeds 0.. (mean and stdev reported)")
    ap.add_argument("--out", default=None, help="where ablation.md goes (default: results/ablation-DATE-TIME)")
    add_record(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    check_at_least(a, 1, "ranks", "sync_every", "epochs", "batch_size", "seeds")
    a.out = a.out or f"results/ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.time()
    rows = ablation(a)
    if a.record:
        from .sections import write_rows_record
        write_rows_record(Path(a.record), f"{PROG} ablation " + " ".join(argv), rows,
                          {k: v for k, v in vars(a).items() if k not in ("out", "record")}, time.time() - started)
    return rows
