"""bloodfl's convolution norm rule for ghost clipping equals per-sample gradient norms computed one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bloodfl.privacy.norms import conv2d_norm_sample

CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "strided, no bias": dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, bias=False),
    "grouped": dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8),
    "pointwise": dict(in_channels=8, out_channels=5, kernel_size=1),
    "dilated, rectangular": dict(in_channels=3, out_channels=4, kernel_size=(3, 5), padding=(2, 4), dilation=2),
    "same padding": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),
}


@pytest.mark.parametrize("form", ["ghost", "materialized", "auto"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_norms_equal_one_by_one_gradients(name: str, form: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name])
    x = torch.randn(5, conv.in_channels, 9, 11)
    out = conv(x)
    g = torch.randn_like(out)  # the gradient arriving at the layer's output (Opacus' "backprops")
    expected = {p: [] for p in conv.parameters()}
    for i in range(len(x)):
        grads = torch.autograd.grad(conv(x[i:i + 1]), list(conv.parameters()), g[i:i + 1])
        for p, gp in zip(conv.parameters(), grads):
            expected[p].append(gp.norm())
    norms = conv2d_norm_sample(conv, [x], g, form=form)
    assert set(norms) == set(conv.parameters())
    for p, n in norms.items():
        torch.testing.assert_close(n, torch.stack(expected[p]), rtol=1e-4, atol=1e-5)
