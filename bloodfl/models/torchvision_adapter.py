"""torchvision backbones timm lacks (papers/002: SqueezeNet, GoogLeNet, ShuffleNetV2), with timm's
``forward_features`` interface so the paper head fits on them like on timm models.

The adapter keeps torchvision's own module names (``features``, ``conv1``, ``inception3a`` ...), so a torchvision
state dict loads into it with ``model.weights=PATH`` (its unused classifier tensors are reported as unused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d

# the modules forward_features runs, in order; everything after (pooling, dropout, fc / classifier) is dropped
FEATURE_MODULES: dict[str, tuple[str, ...]] = {
    "squeezenet1_0": ("features",),
    "squeezenet1_1": ("features",),
    "googlenet": ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                  "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                  "inception5a", "inception5b"),
    "shufflenet_v2_x0_5": ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
    "shufflenet_v2_x1_0": ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
    "shufflenet_v2_x1_5": ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
    "shufflenet_v2_x2_0": ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
}


class TorchvisionBackbone(nn.Module):
    """The feature-extracting modules of a torchvision classifier; ``forward_features`` returns (B, C, H, W)."""

    def __init__(self, model: nn.Module, feature_modules: Sequence[str]) -> None:
        super().__init__()
        self.module_order = tuple(feature_modules)
        for name in self.module_order:
            self.add_module(name, getattr(model, name))
        # GoogLeNet's ImageNet weights expect its own input re-normalisation (torchvision sets it with weights)
        self.transform_input = bool(getattr(model, "transform_input", False))
        last = getattr(model, "fc", None) or getattr(model, "classifier", None)
        self.num_features = getattr(last, "in_features", None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:  # torchvision GoogLeNet._transform_input
            x = torch.cat([x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                           x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                           x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], 1)
        for name in self.module_order:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class OutOfPlaceBasicConv2d(BasicConv2d):
    """GoogLeNet's BasicConv2d applies ``F.relu(x, inplace=True)``, which Opacus' per-sample hooks reject (the
    hooked BatchNorm output is modified in place); the same module with an out-of-place ReLU (same weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _no_inplace_relu(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is BasicConv2d:
            module.__class__ = OutOfPlaceBasicConv2d


def create_torchvision_backbone(arch: str, pretrained: bool) -> TorchvisionBackbone:
    """torchvision's ``arch`` without its classifier; ``pretrained`` uses the torchvision weights API (DEFAULT)."""
    import torchvision

    if arch not in FEATURE_MODULES:
        raise KeyError(arch)
    kwargs: dict = {}
    if arch == "googlenet" and not pretrained:
        kwargs = {"aux_logits": False, "init_weights": True}  # the auxiliary heads are training-only extras
    model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
    if arch == "googlenet":
        _no_inplace_relu(model)
    return TorchvisionBackbone(model, FEATURE_MODULES[arch])
