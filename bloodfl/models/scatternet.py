"""ScatterNet: a wavelet scattering transform with fixed filters, then a small CNN (Tramèr & Boneh, ICLR 2021).

"Differentially Private Learning Needs Better Features (or Much More Data)": under DP-SGD, handcrafted features
that need no training (and no pretraining data) beat end-to-end CNNs trained from scratch at small budgets,
since every trained parameter pays noise and the scattering has none. The transform is kymatio's 2-D
scattering (order 2, J scales, L orientations: 1 + JL + L²J(J-1)/2 channels per colour channel, at 1/2^J
resolution), normalised per image with GroupNorm (the paper's "ScatterNet + GN"), then conv blocks and the
config's head. The filters are fixed and identical everywhere, so they are kept out of the state dict: they
are never averaged, sent to the server or checkpointed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from bloodfl.models.dp_cnn import _group_norm
from bloodfl.models.registry import register_model
from bloodfl.models.simple_cnn import _block


@functools.cache
def scattering_class() -> type[nn.Module]:
    """kymatio's 2-D scattering with non-persistent filter buffers (moved with ``.to``, never saved). Imported on
    first use: kymatio and its SciPy filter banks add about half a second to every ``import bloodfl.models``."""
    # kymatio.torch also imports its 3-D scattering, which needs scipy.special.sph_harm (removed in SciPy 1.17);
    # the 2-D frontend, the class kymatio.torch.Scattering2D names, does not
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    class Scattering2D(ScatteringTorch2D):
        def register_single_filter(self, v, n):  # kymatio's hook for storing one filter
            current_filter = torch.from_numpy(v).unsqueeze(-1)
            self.register_buffer(f"tensor{n}", current_filter, persistent=False)
            return current_filter

    return Scattering2D


@register_model("scatternet")
class ScatterNet(nn.Module):
    """Scattering (J, L) -> GroupNorm -> conv blocks of ``widths``; timm's ``forward_features`` interface."""

    def __init__(self, in_chans: int = 3, image_size: int = 64, J: int = 2, L: int = 8,
                 widths: tuple[int, ...] = (64, 64), scatter_groups: int = 27) -> None:
        super().__init__()
        self.scattering = scattering_class()(J=J, shape=(image_size, image_size), L=L)
        paths = 1 + J * L + L * L * J * (J - 1) // 2
        channels = in_chans * paths
        self.scatter_norm = nn.GroupNorm(scatter_groups, channels)
        chans = (channels, *widths)
        self.features = nn.Sequential(*[_block(a, b, _group_norm) for a, b in zip(chans[:-1], chans[1:])])
        self.num_features = chans[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no parameter before it: nothing to differentiate
            s = self.scattering(x.contiguous())
        s = s.flatten(1, 2)  # (B, C, paths, h, w) -> (B, C * paths, h, w)
        return self.features(self.scatter_norm(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
