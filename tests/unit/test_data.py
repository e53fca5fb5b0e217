"""Tests of ssd_allreduce.train.data."""
from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from ssd_allreduce.train.data import (
    CIFAR10_FILES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataSplit,
    FolderBatches,
    ShardedBatches,
    cifar_augment,
    load_cifar10,
    load_dataset,
    load_digits_split,
    load_imagefolder,
    load_synthetic,
    shard_indices,
    write_cifar10_fixture,
)
from ssd_allreduce.train.digits import read_digits, stratified_split


@pytest.fixture(scope="module")
def digits() -> DataSplit:
    return load_digits_split(seed=0)


def test_digits_split_sizes_and_normalisation(digits: DataSplit) -> None:
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert (digits.num_classes, digits.in_channels, digits.image_size, digits.name) == (10, 1, 8, "digits")
    assert digits.train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert digits.train_x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_digits_split_is_deterministic_and_stratified(digits: DataSplit) -> None:
    again = load_digits_split(seed=0)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    other = load_digits_split(seed=1)
    assert not torch.equal(other.test_y, digits.test_y)
    full = torch.bincount(torch.cat([digits.train_y, digits.test_y]), minlength=10).double()
    test = torch.bincount(digits.test_y, minlength=10).double()
    assert torch.all((test - 0.2 * full).abs() <= 1.0)


