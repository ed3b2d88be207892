"""Colour histograms: a fixed, parameter-free feature extractor, for a linear (or small) head under DP-SGD.

Each colour channel's intensity distribution, as a soft histogram (triangular kernels, so neighbouring bins
share a pixel and a small stain shift moves the features smoothly), square-rooted (the Hellinger map, which turns
a histogram into a vector whose dot products compare distributions). The histograms have no parameters and need
no training, so under DP-SGD only the head pays noise: with 32 bins per channel and a linear head, 388
parameters for 4 classes, against 33 k for ``dp_cnn``. Tramèr & Boneh (ICLR 2021) make the general point with
wavelet features (``model=scatternet``); on blood smears the colour of the stained cells carries much of the class
(docs/privacy.md measures it). Inputs are the data set's normalised pixels, so the bins are in units of its
per-channel standard deviation; values outside the range count in the outer bins.
"""

from __future__ import annotations

import torch
from torch import nn

from bloodfl.models.registry import register_model


@register_model("color_hist")
class ColorHistogram(nn.Module):
    """(B, C, H, W) normalised images -> (B, C * bins, 1, 1) square-rooted soft histograms; timm's interface."""

    def __init__(self, in_chans: int = 3, bins: int = 32, low: float = -4.0, high: float = 4.0) -> None:
        super().__init__()
        if bins < 2 or not low < high:
            raise ValueError(f"color_hist needs bins >= 2 and low < high, got bins={bins}, low={low}, high={high}")
        self.low, self.high, self.width = low, high, (high - low) / (bins - 1)
        # fixed and identical everywhere: kept out of the state dict (never averaged, sent or checkpointed)
        self.register_buffer("centers", torch.linspace(low, high, bins), persistent=False)
        self.num_features = in_chans * bins
        self.scale = bins**0.5  # sqrt(bins * h): one per bin on average (unit RMS), whatever the number of bins

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no parameter before it: nothing to differentiate
            x = x.clamp(self.low, self.high).flatten(2)  # (B, C, H*W)
            # one bin at a time: the (B, C, bins, H*W) kernel tensor would be bins times the batch's size
            hist = torch.stack([(1 - (x - c).abs() / self.width).clamp_min(0).mean(2) for c in self.centers], 2)
        return (self.scale * hist.sqrt()).flatten(1)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@register_model("color_hist_joint")
class JointColorHistogram(ColorHistogram):
    """(B, 3, H, W) -> (B, bins**3, 1, 1): the soft histogram of whole colours (r, g, b together), square-rooted.

    Per-channel histograms cannot tell a purple pixel from a red one next to a blue one; the joint histogram can,
    at bins**3 features (512 for 8 bins: a linear head of 4 k parameters for 8 classes)."""

    def __init__(self, in_chans: int = 3, bins: int = 8, low: float = -3.0, high: float = 3.0) -> None:
        if in_chans != 3:
            raise ValueError(f"color_hist_joint needs 3 colour channels, got in_chans={in_chans}")
        super().__init__(in_chans, bins, low, high)
        self.num_features = bins**3
        self.scale = self.num_features**0.5

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.clamp(self.low, self.high).flatten(2)  # (B, 3, P)
            # (B, 3, bins, P) kernel weights per channel; their product over channels is the joint kernel
            w = (1 - (x[:, :, None, :] - self.centers[None, None, :, None]).abs() / self.width).clamp_min(0)
            hist = torch.einsum("bip,bjp,bkp->bijk", w[:, 0], w[:, 1], w[:, 2]) / x.shape[-1]
        return (self.scale * hist.sqrt()).flatten(1)[:, :, None, None]
