"""A byte-level language-modelling corpus built from the Python standard library's own sources.

Every machine that runs this project has it, so nothing is downloaded. The corpus is deterministic
for one Python installation: files are read in sorted order, each top-level module or package of
the library is one *source group*, and every group contributes at most the same number of bytes
(a water-filling cap, so big packages do not crowd out small ones). The last
``validation_fraction`` of each group is held out, so validation covers every group while
``--shards by-package`` hands each rank different groups to train on.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

VOCAB_SIZE = 256   # bytes
EXCLUDED = frozenset({"test", "tests", "__pycache__", "site-packages", "dist-packages"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library (the base one, in a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_groups(root: Path) -> dict[str, list[Path]]:
    """Top-level module or package name -> its ``.py`` files in sorted order; test suites left out."""
    groups: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name in EXCLUDED:
            continue
        if entry.is_file() and entry.suffix == ".py":
            groups[entry.stem] = [entry]
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            files = []
            for directory, subdirs, names in os.walk(entry):
                subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED)
                files += [Path(directory, n) for n in sorted(names) if n.endswith(".py")]
            if files:
                groups[entry.name] = files
    if not groups:
        raise FileNotFoundError(f"no Python sources found in {root}: the corpus is built from the standard "
                                f"library's .py files (is this a Python without its library sources?)")
    return groups


def water_filling_cap(sizes: list[int], budget: int) -> int:
    """The largest per-group cap c with sum(min(size, c)) <= budget."""
    remaining, cap = budget, 0
    ordered = sorted(sizes)
    for i, size in enumerate(ordered):
        share = remaining // (len(ordered) - i)
        if size > share:
            return share
        remaining -= size
        cap = size
    return cap


@dataclass(eq=False)
class Corpus:
    """Training and validation bytes, each with the source group of every byte's chunk."""

    train: list[tuple[str, bytes]]
    validation: list[tuple[str, bytes]]

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.train]

    def fingerprint(self) -> str:
        """SHA-256 of the whole corpus: ranks on different Python installations disagree here."""
        digest = hashlib.sha256()
        for name, text in self.train + self.validation:
            digest.update(name.encode() + b"\0" + text)
        return digest.hexdigest()


def build_corpus(max_bytes: int = 2_000_000, validation_fraction: float = 0.1,
                 root: Optional[Path] = None) -> Corpus:
    """The standard library's sources, about ``max_bytes`` in all, split per group into train and validation."""
    if max_bytes < 1024:
        raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    groups = source_groups(root or stdlib_root())
    texts = {name: b"\n".join(path.read_bytes() for path in files) for name, files in groups.items()}
    cap = water_filling_cap([len(t) for t in texts.values()], max_bytes)
    train, validation = [], []
    for name, text in texts.items():
        text = text[:cap]
        held_out = int(len(text) * validation_fraction)
        train.append((name, text[:len(text) - held_out]))
        validation.append((name, text[len(text) - held_out:]))
    return Corpus(train, validation)


def chunk(parts: list[tuple[str, bytes]], context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping sequences of ``context + 1`` bytes that never cross a group boundary:
    (uint8 tensor (N, context + 1), int64 group index of each)."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    width = context + 1
    sequences, groups = [], []
    for index, (_, text) in enumerate(parts):
        n = len(text) // width
        if n:
            sequences.append(torch.frombuffer(bytearray(text[:n * width]), dtype=torch.uint8).view(n, width))
            groups.append(torch.full((n,), index, dtype=torch.int64))
    if not sequences:
        raise ValueError(f"the corpus holds no sequence of {width} bytes: lower --context or raise --corpus-bytes")
    return torch.cat(sequences), torch.cat(groups)
