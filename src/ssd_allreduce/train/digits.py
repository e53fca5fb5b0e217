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
    """The 1,797 images (float64, 0-16, shape (n, 8, 8)) and their labels, as ``load_digits`` gives them
    (from ``load_digits`` itself where scikit-learn's files are not plain files, e.g. in a zip)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError("the digits data set is scikit-learn's: pip install scikit-learn "
                                  "(or the project's [train] extra)")
    csv = next((Path(p) / DIGITS_CSV for p in spec.submodule_search_locations or ()
                if (Path(p) / DIGITS_CSV).is_file()), None)
    if csv is None:
        from sklearn.datasets import load_digits
        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and test indices ``train_test_split(..., test_size=test_fraction, random_state=seed,
    stratify=labels)`` picks (the same draws from the same generator, so the same sets in the same order)."""
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(counts):
        raise ValueError(f"a stratified split of {len(labels)} samples in {len(counts)} classes needs at least 2 "
                         f"of each class and a class's worth in each set; test_fraction {test_fraction} leaves "
                         f"{n_train} to train and {n_test} to test")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _apportion(counts, n_train, rng)
    test_counts = _apportion(counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, n_tr, n_te in zip(by_class, train_counts, test_counts):
        shuffled = members[rng.permutation(len(members))]
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
