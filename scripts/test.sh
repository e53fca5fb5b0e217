#!/usr/bin/env bash
# Set up if needed, then the whole test suite (single-process, multi-rank, Slurm). Extra
# arguments go to pytest, e.g. scripts/test.sh -k optimizer -x
#
#   scripts/test.sh            # everything: the tiers but slurm on 2 pytest-xdist workers, then the
#                              # slurm tier and the timed tests alone: about 12 minutes on 2 cores
#                              # once set up
#   SSD_TEST_WORKERS=0 scripts/test.sh   # all serially: about 21 minutes (unit 0.5, cli 1, ranks 3.5,
#                              # e2e 13, slurm with the two emulated nodes 3)
#   scripts/test.sh -m "unit or cli or ranks"   # the tiers that need no network namespace or Slurm
#   scripts/test.sh --fast     # tests/unit only (pytest -m unit): one process, no launcher
#
# With arguments the selection runs serially (SSD_TEST_WORKERS=2 puts it on workers, Slurm tests
# too). In the whole run the slurm tier does not share the cores with a second worker: its jobs'
# fault bounds and its daemons' heartbeats are timed; nor do the tests marked timed (a rank's pace).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SSD_VENV:-$REPO/.venv}
"$REPO/scripts/setup.sh"
cd "$REPO"
if [ "${1:-}" = --fast ]; then
  shift
  set -- -m unit "$@"
fi
WORKERS=${SSD_TEST_WORKERS:-$([ $# -gt 0 ] && echo 0 || echo 2)}
if [ "$WORKERS" != 0 ] && ! "$VENV/bin/python" -c "import xdist" 2>/dev/null; then
  echo "test.sh: pytest-xdist is not installed: running serially"
  WORKERS=0
fi
pytest() { "$VENV/bin/python" -m pytest -ra --durations=15 "$@"; }
echo "test.sh: running the suite with $VENV/bin/python (workers: $WORKERS)"
if [ "$WORKERS" = 0 ]; then
  pytest "$@"
elif [ $# -gt 0 ]; then
  pytest -n "$WORKERS" "$@"
else
  status=0
  pytest -n "$WORKERS" -m "not slurm and not timed" || status=$?
  case $status in 2|3|4) exit "$status" ;; esac   # interrupted, or pytest itself failed
  echo "test.sh: the slurm tier and the timed tests, alone"
  pytest -m "slurm or timed" || status=$((status ? status : $?))
  exit "$status"
fi
