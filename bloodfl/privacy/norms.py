"""Per-sample gradient norms of convolutions for ghost clipping, without Opacus' slow generic path.

Under ``grad_sample_mode="ghost"`` Opacus only knows norm rules for Linear and Embedding; for a convolution it
materialises every per-sample gradient into a zero-filled buffer, accumulates, then takes the norm — and for
grouped/depthwise convolutions (MobileNet, EfficientNet) it computes the full dense product and discards all
but the diagonal blocks. ``conv2d_norm_sample`` computes the same norms per group, choosing per layer the
cheaper of two exact formulas:

* materialised: ||G_n||^2 with G_n = g_n a_n^T            cost ~ O_g * P_g * T
* ghost (Li et al. 2022): sum_{t,s} (g_t . g_s)(a_t . a_s)  cost ~ T^2 * (O_g + P_g)

where T is the number of output positions, O_g / P_g the output channels / unfolded inputs per group. Late
layers (few positions, many channels) take the ghost form; early layers the materialised one.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor,
                       form: str = "auto") -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample L2 norms of a Conv2d's weight and bias gradients, shape (batch,) each.

    form: "auto" (the cheaper formula), "ghost" or "materialized" (both exact; forced in tests)."""
    n, groups = backprops.shape[0], layer.groups
    g = backprops.reshape(n, groups, layer.out_channels // groups, -1)  # (n, G, O_g, T)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        a = unfold2d(activations[0].to(backprops.dtype), kernel_size=layer.kernel_size, padding=layer.padding,
                     stride=layer.stride, dilation=layer.dilation)
        a = a.reshape(n, groups, -1, a.shape[-1])  # (n, G, P_g, T): channels of a group are contiguous
        positions, out_g, in_g = g.shape[-1], g.shape[2], a.shape[2]
        ghost = positions * positions * (out_g + in_g) < out_g * in_g * positions if form == "auto" else \
            form == "ghost"
        if ghost:
            sq = (g.transpose(-1, -2) @ g).mul_(a.transpose(-1, -2) @ a).sum(dim=(1, 2, 3))
        else:
            sq = (g @ a.transpose(-1, -2)).square_().sum(dim=(1, 2, 3))
        norms[layer.weight] = sq.clamp_(min=0).sqrt_()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=-1).flatten(1).norm(dim=1)
    return norms


def ghost_norm_samplers() -> dict[type, object]:
    """Opacus' ghost-clipping norm rules plus bloodfl's convolution rule (set per hooks object, not globally,
    so a plain Opacus loop in the same process is unaffected)."""
    return {**GradSampleHooksFastGradientClipping.NORM_SAMPLERS, nn.Conv2d: conv2d_norm_sample}
