"""U-Net (Ronneberger et al. 2015) used as a classifier, as in papers/004 (Hussien & Kareem), section 3.3.3
"U-Net" (text lines 256-262, Figure 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bloodfl.models.registry import register_model


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                         nn.ReLU())


@register_model("unet_classifier")
class UNetClassifier(nn.Module):
    """papers/004 section 3.3.3: an encoder (contracting path: 3x3 convolutions then max pooling), a bottleneck
    (Conv2D + ReLU) and a decoder (expanding path: convolutions of 256, 128 and 64 filters merged with the encoder
    through skip connections); "a dense layer with a Softmax activation" classifies (the head config).

    Encoder widths 64-128-256 (mirroring the decoder's 256-128-64), bottleneck 512; each level two 3x3 conv + ReLU
    ('same' padding), 2x2 max pooling down, 2x2 transposed convolution up, concatenated with the skip.
    ``forward_features`` returns the decoder's last map (B, 64, H, W), the input's resolution.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (64, 128, 256), bottleneck: int = 512) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        self.down = nn.ModuleList(_double_conv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[-1], bottleneck)
        ups = (bottleneck, *reversed(widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in zip(ups[:-1], ups[1:]))
        self.decode = nn.ModuleList(_double_conv(2 * b, b) for b in reversed(widths))
        self.num_features = widths[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = up(x)
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            if dh or dw:  # odd sizes: pooling floored, so pad back to the skip's size
                x = F.pad(x, (0, dw, 0, dh))
            x = decode(torch.cat([skip, x], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
