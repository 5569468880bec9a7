"""Small image classifiers for the Fashion-MNIST job: teachers and the student.

Every model takes raw uint8 images [B, 28, 28] and normalises them itself, so a teacher
is a pure function of the stored inputs (and its fingerprint covers all of it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Fashion-MNIST training-set pixel mean and standard deviation (on the 0..1 scale).
_MEAN, _STD = 0.2860, 0.3530


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - _MEAN) / _STD


class ConvNet(nn.Module):
    """Two conv blocks and a classifier head; ``width`` sets the channels."""

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Normalize(),
            nn.Unflatten(1, (1, 28)),
            nn.Conv2d(1, width, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 5 * 5, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """A multilayer perceptron on flattened pixels; ``hidden`` lists the layer widths."""

    def __init__(
        self, hidden: tuple[int, ...] | list[int] = (512, 256), num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize(), nn.Flatten()]
        width = 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCHITECTURES = {"convnet": ConvNet, "mlp": MLP}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build a model by architecture name (``convnet`` or ``mlp``) and keyword config."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)
