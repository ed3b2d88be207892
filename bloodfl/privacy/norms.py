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

Both this rule and Opacus' own per-sample gradient rule for convolutions unfold the layer's input with zero
padding. A convolution with ``padding_mode`` reflect / replicate / circular pads its input with other values
before convolving, so for those layers the input is padded here the layer's way first (``_explicitly_padded``)
and unfolded without padding: exact for every padding mode, in ghost and in hooks mode (``hooks_grad_samplers``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def _explicitly_padded(layer: nn.Conv2d, activation: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(input as the convolution really sees it, padding left to apply): for padding_mode != "zeros" the layer
    pads with F.pad(mode=padding_mode) before a convolution without padding; do the same."""
    if layer.padding_mode == "zeros":
        return activation, layer.padding
    return F.pad(activation, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0)


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor,
                       form: str = "auto") -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample L2 norms of a Conv2d's weight and bias gradients, shape (batch,) each.

    form: "auto" (the cheaper formula), "ghost" or "materialized" (both exact; forced in tests)."""
    n, groups = backprops.shape[0], layer.groups
    g = backprops.reshape(n, groups, layer.out_channels // groups, -1)  # (n, G, O_g, T)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        act, padding = _explicitly_padded(layer, activations[0].to(backprops.dtype))
        a = unfold2d(act, kernel_size=layer.kernel_size, padding=padding, stride=layer.stride,
                     dilation=layer.dilation)
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


def conv_grad_sample(layer: nn.Module, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' per-sample convolution gradients, made exact for ``padding_mode`` other than zeros (Opacus
    unfolds with zero padding whatever the layer's mode). Conv1d / Conv3d with such a mode are refused."""
    mode = getattr(layer, "padding_mode", "zeros")
    if mode == "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    if type(layer) is not nn.Conv2d:
        raise NotImplementedError(f"{type(layer).__name__} with padding_mode={mode!r} has no exact per-sample "
                                  "gradient rule under DP; use padding_mode='zeros' or a Conv2d")
    act, _ = _explicitly_padded(layer, activations[0])
    proxy = copy.copy(layer)  # same parameters (the dict keys), but the input is already padded
    proxy.padding, proxy.padding_mode = (0, 0), "zeros"
    return compute_conv_grad_sample(proxy, [act], backprops)


def hooks_grad_samplers() -> dict[type, object]:
    """Opacus' per-sample gradient rules with ``conv_grad_sample`` for convolutions (set per hooks object)."""
    return {**GradSampleHooks.GRAD_SAMPLERS, nn.Conv1d: conv_grad_sample, nn.Conv2d: conv_grad_sample,
            nn.Conv3d: conv_grad_sample}
