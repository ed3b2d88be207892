"""Residual Attention Network, Attention-56 (Wang et al. 2017, "Residual attention network for image
classification", CVPR), as papers/002 (Deng et al.) uses it: reference [15], named in section 1 (text line 49),
section 3.2 (line 182) and Table 1 (line 204: 89% test accuracy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bloodfl.models.registry import register_model


class PreActBottleneck(nn.Module):
    """Wang et al.'s residual unit: pre-activation bottleneck BN-ReLU-1x1, BN-ReLU-3x3(stride), BN-ReLU-1x1."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = cout // 4
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, cout, 1, bias=False),
        )
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class AttentionModule(nn.Module):
    """Attention module with p=1, t=2, r=1 (Wang et al. section 3): trunk of t residual units; soft mask
    branch: ``depth`` max-pool down-samplings (each followed by r units, skip connections between levels),
    bilinear up-sampling back, two 1x1 convolutions and a sigmoid; output (1 + M(x)) * T(x) (attention
    residual learning). Stage 1 of Attention-56 down-samples 3 times, stage 2 twice, stage 3 once."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        c = channels
        self.first = PreActBottleneck(c, c)
        self.trunk = nn.Sequential(PreActBottleneck(c, c), PreActBottleneck(c, c))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.ModuleList(PreActBottleneck(c, c) for _ in range(depth))
        self.skips = nn.ModuleList(PreActBottleneck(c, c) for _ in range(depth - 1))
        self.bottom = PreActBottleneck(c, c)
        self.up = nn.ModuleList(PreActBottleneck(c, c) for _ in range(depth - 1))
        self.mask_out = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.Sigmoid())
        self.last = PreActBottleneck(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        trunk = self.trunk(x)
        levels = []
        y = x
        for down in self.down:
            y = down(self.pool(y))
            levels.append(y)
        y = self.bottom(y)
        for i in reversed(range(len(self.up))):
            y = self.up[i](_up(y, levels[i]) + levels[i] + self.skips[i](levels[i]))
        mask = self.mask_out(_up(y, trunk) + trunk)
        return self.last((1 + mask) * trunk)


@register_model("attention56")
class Attention56(nn.Module):
    """Attention-56 as papers/002 trains it (section 3.2, text line 182; Table 1, line 204), built after
    Wang et al. 2017, Table 2: conv 7x7/2 (64), max pool 3x3/2; residual unit -> 256,
    attention stage 1; unit -> 512 /2, stage 2; unit -> 1024 /2, stage 3; units -> 2048 /2, x3. Its 56 weight
    layers: the stem convolution, 18 residual units on the trunk (3 attention modules x (p + t + p) = 12, plus 6
    between and after) of 3 convolutions each, and the classifier (here the paper head).
    ``forward_features`` returns (B, 2048, H/32, W/32)."""

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        self.stages = nn.Sequential(
            PreActBottleneck(64, 256), AttentionModule(256, depth=3),
            PreActBottleneck(256, 512, 2), AttentionModule(512, depth=2),
            PreActBottleneck(512, 1024, 2), AttentionModule(1024, depth=1),
            PreActBottleneck(1024, 2048, 2), PreActBottleneck(2048, 2048), PreActBottleneck(2048, 2048),
        )
        self.norm = nn.Sequential(nn.BatchNorm2d(2048), nn.ReLU())
        self.num_features = 2048

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
