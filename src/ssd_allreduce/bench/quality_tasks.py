"""The workloads of the quality study: a regression of a teacher network, the digits CNN, and a
small GPT on the standard-library corpus. Every batch a worker draws is fixed by (seed, step,
worker), so the simulator and real ranks train on the same samples in the same order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..train.data import load_digits_split, load_stdlib_text
from ..train.models import build_language_model, build_model

SHARDS = ("shuffle", "non-iid")


@dataclass
class Task:
    """Training and validation data, a model factory, the loss, and whether accuracy means anything."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    groups: Tensor                     # the key a non-IID split sorts by (the label, the target, the package)
    make_model: Callable[[int], nn.Module]
    loss_fn: nn.Module
    classifies: bool
    batch_size: int

    def shards(self, workers: int, mode: str, seed: int) -> list[Tensor]:
        """Each worker's sample indices: a random split, or (non-IID) contiguous runs of the
        samples sorted by ``groups`` (classes, target values or packages)."""
        n = self.train_x.shape[0]
        if mode == "non-iid":
            order = torch.argsort(self.groups, stable=True)
            return [order[w * n // workers:(w + 1) * n // workers] for w in range(workers)]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return [perm[w::workers] for w in range(workers)]

    def batch(self, shard: Tensor, seed: int, step: int, worker: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + worker) % (2 ** 62))
        idx = shard[torch.randint(0, len(shard), (self.batch_size,), generator=g)]
        return self.train_x[idx], self.train_y[idx]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss (and accuracy for a classifier) of ``model``."""
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.test_x)
            result = {"val_loss": float(self.loss(out, self.test_y))}
            if self.classifies:
                result["val_accuracy"] = float((out.argmax(-1) == self.test_y).float().mean())
        model.train(was)
        return result

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(out.flatten(0, -2), y.flatten()) if out.dim() == 3 else self.loss_fn(out, y)

    def train_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(model(x), y)


def regression(seed: int = 0) -> Task:
    """32 inputs, the normalised output of a random tanh teacher plus noise (a floor of 0.01), an
    MLP student of two hidden layers."""
    g = torch.Generator().manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        x = torch.randn(20000, 32, generator=g)
        y = teacher(x)
        y = (y - y.mean()) / y.std() + 0.1 * torch.randn(20000, 1, generator=g)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    return Task("regression", x[:16000], y[:16000], x[16000:], y[16000:], y[:16000, 0], make, nn.MSELoss(),
                False, 32)


def digits(seed: int = 0) -> Task:
    """The handwritten digits bundled with scikit-learn, the project's CNN; non-IID by label."""
    data = load_digits_split(seed=0)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return build_model("cnn", data.num_classes, data.in_channels, data.image_size)
    return Task("digits", data.train_x, data.train_y, data.test_x, data.test_y, data.train_y, make,
                nn.CrossEntropyLoss(), True, 16)


def gpt(seed: int = 0, width: int = 64, layers: int = 2) -> Task:
    """A small GPT (2 layers of width 64 by default, 137 k parameters) on the standard library's
    source, 64-byte sequences; non-IID by package."""
    text = load_stdlib_text(64, 2_000_000)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return build_language_model("gpt", text.vocab_size, text.context, width, layers, 4)
    test = slice(0, 1024)   # a fixed validation sample: the whole held-out set would dominate the run time
    return Task("gpt", text.train_x, text.train_y, text.test_x[test], text.test_y[test], text.train_groups, make,
                nn.CrossEntropyLoss(), False, 16)


TASKS: dict[str, Callable[[int], Task]] = {"regression": regression, "digits": digits, "gpt": gpt}
