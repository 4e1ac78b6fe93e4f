"""MODELS: every network of the seed documents, each a function ``(in_channels, num_classes, *,
own kwargs) -> nn.Module``. The seeds' hard-coded 1 input channel and 10 outputs become those two
arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hpsearch.registry import Registry
from hpsearch.task import CLASSIFICATION, REGRESSION, Task


@dataclass(frozen=True)
class ModelFacts:
    """What a study file is checked against before a model is built."""

    input_size: int | None  # the square input side the network needs; None if any size works
    task: Task = CLASSIFICATION


MODELS: Registry[Callable[..., nn.Module], ModelFacts] = Registry(
    "model", ModelFacts, fixed=("in_channels", "num_classes")
)

# Weight initialisations by name; "default" keeps PyTorch's own. The rest also zero the biases.
INITS: dict[str, Callable[[torch.Tensor, float], object] | None] = {
    "default": None,
    "xavier_uniform": lambda w, _: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda w, _: nn.init.xavier_normal_(w),
    "kaiming_uniform": lambda w, _: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w, _: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "constant": lambda w, value: nn.init.constant_(w, value),
}


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    *,
    init: str = "default",
    init_value: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build registered network ``name`` and initialise the weights of its Conv2d and Linear layers.

    ``init="default"`` keeps PyTorch's own initialisation; every other init also zeroes the biases.
    ``init_value`` is used only by ``init="constant"``. Raises ValueError for an unknown ``init``
    and UnknownName for an unknown ``name``.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    model = MODELS[name](in_channels, num_classes, **kwargs)
    fill = INITS[init]
    if fill is None:
        return model
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fill(module.weight, init_value)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _dropout(p: float) -> nn.Dropout:
    """``nn.Dropout(p)`` for p in [0, 1): torch accepts 1, which zeroes every activation."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), not {p}")
    return nn.Dropout(p)


def _width(name: str, n: int) -> int:
    """A layer width from a study file: torch builds a zero-wide layer that can learn nothing."""
    if n < 1:
        raise ValueError(f"{name} must be at least 1, not {n}")
    return n


@MODELS.register(input_size=28)
def lenet(in_channels: int, num_classes: int) -> nn.Module:
    """LeNet-5 with sigmoids and average pooling, 28×28 input (seed 004, d2l)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )


@MODELS.register(input_size=224)
def alexnet(in_channels: int, num_classes: int, *, dropout: float = 0.5) -> nn.Module:
    """AlexNet, 224×224 input (seed 004, d2l)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, 4096),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(4096, num_classes),
    )


@MODELS.register(input_size=224)
def alexnet_small(in_channels: int, num_classes: int, *, dropout: float = 0.5) -> nn.Module:
    """Simplified AlexNet: four convs, 7×7 first kernel, two linears, 224×224 input (seed 004)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 128, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(128, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(256 * 13 * 13, 1024),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(1024, num_classes),
    )


@MODELS.register(input_size=28)
def alexnet28(in_channels: int, num_classes: int, *, dropout: float = 0.5) -> nn.Module:
    """AlexNet-like net for 28×28 input: two convs, two linears (seed 004)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(1024, num_classes),
    )


@MODELS.register(input_size=224)
def vgg11(in_channels: int, num_classes: int, *, ratio: int = 4, dropout: float = 0.5) -> nn.Module:
    """VGG-11 with every channel count divided by ``ratio``, 224×224 input (seed 004, d2l)."""
    if ratio < 1 or 64 % ratio:
        raise ValueError(f"vgg11 ratio must be >= 1 and divide 64, got {ratio}")
    blocks: list[nn.Module] = []
    for num_convs, out_channels in ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)):
        out_channels //= ratio
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = out_channels
        blocks.append(nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2)))
    return nn.Sequential(
        *blocks,
        nn.Flatten(),
        nn.Linear(in_channels * 7 * 7, 4096),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        _dropout(dropout),
        nn.Linear(4096, num_classes),
    )


class _Residual(nn.Module):
    """d2l's residual block; a 1×1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv3 = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return F.relu(y + shortcut)


@MODELS.register(input_size=None)
def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-18 with BatchNorm, any input size (seed 004, d2l)."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages = [
        nn.Sequential(_Residual(64, 64), _Residual(64, 64)),
        *(
            nn.Sequential(_Residual(c_in, c_out, stride=2), _Residual(c_out, c_out))
            for c_in, c_out in ((64, 128), (128, 256), (256, 512))
        ),
    ]
    return nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


@MODELS.register(input_size=28)
def bn_cnn(in_channels: int, num_classes: int, *, hidden: int = 100) -> nn.Module:
    """Four stride-2 convs with BatchNorm, then two linears, 28×28 MNIST input (seed 000)."""
    convs = ((in_channels, 16, 3, 2, 1), (16, 32, 3, 2, 1), (32, 64, 3, 2, 1), (64, 64, 2, 2, 0))
    blocks = [nn.Sequential(nn.Conv2d(*c), nn.BatchNorm2d(c[1]), nn.ReLU()) for c in convs]
    hidden = _width("hidden", hidden)
    # No activation between the two linears: the seed has none.
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(2 * 2 * 64, hidden), nn.Linear(hidden, num_classes))


@MODELS.register(input_size=32)
def cifar_cnn(in_channels: int, num_classes: int, *, hidden: int = 64) -> nn.Module:
    """The "Zilliax" net: three 5×5 convs, max pooling, no activations, 32×32 input (seed 001)."""
    hidden = _width("hidden", hidden)
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, hidden),
        nn.Linear(hidden, num_classes),
    )


@MODELS.register(input_size=28)
def mnist_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """PaddlePaddle's MNIST tutorial net ported to PyTorch: two convs and one linear (seed 002)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5, stride=1, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(20, 20, kernel_size=5, stride=1, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(20 * 7 * 7, num_classes),
    )


@MODELS.register(input_size=None, task=REGRESSION)
def mlp(in_channels: int, num_classes: int, *, hidden: int = 10) -> nn.Module:
    """One-hidden-layer ReLU MLP for y = x² + noise; in_channels = features (seed 003)."""
    hidden = _width("hidden", hidden)
    return nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
