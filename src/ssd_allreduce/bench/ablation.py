"""The GLU ablation: every compensation variant against synchronous SGD, with shuffled and with
label-skewed shards, on the simulator (the same math as real ranks).

    python -m ssd_allreduce.bench --ablation --ablation-k 8 --ablation-workers 8
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from .convergence import study

ABLATION_BETAS = (1.0, 0.5, 0.25, 0.1)


def ablation(a: argparse.Namespace) -> list[dict[str, Any]]:
    """GLU ablation with the simulator (same math as the real ranks): compensation variants with
    shuffled and label-skewed shards, against synchronous SGD, averaged over seeds."""
    variants = [("ssgd", 1, 0, 1.0, "glu"), ("overwrite", a.ablation_k, a.ablation_k, 0.0, "overwrite")]
    variants += [(f"glu_beta={b}", a.ablation_k, a.ablation_k, b, "glu") for b in ABLATION_BETAS]
    rows = []
    for shards in ("shuffle", "label-skew"):
        for name, k, d, beta, comp in variants:
            accs = [study(workers=a.ablation_workers, sync_every=k, delay=d, warmup_steps=a.ablation_warmup,
                          glu_beta=beta, compensation=comp, shards=shards, epochs=a.ablation_epochs,
                          batch_size=16, lr=0.05, model_name="mlp", seed=seed)["accuracy"]
                    for seed in range(a.ablation_seeds)]
            rows.append({"shards": shards, "variant": name, "accuracy": statistics.mean(accs),
                         "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0})
            print(f"{shards:<10} {name:<14} {rows[-1]['accuracy']:.4f} ± {rows[-1]['stdev']:.4f}", flush=True)
    lines = [f"GLU ablation: `python -m ssd_allreduce.bench --ablation --ablation-k {a.ablation_k} "
             f"--ablation-workers {a.ablation_workers} --ablation-epochs {a.ablation_epochs} --ablation-seeds "
             f"{a.ablation_seeds}` (simulator, MLP on digits, k = d = {a.ablation_k}, mean ± stdev over seeds)", "",
             "| variant | shuffled shards | label-skewed shards |", "|---|---|---|"]
    for name, *_ in variants:
        cell = {r["shards"]: f"{r['accuracy']:.4f} ± {r['stdev']:.4f}" for r in rows if r["variant"] == name}
        lines.append(f"| {name} | {cell['shuffle']} | {cell['label-skew']} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows
