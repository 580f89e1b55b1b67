"""Small reference models used by the demo, the benchmarks and the tests."""
from __future__ import annotations

from torch import nn

__all__ = ["SmallCNN", "MLP"]


class SmallCNN(nn.Sequential):
    """Two conv-BN-ReLU-pool blocks, a hidden linear layer with dropout, and a linear classifier.

    Works for square inputs whose side is divisible by 4 (8x8 digits, 28x28 Fashion-MNIST, 32x32).
    The classifier is the attribute ``fc`` (found automatically by augplug). ``norm``: ``"batch"``,
    ``"group"`` (GroupNorm with 4 groups: per-sample statistics, so augmented rows in a batch do not
    change how the originals are normalized) or ``"none"``.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28, width: int = 16,
                 hidden: int = 64, dropout: float = 0.2, norm: str = "batch"):
        side = img_size // 4

        def norm_layer(c):
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(4, c)
            if norm == "none":
                return nn.Identity()
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")

        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=norm == "none"), norm_layer(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=norm == "none"), norm_layer(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.fc = nn.Linear(hidden, num_classes)


class MLP(nn.Sequential):
    """A tabular MLP: ``depth`` hidden layers (optional BatchNorm, dropout), then a linear classifier ``fc``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 2,
                 dropout: float = 0.1, batch_norm: bool = False):
        layers = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden)] + ([nn.BatchNorm1d(hidden)] if batch_norm else []) + \
                      [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = hidden
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)
