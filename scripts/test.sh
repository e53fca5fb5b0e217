#!/usr/bin/env bash
# Set up if needed, then the whole test suite (single-process, multi-rank, Slurm). Extra
# arguments go to pytest, e.g. scripts/test.sh -k optimizer -x
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/scripts/setup.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest -ra --durations=15 "$@"
