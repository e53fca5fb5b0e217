"""Checkpoints that a crash cannot corrupt: every rank's state, committed all at once.

Layout under ``<run>/checkpoints/``::

    step-00001234/rank-0.pt ... rank-N.pt   each rank's model, optimizer (SSD-SGD state included),
                                            scheduler, scaler, RNG states, data position
    step-00001234/manifest.json             written by rank 0 after every rank's file is in place
    latest                                  names the newest complete checkpoint (atomic rename)

Every file is written to a temporary name, flushed and renamed, so the previous checkpoint stays
valid until ``latest`` points at the new one; older checkpoints beyond ``keep`` are then removed.
SSD-SGD's local weights differ between ranks, hence one file per rank.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: Union[str, Path], step: int, rank: int, world_size: int, state: dict[str, Any],
         manifest: dict[str, Any], barrier: Callable[[], None], keep: int = 2) -> Path:
    """Collective: every rank calls it with its own ``state``; returns the checkpoint directory."""
    root = Path(root)
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / f"rank-{rank}.pt", lambda f: torch.save(state, f))
    barrier()
    if rank == 0:
        manifest = dict(manifest, step=step, world_size=world_size,
                        files=[f"rank-{r}.pt" for r in range(world_size)])
        _atomic_write(directory / MANIFEST, lambda f: json.dump(manifest, f, indent=1), mode="w")
        _atomic_write(root / LATEST, lambda f: f.write(directory.name), mode="w")
        complete = sorted(d for d in root.glob("step-*") if (d / MANIFEST).exists())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return directory


def find(path: Union[str, Path]) -> Optional[Path]:
    """The checkpoint directory ``path`` names: a ``step-*`` directory, or a run/checkpoints
    directory whose ``latest`` is followed. None when there is no checkpoint yet."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            target = root / (root / LATEST).read_text().strip()
            if not (target / MANIFEST).exists():
                raise CheckpointError(f"{root / LATEST} names {target}, which has no {MANIFEST}: "
                                      f"resume from an older step-* directory in {root}")
            return target
    if path.name.startswith("step-"):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); it was "
                              f"interrupted while being written: resume from an older step-* directory")
    return None


def load(directory: Path, rank: int, world_size: int, expect: dict[str, Any],
         map_location: Union[str, torch.device] = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's state and the manifest, after checking the checkpoint fits this job.

    ``expect`` holds manifest entries that must match (model, mode, parameter shapes...)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {directory / MANIFEST} ({exc}): resume from an older "
                              f"step-* directory beside it") from exc
    if manifest.get("world_size") != world_size:
        raise CheckpointError(f"{directory} was written by {manifest.get('world_size')} ranks and this "
                              f"job has {world_size}: SSD-SGD keeps per-rank local weights, so resume "
                              f"with {manifest.get('world_size')} ranks (or start a new run)")
    for key, value in expect.items():
        if manifest.get(key) != value:
            raise CheckpointError(f"{directory} does not fit this run: its {key} is "
                                  f"{manifest.get(key)!r}, this run's is {value!r}; resume with the "
                                  f"same settings or point --out at a new directory")
    path = directory / f"rank-{rank}.pt"
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                              f"resume from an older step-* directory beside it") from exc
    return state, manifest
