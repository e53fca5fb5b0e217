"""scikit-learn's bundled 8x8 digits and its stratified split, read without importing scikit-learn:
its import (scipy's with it) takes about 2 s of every rank's start, longer than torch's."""
from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

DIGITS_CSV = Path("datasets", "data", "digits.csv.gz")


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (float64, 0-16, shape (n, 8, 8)) and their labels, as ``load_digits`` gives them."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set is scikit-learn's: pip install scikit-learn")
    csv = Path(next(iter(spec.submodule_search_locations))) / DIGITS_CSV
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and test indices ``train_test_split(..., test_size=test_fraction, random_state=seed,
    stratify=labels)`` picks (the same draws from the same generator, so the same sets in the same order)."""
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _apportion(counts, n_train, rng)
    test_counts = _apportion(counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, n_tr, n_te in zip(by_class, train_counts, test_counts):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:n_tr])
        test.extend(shuffled[n_tr:n_tr + n_te])
    return rng.permutation(train), rng.permutation(test)


def _apportion(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``draws`` shared out in proportion to ``counts``: each its floor, the rest to the largest
    remainders, ties broken by ``rng``."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainder = exact - shares
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)
