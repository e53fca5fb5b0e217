#!/usr/bin/env bash
# The full benchmark: every mode at 10 Gbit/s, 1 Gbit/s and 100 Mbit/s, 3 repeats, plus the GLU
# ablation; results (JSON, markdown, PNG) under results/bench-<date>/. Extra arguments go to the
# comparison, e.g. scripts/bench.sh --data cifar10 --data-dir ~/cifar10 --model resnet20
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/scripts/setup.sh" >&2
VENV=${SSD_VENV:-$REPO/.venv}
cd "$REPO"
OUT=${SSD_BENCH_OUT:-results/bench-$(date +%Y%m%d-%H%M%S)}
"$VENV/bin/python" -m ssd_allreduce.bench --out "$OUT" --repeats 3 --epochs 10 "$@"
"$VENV/bin/python" -m ssd_allreduce.bench --ablation --out "$OUT"
"$VENV/bin/python" -m ssd_allreduce.costmodel --model resnet50 --ranks 8 64 256 1024 \
  --bandwidth 10 25 100 --sync-every 5 --delay 5 | tee "$OUT/costmodel.md"
