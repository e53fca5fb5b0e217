"""Tests of the standard-library text corpus (ssd_allreduce.train.corpus) and its shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssd_allreduce.train import corpus
from ssd_allreduce.train.data import ShardedBatches, TextSplit, load_stdlib_text


@pytest.fixture(scope="module")
def text() -> TextSplit:
    return load_stdlib_text(context=32, max_bytes=400_000)


def test_the_corpus_is_the_same_bytes_every_time_it_is_built() -> None:
    first, second = corpus.build_corpus(300_000), corpus.build_corpus(300_000)
    assert first.fingerprint() == second.fingerprint()
    assert [t for _, t in first.train] == [t for _, t in second.train]
    total = sum(len(t) for _, t in first.train + first.validation)
    assert 250_000 < total <= 300_000


def test_groups_are_the_library_top_level_modules_without_test_suites() -> None:
    groups = corpus.source_groups(corpus.stdlib_root())
    assert {"json", "email", "asyncio", "os", "collections"} <= set(groups)
    assert "test" not in groups
    assert all("/test/" not in str(p) and "/tests/" not in str(p) for files in groups.values() for p in files)
    assert groups["json"] == sorted(groups["json"]) and all(p.suffix == ".py" for p in groups["json"])


def test_a_library_without_sources_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Python sources found in"):
        corpus.source_groups(tmp_path)


@pytest.mark.parametrize("sizes, budget, cap", [([10, 20, 30], 60, 30), ([10, 20, 30], 45, 17),
                                                ([5, 100, 100], 45, 20), ([100], 7, 7)])
def test_every_group_gives_at_most_the_same_share(sizes: list[int], budget: int, cap: int) -> None:
    assert corpus.water_filling_cap(sizes, budget) == cap
    assert sum(min(s, cap) for s in sizes) <= budget


def test_validation_is_the_tail_of_every_group(tmp_path: Path) -> None:
    (tmp_path / "alpha.py").write_bytes(b"a" * 900 + b"A" * 100)
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "__init__.py").write_bytes(b"b" * 1800 + b"B" * 200)
    (tmp_path / "beta" / "tests").mkdir()
    (tmp_path / "beta" / "tests" / "test_x.py").write_bytes(b"never read")
    c = corpus.build_corpus(max_bytes=3000, validation_fraction=0.1, root=tmp_path)
    assert c.train == [("alpha", b"a" * 900), ("beta", b"b" * 1800)]
    assert c.validation == [("alpha", b"A" * 100), ("beta", b"B" * 200)]


def test_sequences_never_cross_a_group_and_targets_are_the_next_byte(text: TextSplit) -> None:
    c = corpus.build_corpus(200_000)
    sequences, groups = corpus.chunk(c.train, 32)
    for index in (0, len(groups) // 2, len(groups) - 1):
        g = int(groups[index])
        first = int((groups == g).nonzero()[0])
        offset = (index - first) * 33
        assert bytes(sequences[index].tolist()) == c.train[g][1][offset:offset + 33]
    assert torch.equal(text.train_x[:, 1:], text.train_y[:, :-1])
    assert text.train_x.dtype == torch.int64 and text.train_x.shape[1] == 32 and text.vocab_size == 256


def test_by_package_shards_give_each_rank_its_own_packages(text: TextSplit) -> None:
    """Natural non-IID: two ranks share at most the one package at their boundary; shuffled
    shards both see nearly every package."""
    def groups_of(mode: str, shard: int) -> set[int]:
        batches = ShardedBatches(text.train_x, text.train_y, 8, 2, shard, seed=0, mode=mode, groups=text.train_groups)
        indices = batches._indices(0, 0)
        return set(text.train_groups[indices].tolist())

    by_package = [groups_of("by-package", r) for r in (0, 1)]
    assert len(by_package[0] & by_package[1]) <= 1
    assert len(by_package[0] | by_package[1]) == len(text.group_names)
    shuffled = [groups_of("shuffle", r) for r in (0, 1)]
    assert min(len(s) for s in shuffled) > 0.9 * len(text.group_names)
