#!/usr/bin/env bash
# The main job: set up if needed, then a short side-by-side comparison of SSD-SGD against plain
# Horovod (plus blocking local SGD and the no-communication limit) on 2 local ranks
# (horovodrun, Gloo), on the digits bundled with scikit-learn, over an emulated 100 Mbit/s network
# when this machine allows network namespaces (root), else over the plain loopback (it says so).
#
#   scripts/main.sh                          # about 1 minute once set up
#   scripts/main.sh --bandwidths 1gbit 100mbit --epochs 10     # any option of ssd_allreduce.bench compare
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/scripts/setup.sh" >&2
VENV=${SSD_VENV:-$REPO/.venv}
cd "$REPO"
exec "$VENV/bin/python" -m ssd_allreduce.bench compare --ranks 2 --bandwidths 100mbit --epochs 5 \
  --warmup-steps 20 --ssd-configs 5:5 10:10 --out "$REPO/results/main" "$@"
