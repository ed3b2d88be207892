"""A small CNN built for DP-SGD: GroupNorm, few parameters, a pooled linear head (the default with ``dp=true``).

DP-SGD adds noise of the same size to every parameter's gradient, so the noise grows with the parameter count
while the signal (the clipped mean gradient) does not: a network DP trains well is small. GroupNorm normalises
each image on its own (BatchNorm mixes images in a batch, which per-image clipping cannot bound), with groups
of several channels so that colour and stain intensity, which a per-channel (instance) norm would remove,
survive. Measured against the papers' flatten head in docs/privacy.md ("Defaults under dp=true").
"""

from __future__ import annotations

import torch
from torch import nn

from bloodfl.models.registry import register_model


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(groups, cout), cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


@register_model("dp_cnn")
class DPCNN(nn.Module):
    """Backbone with timm's ``forward_features`` interface (the head comes from the model config)."""

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 32, 64), groups: int = 8) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        self.features = nn.Sequential(*[_block(a, b, groups) for a, b in zip(chans[:-1], chans[1:])])
        self.num_features = widths[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
