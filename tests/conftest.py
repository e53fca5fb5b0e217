"""The suite's tiers are its folders; each test is marked with its folder's name, so
``pytest -m unit`` (``scripts/test.sh --fast``) or ``-m "not slurm"`` picks tiers:

- ``unit``: one process, no launcher (N ranks as threads, see ``support/threaded.py``);
- ``cli``: the commands users type, as processes;
- ``ranks``: real ranks under horovodrun, torchrun and mpirun;
- ``e2e``: the driver and the benchmark end to end, faults, elastic training, emulated networks;
- ``slurm``: jobs on a local Slurm (one node, and two emulated nodes);
- ``gpu``: needs a CUDA GPU (skipped without one).

Shared helpers live in ``support/`` (on ``sys.path``): launchers with timeouts that print every
rank's output, the reference written from SPEC's formulas, the fakes and the worker scripts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread in the test process, as in the ranks the tests start (OMP_NUM_THREADS=1):
# its tensors are small, and beside another test's ranks a second thread mostly spins for a core
torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
TIERS = ("unit", "cli", "ranks", "e2e", "slurm", "gpu")
sys.path.insert(0, str(HERE / "support"))
sys.path.insert(0, str(HERE / "support" / "workers"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(HERE).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of the tier folders {TIERS}")
        item.add_marker(getattr(pytest.mark, tier))
