"""A small CNN for fast experiments and tests: four conv blocks, a few hundred thousand parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bloodfl.models.registry import register_model


def _block(cin: int, cout: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


@register_model("simple_cnn")
class SimpleCNN(nn.Module):
    """Backbone with timm's ``forward_features`` interface, so the paper head fits on it like on timm models."""

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 128),
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        self.features = nn.Sequential(*[_block(a, b, norm) for a, b in zip(chans[:-1], chans[1:])])
        self.num_features = widths[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
