"""The architectures written here from the papers' descriptions: layer counts and output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bloodfl.models import build_classifier


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def _trains(model: nn.Module, size: int) -> None:
    model(torch.randn(2, 3, size, size)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_paper002_cnn_four_hidden_conv_layers() -> None:
    model = build_classifier("paper002_cnn", 4, 64)
    assert _count(model.backbone, nn.Conv2d) == 4 and _count(model.backbone, nn.MaxPool2d) == 4
    assert model.backbone.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    _trains(build_classifier("paper002_cnn", 4, 16), 16)


def test_paper003_cnn_seven_blocks_at_100px() -> None:
    model = build_classifier("paper003_cnn", 8, 100)
    bb = model.backbone
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 64, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    pools = [m for m in bb.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 7 and all(p.kernel_size == 2 and p.stride == 1 for p in pools)
    drops = [m for m in bb.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 7 and all(d.p == 0.25 for d in drops)
    # 'same' convolutions, stride-1 'valid' poolings: 100 -> 93
    assert bb.forward_features(torch.zeros(1, 3, 100, 100)).shape == (1, 256, 93, 93)
    assert [type(m).__name__ for m in model.head.mlp] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head.mlp[0].out_features == 128
    _trains(build_classifier("paper003_cnn", 8, 8), 8)


def test_unet_classifier_encoder_decoder() -> None:
    model = build_classifier("unet_classifier", 5, 64)
    bb = model.backbone
    assert [b[0].out_channels for b in bb.down] == [64, 128, 256]
    assert [b[0].out_channels for b in bb.decode] == [256, 128, 64]  # papers/004: decoder 256, 128, 64
    assert _count(bb, nn.ConvTranspose2d) == 3 and _count(bb, nn.Conv2d) == 14
    assert bb.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 64, 64)
    assert bb.forward_features(torch.zeros(1, 3, 13, 13)).shape == (1, 64, 13, 13)  # odd sizes padded back
    assert [type(m).__name__ for m in model.head.mlp] == ["Linear"]  # "a dense layer with a Softmax"
    _trains(build_classifier("unet_classifier", 5, 8), 8)


def test_attention56_depth_and_shape() -> None:
    from bloodfl.models.attention import AttentionModule, PreActBottleneck

    model = build_classifier("attention56", 4, 32)
    bb = model.backbone
    modules = [m for m in bb.stages if isinstance(m, AttentionModule)]
    assert len(modules) == 3 and [len(m.down) for m in modules] == [3, 2, 1]
    # trunk depth: stem conv + 18 residual units x 3 convolutions + classifier = 56 weight layers
    trunk_units = sum(isinstance(m, PreActBottleneck) for m in bb.stages) + sum(
        1 + len(m.trunk) + 1 for m in modules)
    assert 1 + 3 * trunk_units + 1 == 56
    assert bb.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    _trains(model, 32)


@pytest.mark.parametrize("name", ["paper002_cnn", "paper003_cnn", "unet_classifier", "attention56"])
def test_written_here_models_have_paper_references(name: str) -> None:
    doc = type(build_classifier(name, 2, 32).backbone).__doc__ or ""
    assert "papers/00" in doc
