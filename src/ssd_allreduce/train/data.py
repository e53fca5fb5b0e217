"""Data sets kept in memory (digits, CIFAR-10, synthetic, the standard-library text corpus),
ImageNet-style folders, and per-rank sharding."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .digits import read_digits, stratified_split

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "imagefolder", "synthetic", "stdlib")
# non-IID modes hand each shard a contiguous run of the data sorted by a group: the label for
# images, the source package for text
NON_IID_MODES: dict[str, str] = {"label-skew": "label", "by-package": "package"}
SHARD_MODES: tuple[str, ...] = ("shuffle", *NON_IID_MODES)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_FILES: tuple[str, ...] = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR10_LABEL_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(eq=False)
class DataSplit:
    """In-memory train/test split: float32 NCHW normalised images and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str


@dataclass(eq=False)
class FolderData:
    """Train/test datasets read lazily from image folders (torchvision ImageFolder)."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int = 3
    image_size: int = 224
    name: str = "imagefolder"


@dataclass(eq=False)
class TextSplit:
    """Byte-level language modelling: int64 (N, context) inputs and next-byte targets, and the
    source group of every training sequence (for ``by-package`` shards)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_groups: Tensor
    group_names: list[str]
    fingerprint: str
    vocab_size: int
    context: int
    name: str = "stdlib"


