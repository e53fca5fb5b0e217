"""Tests of ssd_allreduce.train.models."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from ssd_allreduce.train.models import MODEL_NAMES, build_language_model, build_model, count_parameters


def _torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.models")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels,image_size", [(1, 8), (3, 32)])
def test_output_shape(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_builtin_names() -> None:
    assert MODEL_NAMES == ("mlp", "cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


@pytest.mark.parametrize("name,expected", [
    ("resnet20", 269_722),
    ("resnet32", 464_154),
    ("resnet44", 658_586),
    ("resnet56", 853_018),
    ("resnet110", 1_727_962),
])
def test_resnet_parameter_counts_option_a(name: str, expected: int) -> None:
    assert count_parameters(build_model(name, num_classes=10)) == expected


def test_resnet_depth_and_shortcuts_have_no_parameters() -> None:
    model = build_model("resnet20", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19


def test_resnet_uses_kaiming_normal_init() -> None:
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 64]
    weights = torch.cat([m.weight.flatten() for m in convs])
    fan_in = 64 * 9
    assert weights.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)


def test_cnn_has_batchnorm_buffers() -> None:
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    buffers = dict(model.named_buffers())
    assert any(k.endswith("running_mean") for k in buffers)
    assert count_parameters(model) == 32 * 9 + 64 + 32 * 64 * 9 + 64 + 64 * 16 * 10 + 10


def test_mlp_parameter_count() -> None:
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    assert count_parameters(model) == 64 * 128 + 128 + 128 * 10 + 10


def test_count_parameters_skips_frozen() -> None:
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    model.net[1].weight.requires_grad_(False)
    assert count_parameters(model) == 128 + 128 * 10 + 10


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0},
                                    {"num_classes": 10, "image_size": 4}])
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="num_classes|in_channels|image_size"):
        build_model("resnet20", **kwargs)


def test_unknown_name_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ValueError) as info:
        build_model("resnet50", num_classes=10)
    message = str(info.value)
    assert "resnet50" in message and "torchvision" in message
    assert all(name in message for name in MODEL_NAMES)


@pytest.mark.skipif(_torchvision_importable(), reason="torchvision is importable here")
def test_unknown_name_in_this_environment() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        build_model("not_a_model", num_classes=10)


@pytest.mark.skipif(not _torchvision_importable(), reason="torchvision is not importable beside this torch")
def test_torchvision_model() -> None:
    model = build_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="mlp"):
        build_model("no_such_torchvision_model", num_classes=5)


def _gpt(context: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return build_language_model("gpt", vocab_size=256, context=context, width=64, layers=2, heads=4)


def test_the_gpt_is_causal() -> None:
    """Changing a byte changes no prediction before it."""
    model = _gpt().eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


def test_the_gpt_overfits_a_tiny_corpus() -> None:
    text = b"def add(a, b):\n    return a + b\n" * 4
    data = torch.tensor(list(text))
    x = torch.stack([data[i:i + 16] for i in range(0, len(data) - 17, 4)])
    y = torch.stack([data[i + 1:i + 17] for i in range(0, len(data) - 17, 4)])
    model = _gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1, float(loss.detach())


def test_the_gpt_mask_is_no_floating_point_state() -> None:
    """SSD-SGD averages floating-point buffers with the weights: the causal mask must not be one."""
    model = _gpt()
    assert [name for name, b in model.named_buffers() if b.is_floating_point()] == []
    assert 30_000 < count_parameters(model) < 200_000


@pytest.mark.parametrize("kw, message", [(dict(width=30, heads=4), "multiple of its heads"),
                                         (dict(layers=0), "layers must be a positive integer")])
def test_gpt_settings_that_cannot_work_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_language_model("gpt", 256, 16, **kw)


def test_a_longer_sequence_than_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the model's context"):
        _gpt(context=8)(torch.zeros(1, 9, dtype=torch.long))