@pytest.mark.parametrize("test_fraction", [0.2, 0.1, 0.33])
def test_digits_are_scikit_learns_split_as_its_train_test_split_splits_them(test_fraction: float) -> None:
    """Read and split without importing scikit-learn, the data and the sets are its own, in its order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    theirs = load_digits()
    pixels, labels = read_digits()
    assert np.array_equal(pixels, theirs.images) and np.array_equal(labels, theirs.target)
    everyone = np.arange(len(labels))
    for seed in range(8):
        train, test = train_test_split(everyone, test_size=test_fraction, random_state=seed, stratify=labels)
        ours = stratified_split(labels, test_fraction, seed)
        assert np.array_equal(ours[0], train) and np.array_equal(ours[1], test), seed


def test_digits_rejects_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)
    with pytest.raises(ValueError, match="test_fraction 0.001 leaves 1795 to train and 2 to test"):
        load_digits_split(test_fraction=0.001)   # fewer test samples than classes, as scikit-learn refuses


@pytest.mark.parametrize("mode", ["shuffle", "label-skew"])
def test_shards_are_disjoint_equal_and_cover(digits: DataSplit, mode: str) -> None:
    labels = digits.train_y
    shards = [shard_indices(labels, 8, s, epoch=3, seed=5, mode=mode) for s in range(8)]
    assert all(len(s) == len(labels) // 8 for s in shards)
    union = torch.cat(shards)
    assert len(torch.unique(union)) == len(union) == len(labels) - len(labels) % 8
    assert torch.equal(shards[2], shard_indices(labels, 8, 2, epoch=3, seed=5, mode=mode))
    assert not torch.equal(shards[2], shard_indices(labels, 8, 2, epoch=4, seed=5, mode=mode))


def test_shuffle_matches_distributed_sampler_rule() -> None:
    labels = torch.zeros(10, dtype=torch.int64)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7 + 2))
    assert torch.equal(shard_indices(labels, 3, 1, epoch=2, seed=7), perm[:9][1::3])


def test_label_skew_gives_few_dominant_classes(digits: DataSplit) -> None:
    labels = digits.train_y
    for s in range(8):
        counts = torch.bincount(labels[shard_indices(labels, 8, s, 0, 0, "label-skew")], minlength=10)
        assert (counts > 0).sum().item() <= 3
        assert counts.sort(descending=True).values[:2].sum().item() >= 0.8 * counts.sum().item()
    shuffled = torch.bincount(labels[shard_indices(labels, 8, 0, 0, 0, "shuffle")], minlength=10)
    assert (shuffled > 0).sum().item() == 10


@pytest.mark.parametrize("kwargs,match", [
    ({"num_shards": 4, "shard": 4}, "shard must be in \\[0, 4\\), got 4"),
    ({"num_shards": 4, "shard": -1}, "got -1"),
    ({"num_shards": 0, "shard": 0}, "num_shards must be >= 1, got 0"),
    ({"num_shards": 2, "shard": 0, "mode": "iid"}, "'iid'"),
])
def test_shard_indices_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shard_indices(torch.arange(10), epoch=0, seed=0, **kwargs)


@pytest.mark.parametrize("augment", [None, cifar_augment])
def test_sharded_batches_resume_mid_epoch(augment) -> None:
    split = load_synthetic(num_samples=203, image_size=8, in_channels=3, num_classes=4, seed=1)
    batches = ShardedBatches(split.train_x, split.train_y, batch_size=16, num_shards=3, shard=1, seed=9,
                             augment=augment)
    assert batches.steps_per_epoch == (203 // 3) // 16 == 4
    full = list(batches.epoch(2))
    tail = list(batches.epoch(2, start_step=3))
    assert len(full) == 4 and len(tail) == 1
    assert torch.equal(tail[0][0], full[3][0]) and torch.equal(tail[0][1], full[3][1])
    assert all(x.shape == (16, 3, 8, 8) and y.shape == (16,) for x, y in full)
    assert not torch.equal(list(batches.epoch(3))[0][0], full[0][0])
    if augment is not None:
        plain = ShardedBatches(split.train_x, split.train_y, batch_size=16, num_shards=3, shard=1, seed=9)
        assert not torch.equal(next(plain.epoch(2))[0], full[0][0])


def test_sharded_batches_batch_too_large() -> None:
    with pytest.raises(ValueError, match="larger than the shard \\(25 samples"):
        ShardedBatches(torch.zeros(100, 1), torch.zeros(100, dtype=torch.int64), batch_size=32, num_shards=4, shard=0)


def test_folder_batches_match_sharded_batches() -> None:
    class Labelled(torch.utils.data.Dataset):
        def __init__(self, x: Tensor, y: Tensor) -> None:
            self.x, self.y, self.targets = x, y, y.tolist()

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
            return self.x[i], self.y[i]

    split = load_synthetic(num_samples=100, image_size=8, in_channels=1, num_classes=10, seed=2)
    kwargs = dict(batch_size=8, num_shards=2, shard=1, seed=3, mode="label-skew")
    folder = FolderBatches(Labelled(split.train_x, split.train_y), **kwargs)
    memory = ShardedBatches(split.train_x, split.train_y, **kwargs)
    assert folder.steps_per_epoch == memory.steps_per_epoch == 6
    got, want = list(folder.epoch(1, start_step=4)), list(memory.epoch(1, start_step=4))
    assert len(got) == len(want) == 2
    for (gx, gy), (wx, wy) in zip(got, want):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_cifar_augment_crops_and_flips_deterministically() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1.0
    a = cifar_augment(x, torch.Generator().manual_seed(0))
    b = cifar_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (2,), generator=g), torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        want = padded[i, :, top[i]:top[i] + 32, left[i]:left[i] + 32]
        assert torch.equal(a[i], want.flip(2) if flip[i] else want)


def test_synthetic_split() -> None:
    split = load_synthetic(num_samples=50, image_size=16, in_channels=3, num_classes=7, seed=4)
    assert split.train_x.shape == (50, 3, 16, 16) and split.test_x.shape == (5, 3, 16, 16)
    assert int(split.train_y.max()) < 7 and split.train_y.dtype == torch.int64
    assert torch.equal(split.train_x, load_synthetic(50, 16, 3, 7, seed=4).train_x)


def test_cifar10_fixture_round_trip(tmp_path: Path) -> None:
    directory = write_cifar10_fixture(tmp_path, n_train_per_batch=6, n_test=4, seed=3)
    assert directory == tmp_path / "cifar-10-batches-py"
    with open(directory / "data_batch_1", "rb") as f:
        written = pickle.load(f, encoding="bytes")
    assert set(written) == {b"batch_label", b"labels", b"data", b"filenames"}
    with open(directory / "test_batch", "rb") as f:
        written_test = pickle.load(f, encoding="bytes")
    for root in (tmp_path, directory):
        split = load_cifar10(root)
        assert split.train_x.shape == (30, 3, 32, 32) and split.test_x.shape == (4, 3, 32, 32)
        assert (split.num_classes, split.in_channels, split.image_size, split.name) == (10, 3, 32, "cifar10")
        assert split.train_y[:6].tolist() == written[b"labels"]
        assert split.test_y.tolist() == written_test[b"labels"]
        mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
        pixels = (split.train_x[0] * std + mean) * 255.0
        expected = torch.from_numpy(written[b"data"][0].reshape(3, 32, 32).astype(np.float32))
        assert torch.allclose(pixels, expected, atol=1e-3)


def test_cifar10_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "cifar-10-python.tar.gz" in message
    assert all(name in message for name in CIFAR10_FILES)


def test_cifar10_missing_one_file(tmp_path: Path) -> None:
    directory = write_cifar10_fixture(tmp_path, 2, 2)
    (directory / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_4\)") as info:
        load_cifar10(tmp_path)
    assert str(directory) in str(info.value)


def test_cifar10_corrupt_files(tmp_path: Path) -> None:
    directory = write_cifar10_fixture(tmp_path, 2, 2)
    (directory / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar10(directory)
    with open(directory / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' must be uint8 of shape \(N, 3072\)"):
        load_cifar10(directory)


def test_load_dataset_dispatch_and_errors(tmp_path: Path) -> None:
    split = load_dataset("synthetic", num_samples=10, image_size=8, in_channels=1, num_classes=2)
    assert split.name == "synthetic" and split.train_x.shape == (10, 1, 8, 8)
    write_cifar10_fixture(tmp_path, 2, 3)
    assert load_dataset("cifar10", root=tmp_path).test_x.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="'mnist'.*digits, cifar10, imagefolder, synthetic"):
        load_dataset("mnist")
    for name in ("cifar10", "imagefolder"):
        with pytest.raises(ValueError, match="--data-dir"):
            load_dataset(name)


def test_imagefolder_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing .*val;.*train/<class>/\*\.jpg"):
        load_imagefolder(tmp_path)


def test_imagefolder_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="needs torchvision"):
        load_imagefolder(tmp_path)


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision.datasets")
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _torchvision_importable(), reason="torchvision is not importable beside this torch")
def test_imagefolder_with_torchvision(tmp_path: Path) -> None:
    from PIL import Image

    for part in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (label * 200, 10, 10)).save(tmp_path / part / name / f"{i}.png")
    data = load_imagefolder(tmp_path)
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 224)
    x, y = data.test[3]
    assert x.shape == (3, 224, 224) and y == 1
    batches = FolderBatches(data.train, batch_size=2, num_shards=1, shard=0)
    xb, yb = next(batches.epoch(0))
    assert xb.shape == (2, 3, 224, 224) and set(yb.tolist()) <= {0, 1}