def load_stdlib_text(context: int = 64, max_bytes: int = 2_000_000) -> TextSplit:
    """The standard-library corpus (see ``corpus``) cut into sequences of ``context`` bytes."""
    from . import corpus

    text = corpus.build_corpus(max_bytes)
    train, groups = corpus.chunk(text.train, context)
    test, _ = corpus.chunk(text.validation, context)
    train, test = train.long(), test.long()
    return TextSplit(train_x=train[:, :-1], train_y=train[:, 1:], test_x=test[:, :-1], test_y=test[:, 1:],
                     train_groups=groups, group_names=text.group_names, fingerprint=text.fingerprint(),
                     vocab_size=corpus.VOCAB_SIZE, context=context)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DataSplit:
    """scikit-learn's bundled 8x8 digits with a seeded stratified split, normalised by train mean/std."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pixels, labels = read_digits()
    images = pixels.astype(np.float32) / 16.0
    train, test = stratified_split(labels, test_fraction, seed)
    train_x, test_x, train_y, test_y = images[train], images[test], labels[train], labels[test]
    mean, std = float(train_x.mean()), float(train_x.std())
    return DataSplit(
        train_x=torch.from_numpy((train_x - mean) / std).unsqueeze(1),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy((test_x - mean) / std).unsqueeze(1),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
        in_channels=1,
        image_size=8,
        name="digits",
    )


def _cifar10_dir(root: str | os.PathLike) -> Path:
    """The directory holding the CIFAR-10 batch files: ``root`` itself or ``root/cifar-10-batches-py``."""
    root = Path(root)
    candidates = (root, root / CIFAR10_DIRNAME)
    for directory in candidates:
        if all((directory / name).is_file() for name in CIFAR10_FILES):
            return directory
    looked_in = next((d for d in candidates if any((d / n).exists() for n in CIFAR10_FILES)), None)
    if looked_in is None:
        where = f"{root} or {root / CIFAR10_DIRNAME}"
        missing = CIFAR10_FILES
    else:
        where = str(looked_in)
        missing = tuple(n for n in CIFAR10_FILES if not (looked_in / n).is_file())
    raise FileNotFoundError(
        f"CIFAR-10 (python version) not found: looked in {where}; expected files "
        f"{', '.join(CIFAR10_FILES)} (missing: {', '.join(missing)}). "
        f"Download {CIFAR10_URL}, extract it, and point --data-dir at the folder containing "
        f"{CIFAR10_DIRNAME}/ (or at {CIFAR10_DIRNAME}/ itself)"
    )


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 pickle file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise ValueError(f"{path} is not a valid CIFAR-10 python batch (unpickling failed: {exc}); "
                         f"re-extract {CIFAR10_URL}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a valid CIFAR-10 python batch: expected a dict with keys "
                         f"b'data' and b'labels'; re-extract {CIFAR10_URL}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    valid_labels = (
        labels.shape == (data.shape[0],)
        and np.issubdtype(labels.dtype, np.integer)
        and bool(np.all((labels >= 0) & (labels <= 9)))
    )
    if not valid_labels:
        raise ValueError(f"{path}: b'labels' must hold {data.shape[0]} integers in 0..9, "
                         f"got {labels.dtype} of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _normalise_cifar10(images: np.ndarray) -> Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(images).float().div_(255.0) - mean) / std


def load_cifar10(root: str | os.PathLike) -> DataSplit:
    """CIFAR-10 python version from ``root`` (or ``root/cifar-10-batches-py``), normalised by the standard mean/std."""
    directory = _cifar10_dir(root)
    train = [_read_cifar10_batch(directory / name) for name in CIFAR10_TRAIN_FILES]
    test_x, test_y = _read_cifar10_batch(directory / CIFAR10_TEST_FILE)
    return DataSplit(
        train_x=_normalise_cifar10(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=_normalise_cifar10(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
        in_channels=3,
        image_size=32,
        name="cifar10",
    )


def write_cifar10_fixture(root: str | os.PathLike, n_train_per_batch: int, n_test: int, seed: int = 0) -> Path:
    """Write a small random CIFAR-10 python-format directory under ``root`` and return its path."""
    if n_train_per_batch < 1 or n_test < 1:
        raise ValueError(f"n_train_per_batch and n_test must be >= 1, got {n_train_per_batch} and {n_test}")
    directory = Path(root) / CIFAR10_DIRNAME
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    batches = [(name, f"training batch {i} of 5", n_train_per_batch) for i, name in enumerate(CIFAR10_TRAIN_FILES, 1)]
    batches.append((CIFAR10_TEST_FILE, "testing batch 1 of 1", n_test))
    for name, batch_label, n in batches:
        labels = rng.randint(0, 10, size=n)
        batch = {
            b"batch_label": batch_label.encode(),
            b"labels": [int(label) for label in labels],
            b"data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"{CIFAR10_LABEL_NAMES[label]}_s_{i:06d}.png".encode() for i, label in enumerate(labels)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"num_cases_per_batch": n_train_per_batch,
        b"label_names": [name.encode() for name in CIFAR10_LABEL_NAMES],
        b"num_vis": 3072,
    }
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return directory


def load_synthetic(num_samples: int, image_size: int, in_channels: int, num_classes: int, seed: int = 0) -> DataSplit:
    """Random normal images with random labels; ``num_samples`` train plus ``max(1, num_samples // 10)`` test."""
    for label, value in (("num_samples", num_samples), ("image_size", image_size),
                         ("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    g = torch.Generator().manual_seed(seed)
    total = num_samples + max(1, num_samples // 10)
    x = torch.randn(total, in_channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (total,), generator=g)
    return DataSplit(
        train_x=x[:num_samples], train_y=y[:num_samples], test_x=x[num_samples:], test_y=y[num_samples:],
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, name="synthetic",
    )


def load_imagefolder(root: str | os.PathLike) -> FolderData:
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` as torchvision ImageFolders."""
    root = Path(root)
    layout = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg (one folder per class)"
    missing = [str(root / part) for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"image folder data set: missing {', '.join(missing)}; {layout}")
    try:
        from torchvision import datasets, transforms
    except (ImportError, RuntimeError, AttributeError, OSError) as exc:
        raise ImportError(
            f"the imagefolder data set needs torchvision (matching your torch); install it "
            f"(importing torchvision failed: {exc})"
        ) from exc
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = datasets.ImageFolder(str(root / "train"), transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise,
    ]))
    test = datasets.ImageFolder(str(root / "val"), transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise,
    ]))
    if train.classes != test.classes:
        raise ValueError(f"{root}/train and {root}/val must hold the same class folders; "
                         f"train has {len(train.classes)}, val has {len(test.classes)}")
    return FolderData(train=train, test=test, num_classes=len(train.classes))


def load_dataset(name: str, root: str | os.PathLike | None = None, **kw: Any) -> DataSplit | FolderData | TextSplit:
    """Load data set ``name`` (digits, cifar10, imagefolder, synthetic, stdlib); ``kw`` go to its loader."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; valid names are {', '.join(DATASET_NAMES)}")
    if name == "digits":
        return load_digits_split(**kw)
    if name == "synthetic":
        return load_synthetic(**kw)
    if name == "stdlib":
        return load_stdlib_text(**kw)
    if root is None:
        raise ValueError(f"data set {name!r} reads files from disk: pass --data-dir (root=...) pointing at it")
    if name == "cifar10":
        return load_cifar10(root, **kw)
    return load_imagefolder(root, **kw)


def shard_indices(labels: Tensor, num_shards: int, shard: int, epoch: int, seed: int,
                  mode: str = "shuffle") -> Tensor:
    """Indices of ``shard`` for ``epoch``: equal-length, disjoint, identical on every rank for (seed, epoch).

    "shuffle" matches DistributedSampler(drop_last=True); the non-IID modes ("label-skew",
    "by-package") hand each shard a contiguous chunk of the data sorted by ``labels`` (the class,
    or the source group), so it sees mostly one or two of them.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if mode not in SHARD_MODES:
        raise ValueError(f"unknown shard mode {mode!r}; valid modes are {', '.join(SHARD_MODES)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n = labels.numel()
    total = n - n % num_shards
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    if mode == "shuffle":
        return perm[:total][shard::num_shards]
    kept = perm[:total]
    by_label = kept[torch.sort(labels.cpu()[kept], stable=True).indices]
    size = total // num_shards
    chunk = by_label[shard * size:(shard + 1) * size]
    return chunk[torch.randperm(size, generator=g)]


def _step_seed(seed: int, epoch: int, shard: int, step: int) -> int:
    """A 63-bit seed derived from (seed, epoch, shard, step), the same in every process."""
    state = np.random.SeedSequence([seed, epoch, shard, step]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class _ShardBatches:
    """This rank's shard of ``labels`` cut into mini-batches; resumable at any step of an epoch."""

    def __init__(self, labels: Tensor, batch_size: int, num_shards: int, shard: int, seed: int,
                 mode: str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.labels = labels
        self.batch_size, self.seed, self.mode = batch_size, seed, mode
        self.reshard(num_shards, shard)

    def reshard(self, num_shards: int, shard: int) -> None:
        """Become shard ``shard`` of ``num_shards`` (at start, and when an elastic job changes size)."""
        self.num_shards, self.shard = num_shards, shard
        shard_size = shard_indices(self.labels, num_shards, shard, 0, self.seed, self.mode).numel()
        self.steps_per_epoch: int = shard_size // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {self.batch_size} is larger than the shard ({shard_size} samples = "
                             f"{self.labels.numel()} // {num_shards} shards); use a batch_size <= {shard_size}")

    def _indices(self, epoch: int, start_step: int) -> Tensor:
        """This shard's sample indices of ``epoch``, checking the position first."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        return shard_indices(self.labels, self.num_shards, self.shard, epoch, self.seed, self.mode)


class ShardedBatches(_ShardBatches):
    """Per-rank mini-batches of in-memory tensors; non-IID shards follow ``groups`` (default ``y``)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, num_shards: int, shard: int, seed: int = 0,
                 mode: str = "shuffle", augment: Augment | None = None, groups: Tensor | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        super().__init__(y if groups is None else groups, batch_size, num_shards, shard, seed, mode)
        self.x, self.y, self.augment = x, y, augment

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches for steps ``start_step`` .. ``steps_per_epoch - 1`` of ``epoch``."""
        indices = self._indices(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            batch = indices[step * self.batch_size:(step + 1) * self.batch_size]
            xb = self.x[batch.to(self.x.device)]
            if self.augment is not None:
                g = torch.Generator().manual_seed(_step_seed(self.seed, epoch, self.shard, step))
                xb = self.augment(xb, g)
            yield xb, self.y[batch.to(self.y.device)]


class FolderBatches(_ShardBatches):
    """Per-rank mini-batches of a map-style dataset with ``targets`` (ImageFolder), loaded by a DataLoader.

    Resuming reproduces the sample order exactly; random transforms run in the loader and are re-drawn.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_shards: int, shard: int, seed: int = 0,
                 mode: str = "shuffle", num_workers: int = 0) -> None:
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ValueError(f"{type(dataset).__name__} has no 'targets' attribute; FolderBatches needs the "
                             f"per-sample labels (as torchvision ImageFolder provides) to shard")
        super().__init__(torch.as_tensor(targets, dtype=torch.int64), batch_size, num_shards, shard, seed, mode)
        self.dataset, self.num_workers = dataset, num_workers

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches for steps ``start_step`` .. ``steps_per_epoch - 1`` of ``epoch``."""
        indices = self._indices(epoch, start_step)
        indices = indices[start_step * self.batch_size:self.steps_per_epoch * self.batch_size]
        loader = DataLoader(
            Subset(self.dataset, indices.tolist()), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(_step_seed(self.seed, epoch, self.shard, start_step)),
        )
        yield from loader


def cifar_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip of a batch (N, C, H, W), driven by ``g``."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    top = torch.randint(0, 9, (n,), generator=g).to(x.device)
    left = torch.randint(0, 9, (n,), generator=g).to(x.device)
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)
