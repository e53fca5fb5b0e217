#!/usr/bin/env bash
# Set up if needed, then the whole test suite (single-process, multi-rank, Slurm). Extra
# arguments go to pytest, e.g. scripts/test.sh -k optimizer -x
#
#   scripts/test.sh            # everything (about 6 minutes on 2 cores once set up)
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
