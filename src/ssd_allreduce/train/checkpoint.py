"""Checkpoints that a crash or a bad file cannot turn into a lost run, and that run no code.

Layout under ``<run>/checkpoints/``::

    step-00001234/rank-0.pt ... rank-N.pt   each rank's model, optimizer (SSD-SGD state included),
                                            scheduler, scaler, RNG states, data position
    step-00001234/manifest.json             written by rank 0 once every rank's file is in place,
                                            with each file's SHA-256
    latest                                  names the newest complete checkpoint (for people)

Every file is written to a temporary name, flushed and renamed, so the previous checkpoint stays
valid until the new manifest exists; checkpoints beyond the newest ``keep`` are then removed.
Loading checks each file against its checksum and reads it with ``weights_only=True``: tensors and
plain values only, so a file planted in a shared run directory cannot execute anything. When the
newest checkpoint is damaged, resuming takes the newest intact one and says so. SSD-SGD's local
weights differ between ranks, hence one file per rank.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

MANIFEST = "manifest.json"
LATEST = "latest"
AllGather = Callable[[Any], list[Any]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(root: Union[str, Path], rank: int, allgather: AllGather) -> None:
    """Collective: every rank writes and removes a probe file under ``root`` before training, so an
    unwritable checkpoint directory stops every rank at once instead of after an epoch."""
    root = Path(root)
    probe = root / f".probe-rank{rank}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        problem = None
    except OSError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    problems = [(r, p) for r, p in enumerate(allgather(problem)) if p]
    if problems:
        where = "; ".join(f"rank {r}: {p}" for r, p in problems)
        raise CheckpointError(f"cannot write checkpoints to {root} ({where}): point --out at a directory "
                              "every rank can write")


def save(root: Union[str, Path], step: int, rank: int, world_size: int, state: dict[str, Any],
         manifest: dict[str, Any], allgather: AllGather, keep: int = 2) -> Path:
    """Collective: every rank calls it with its own ``state``; returns the checkpoint directory."""
    root = Path(root)
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank-{rank}.pt"
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
        mine: tuple[Optional[str], Optional[str]] = (_sha256(path), None)
    except OSError as exc:                      # a full disk on one rank: every rank must hear of it
        mine = (None, f"{type(exc).__name__}: {exc}")
    gathered = allgather(mine)                  # also: every rank's file is in place
    failed = [f"rank {r}: {problem}" for r, (_, problem) in enumerate(gathered) if problem]
    if failed:
        raise CheckpointError(f"the checkpoint at step {step} could not be written ({'; '.join(failed)}); "
                              "the previous one is intact")
    if rank == 0:
        manifest = dict(manifest, step=step, world_size=world_size,
                        files={f"rank-{r}.pt": digest for r, (digest, _) in enumerate(gathered)})
        _atomic_write(directory / MANIFEST, lambda f: json.dump(manifest, f, indent=1), mode="w")
        _atomic_write(root / LATEST, lambda f: f.write(directory.name), mode="w")
        for old in _superseded(root, directory, keep):
            shutil.rmtree(old, ignore_errors=True)
    allgather(None)
    return directory


def _superseded(root: Path, newest: Path, keep: int) -> list[Path]:
    """What a save of ``newest`` makes obsolete: complete checkpoints beyond the ``keep`` newest up
    to it, and every later one (left by a run that was resumed from an earlier step: a later
    --resume must not go back to that abandoned future)."""
    others = [d for d in complete(root) if d != newest]
    later = [d for d in others if d.name > newest.name]
    earlier = [d for d in others if d.name < newest.name]
    return later + earlier[keep - 1:]


def complete(root: Path) -> list[Path]:
    """The complete checkpoints (those with a manifest) under ``root``, newest first."""
    return sorted((d for d in root.glob("step-*") if (d / MANIFEST).exists()), reverse=True)


def candidates(path: Union[str, Path]) -> list[Path]:
    """The checkpoints ``path`` names, newest first: a ``step-*`` directory alone, or every complete
    one of a run directory or its ``checkpoints/``."""
    path = Path(path)
    if path.name.startswith("step-"):
        if not (path / MANIFEST).exists():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); it was "
                                  "interrupted while being written: resume from an older step-* directory")
        return [path]
    return complete(path / "checkpoints") or complete(path)


def _manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {directory / MANIFEST} ({exc})") from exc


def check_fits(directory: Path, manifest: dict[str, Any], world_size: int, expect: dict[str, Any]) -> None:
    """Raise unless the checkpoint was written by a job like this one (``expect``: manifest entries
    that must match, such as the model and the parameter shapes)."""
    if manifest.get("world_size") != world_size:
        raise CheckpointError(f"{directory} was written by {manifest.get('world_size')} ranks and this "
                              f"job has {world_size}: SSD-SGD keeps per-rank local weights, so resume "
                              f"with {manifest.get('world_size')} ranks (or start a new run)")
    for key, value in expect.items():
        if manifest.get(key) != value:
            raise CheckpointError(f"{directory} does not fit this run: its {key} is "
                                  f"{manifest.get(key)!r}, this run's is {value!r}; resume with the "
                                  f"same settings or point --out at a new directory")


def load(directory: Path, rank: int, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """This rank's state, after checking its file against the manifest's checksum."""
    path = directory / f"rank-{rank}.pt"
    expected = _manifest(directory).get("files", {}).get(path.name)
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise CheckpointError(f"{path} is missing or unreadable ({exc})") from exc
    if actual != expected:
        raise CheckpointError(f"{path} is corrupt or truncated (SHA-256 {actual[:12]}…, the manifest "
                              f"says {str(expected)[:12]}…)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]}), which loading would "
                              "have to execute; it was not written by this program") from exc


def resume_state(path: Union[str, Path], rank: int, world_size: int, expect: dict[str, Any],
                 allgather: AllGather, map_location: Union[str, torch.device] = "cpu"
                 ) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
    """Collective: (the newest checkpoint that every rank can load, this rank's state in it, why
    newer ones were passed over). (None, None, []) when there is no checkpoint yet."""
    passed_over: list[str] = []
    for directory in candidates(path):
        try:
            manifest = _manifest(directory)
        except CheckpointError as exc:     # the same file, read alike on every rank
            passed_over.append(f"{directory}: {exc}")
            continue
        check_fits(directory, manifest, world_size, expect)
        try:
            state, problem = load(directory, rank, map_location), None
        except CheckpointError as exc:
            state, problem = None, str(exc)
        problems = [p for p in allgather(problem) if p]
        if not problems:
            return directory, state, passed_over
        passed_over.append(f"{directory}: {'; '.join(problems)}")
    if passed_over:
        raise CheckpointError("no intact checkpoint to resume from: " + " | ".join(passed_over) +
                              "; start a new run (point --out elsewhere, or drop --resume)")
    return None, None, []
