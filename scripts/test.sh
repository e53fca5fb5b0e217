#!/usr/bin/env bash
# Set up if needed, then the whole test suite (single-process, multi-rank, Slurm). Extra
# arguments go to pytest, e.g. scripts/test.sh -k optimizer -x
#
#   scripts/test.sh            # everything: about 19 minutes on 2 cores once set up (unit 0.5, cli 1,
#                              # ranks 3, e2e 11.5, slurm with the two emulated nodes 2.5)
#   scripts/test.sh -m "unit or cli or ranks"   # the tiers that need no network namespace or Slurm: 5 min
#   scripts/test.sh --fast     # tests/unit only (pytest -m unit): one process, no launcher, no Slurm
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SSD_VENV:-$REPO/.venv}
"$REPO/scripts/setup.sh"
cd "$REPO"
if [ "${1:-}" = --fast ]; then
  shift
  set -- -m unit "$@"
fi
echo "test.sh: running the suite with $VENV/bin/python"
exec "$VENV/bin/python" -m pytest -ra --durations=15 "$@"
