"""Image classifiers for 28x28 grey-scale digits (MNIST-like data), safe under Opacus.

Neither model uses BatchNorm: its statistics mix samples within a batch, so
per-sample gradients (and with them DP-SGD's guarantee) would be wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from confide.errors import ConfigError


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ConfigError(
            "num_classes", f"must be at least 2, got {num_classes}", "set num_classes >= 2"
        )


class McMahanCNN(nn.Module):
    """The MNIST CNN of McMahan et al. 2017 ("CNN", 1,663,370 parameters).

    Two 5x5 convolutions (32 and 64 channels) each followed by 2x2 max-pooling,
    a 512-unit ReLU layer and a linear output. The paper's parameter count
    only comes out with 'same' padding (28 -> 14 -> 7, flatten 7*7*64 = 3136),
    so that is what is used. There is no normalisation, as in the paper.

    Input ``(B, 1, 28, 28)`` float32, output ``(B, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 10, *, dp: bool = False) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        # Made of layers Opacus supports either way; `dp` keeps the factory uniform.
        del dp
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class SmallCNN(nn.Module):
    """A 54k-parameter CNN for quick runs: two 5x5 convolutions (8, 16 channels).

    GroupNorm (not BatchNorm) steadies training from the first steps while
    keeping every sample's gradient independent of the rest of the batch.

    Input ``(B, 1, 28, 28)`` float32, output ``(B, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 10, *, dp: bool = False) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        del dp
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=5, padding=2),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=5, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out
