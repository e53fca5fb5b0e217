"""Model zoo: small built-in networks, the CIFAR ResNets of He et al. (2016), a small GPT, torchvision models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESNET_DEPTHS: dict[str, int] = {
    "resnet20": 20,
    "resnet32": 32,
    "resnet44": 44,
    "resnet56": 56,
    "resnet110": 110,
}
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", *RESNET_DEPTHS)


class MLP(nn.Module):
    """Flatten -> 128 hidden units with ReLU -> class logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (32 with BatchNorm, then 64 channels), average pool to 4x4, linear."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero padding of the new channels, no parameters."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            PadShortcut(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: stages of 16/32/64 channels with n basic blocks each."""

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


class GPT(nn.Module):
    """A GPT-style decoder of PyTorch's own modules: token and learned position embeddings,
    pre-norm transformer blocks under a causal mask, a final LayerNorm and a linear head."""

    def __init__(self, vocab_size: int, context: int, width: int = 128, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the GPT's width ({width}) must be a multiple of its heads ({heads})")
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        # a bool buffer: not a floating-point state, so it never travels with SSD-SGD's deltas
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of byte sequences ``idx`` (B, T), T <= context."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context ({self.context})")
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build ``name`` from torchvision.models, with errors that name the built-in alternatives."""
    builtins = ", ".join(MODEL_NAMES)
    try:
        import torchvision.models
    except (ImportError, RuntimeError, AttributeError, OSError) as exc:
        raise ValueError(
            f"unknown model {name!r}: built-in models are {builtins}; "
            f"install torchvision (matching your torch) to use ImageNet models such as resnet50 "
            f"(importing torchvision failed: {exc})"
        ) from exc
    if in_channels != 3:
        raise ValueError(f"torchvision model {name!r} takes in_channels=3, got {in_channels}")
    try:
        return torchvision.models.get_model(name, num_classes=num_classes)
    except ValueError as exc:
        raise ValueError(
            f"unknown model {name!r}: not a built-in model ({builtins}) "
            f"and not in torchvision.models ({exc})"
        ) from exc


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Return a freshly initialised model ``name`` for ``in_channels`` x ``image_size``^2 inputs."""
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    if name == "mlp":
        return MLP(num_classes, in_channels, image_size)
    if name == "cnn":
        return SmallCNN(num_classes, in_channels)
    if name in RESNET_DEPTHS:
        if image_size < 8:
            raise ValueError(f"{name} needs image_size >= 8, got {image_size}")
        return CifarResNet(RESNET_DEPTHS[name], num_classes, in_channels)
    return _torchvision_model(name, num_classes, in_channels)


def build_language_model(name: str, vocab_size: int, context: int, width: int = 128, layers: int = 4,
                         heads: int = 4) -> nn.Module:
    """A freshly initialised language model ``name`` (only ``gpt`` today)."""
    if name != "gpt":
        raise ValueError(f"unknown language model {name!r}: the text data set trains --model gpt")
    for label, value in (("vocab_size", vocab_size), ("context", context), ("width", width), ("layers", layers),
                         ("heads", heads)):
        if value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    return GPT(vocab_size, context, width, layers, heads)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable floating-point parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad and p.is_floating_point())
