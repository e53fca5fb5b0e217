"""The standard-library corpus built where there is no network: a process of its own in a network
namespace with no interface up (the unit tier starts no process)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from launchers import REPO
from ssd_allreduce.train import corpus


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to cut the network off")
def test_the_corpus_builds_without_any_network() -> None:
    """Built again in a network namespace that has no interface up: the same fingerprint."""
    code = "from ssd_allreduce.train import corpus; print(corpus.build_corpus(300_000).fingerprint())"
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"this machine does not allow network namespaces: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == corpus.build_corpus(300_000).fingerprint()
