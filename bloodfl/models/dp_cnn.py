"""A small CNN built for DP-SGD: GroupNorm, few parameters, a pooled linear head (the default with ``dp=true``).

DP-SGD adds noise of the same size to every parameter's gradient, so the noise grows with the parameter count
while the signal (the clipped mean gradient) does not: a network DP trains well is small. GroupNorm normalises
each image on its own (BatchNorm mixes images in a batch, which per-image clipping cannot bound), with groups
of several channels so that colour and stain intensity, which a per-channel (instance) norm would remove,
survive. Measured against the papers' flatten head in docs/privacy.md ("What dp=true does").
"""

from __future__ import annotations

from torch import nn

from bloodfl.models.registry import register_model
from bloodfl.models.simple_cnn import SimpleCNN


def _group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


@register_model("dp_cnn")
def dp_cnn(in_chans: int = 3) -> SimpleCNN:
    """simple_cnn's four blocks, narrower (16-64 channels) and with GroupNorm; the head comes from the config."""
    return SimpleCNN(in_chans, widths=(16, 32, 32, 64), norm=_group_norm)
