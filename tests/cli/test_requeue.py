"""The Slurm tests' release of a requeued job (support/requeue.py): only once it has pended a while."""
from __future__ import annotations

import pytest

import requeue
from requeue import SETTLE_SECONDS, RequeueRelease


def test_a_requeued_job_is_released_only_after_pending_for_the_settle_time(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr(requeue.time, "monotonic", lambda: now[0])
    release = RequeueRelease()
    assert not release.due("COMPLETING")
    assert not release.due("PENDING")            # first seen pending: its last run may be ending
    now[0] += SETTLE_SECONDS - 0.1
    assert not release.due("PENDING")
    now[0] += 0.1
    assert release.due("PENDING")
    now[0] += 1
    assert not release.due("RUNNING")             # it started (or went back to completing): start afresh
    assert not release.due("PENDING")
    now[0] += SETTLE_SECONDS
    assert release.due("PENDING")
