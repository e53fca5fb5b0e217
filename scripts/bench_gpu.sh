#!/usr/bin/env bash
# The checks for one GPU, in one command: the overhead micro-benchmark on CUDA,
# Horovod's own pytorch_synthetic_benchmark.py run unchanged and with its optimizer line switched to
# ssd_allreduce.DistributedOptimizer (default warm-up, and warmup_steps=5, sync_every=5, delay=5), the three
# interleaved for several rounds so that drifts hit them alike; then the GPU tests. The first two
# write docs/results/overhead-cuda.json and gpu-synthetic.json, and their docs/BENCHMARKS.md sections.
#
#   scripts/bench_gpu.sh path/to/pytorch_synthetic_benchmark.py [out-dir] [rounds]
#
# Horovod's example is not in its source distribution: take examples/pytorch/
# pytorch_synthetic_benchmark.py from Horovod's repository (v0.28.1). It needs torchvision.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXAMPLE=${1:?"usage: $0 path/to/pytorch_synthetic_benchmark.py [out-dir] [rounds]"}
OUT=${2:-$REPO/results/gpu-$(date +%Y%m%d-%H%M%S)}
ROUNDS=${3:-3}
mkdir -p "$OUT"
"$REPO/scripts/setup.sh" || exit 1
VPY=${SSD_VENV:-$REPO/.venv}/bin/python
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$VPY" -c "import torch, horovod.torch as hvd; print('torch', torch.__version__, 'nccl built:', hvd.nccl_built())"

# the one-line switch a user makes (plus the import), checked to have matched
LINE='optimizer = hvd.DistributedOptimizer(optimizer,'
grep -qF "$LINE" "$EXAMPLE" || { echo "no line '$LINE' in $EXAMPLE" >&2; exit 1; }
switch() {  # switch <extra keyword arguments> <file>
  sed -e "s/^import horovod.torch as hvd$/&\nimport ssd_allreduce/" \
      -e "s/^$LINE/optimizer = ssd_allreduce.DistributedOptimizer(optimizer,$1/" "$EXAMPLE" > "$2"
}
switch "" "$OUT/synthetic_ssd.py"
switch " warmup_steps=5, sync_every=5, delay=5," "$OUT/synthetic_ssd_k5.py"
cp "$EXAMPLE" "$OUT/synthetic_horovod.py"

echo "== overhead micro-benchmark on CUDA"
"$VPY" -m ssd_allreduce.bench overhead --device cuda --rounds 7 --record "$REPO/docs/results/overhead-cuda.json"

echo "== Horovod's pytorch_synthetic_benchmark.py, ResNet-50, batch 64, world size 1"
for round in $(seq "$ROUNDS"); do
  for variant in horovod ssd ssd_k5; do
    rate=$("$VPY" "$OUT/synthetic_$variant.py" --batch-size 64 2>&1 | tee "$OUT/synthetic-$variant-$round.log" \
           | sed -n 's/^Img\/sec per GPU: \([0-9.]*\).*/\1/p')
    echo "round $round $variant ${rate:-FAILED}" | tee -a "$OUT/synthetic.txt"
    [ -n "$rate" ] || tail -15 "$OUT/synthetic-$variant-$round.log"
  done
done
"$VPY" -m ssd_allreduce.bench.synthetic_rounds "$OUT/synthetic.txt" --record "$REPO/docs/results/gpu-synthetic.json" \
  --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

"$VPY" -m ssd_allreduce.bench report   # docs/BENCHMARKS.md's GPU sections from the two records

echo "== GPU tests"
"$VPY" -m pytest -q -p no:cacheprovider "$REPO/tests/gpu" 2>&1 | tail -25
