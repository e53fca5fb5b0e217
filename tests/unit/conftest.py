"""The unit tier (``scripts/test.sh --fast``) starts no process: a test that needs one belongs in
tests/cli (a command as users type it) or tests/e2e."""
from __future__ import annotations

import os
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise RuntimeError("tests/unit starts no process (scripts/test.sh --fast): move this test to tests/cli "
                       "or tests/e2e")


@pytest.fixture(autouse=True)
def no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse)
