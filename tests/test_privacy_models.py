"""Every model family can be made private and trained with DP; what cannot fails early, naming the layer."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import GroupNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.errors import BloodflError
from bloodfl.models.registry import build_classifier
from bloodfl.privacy.compat import (
    _out_of_place_residuals,
    _replace_batchnorm,
    _wrap_vit_tokens,
    check_private,
    make_dp_compatible,
)
from bloodfl.privacy.engine import ClientPrivacy, DPSettings, prepare_model

pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = [  # (registry name, smallest fast image size, a change make_dp_compatible must report)
    ("resnet18", 16, "residual add out-of-place in 8 BasicBlock"),
    ("resnet50", 16, "residual add out-of-place in 16 Bottleneck"),
    ("vgg16", 32, "inplace=False on 13 ReLU"),
    ("densenet121", 32, "BatchNormAct2d -> GroupNormAct"),
    ("efficientnet_b0", 32, "BatchNormAct2d -> GroupNormAct"),
    ("mobilenetv2", 32, "BatchNormAct2d -> GroupNormAct"),
    ("inception_v3", 75, "BatchNormAct2d -> GroupNormAct"),
    ("vit_tiny", 32, "TokenEmbed"),
]


@pytest.mark.parametrize(("name", "size", "change"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_is_made_private_and_takes_a_dp_step(name: str, size: int, change: str) -> None:
    torch.manual_seed(0)
    net = build_classifier(name, 4, size, head={"pool": "avg", "hidden": 16})
    net, changes, mode = prepare_model(net, (3, size, size), "auto")
    assert mode == "ghost"
    assert any(change in c for c in changes), changes
    assert not any(isinstance(m, _BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())

    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0), num_samples=4, steps_per_epoch=1, total_steps=1,
                            grad_sample_mode=mode)
    before = copy.deepcopy(net.state_dict())
    with privacy.attach(net, torch.optim.SGD(net.parameters(), lr=0.01), loader) as private:
        loss, logits = private.step(x, y)
    assert loss is not None and torch.isfinite(loss) and logits.shape == (4, 4)
    assert privacy.steps == 1 and 0 < privacy.epsilon() < float("inf")
    after = net.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(before[k], after[k]) for k, p in net.named_parameters() if p.requires_grad)
    # the hooks are gone: the net is a plain module again (FL aggregates and evaluates it as such)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in net.parameters())


def test_timm_fused_batchnorm_act_fails_early_naming_the_layer() -> None:
    # Opacus' ModuleValidator passes BatchNormAct2d (its exact type is not registered); the dry run does not
    net = build_classifier("efficientnet_b0", 3, 32)
    with pytest.raises(BloodflError, match=r"'backbone.bn1' \(BatchNormAct2d\)"):
        check_private(net, (3, 32, 32), "ghost")


def test_inplace_ops_fail_early_naming_the_layer() -> None:
    net = build_classifier("resnet18", 3, 16)
    _replace_batchnorm(net)  # BatchNorm fixed, in-place ops left (Opacus issue #828)
    with pytest.raises(BloodflError, match=r"layer 'backbone\..*' \(.*\) fails under DP"):
        check_private(net, (3, 16, 16), "hooks")


def test_parameters_outside_forward_fail_early_naming_them() -> None:
    net = build_classifier("vit_tiny", 3, 32)  # cls_token / pos_embed sit on the ViT, used via forward_features
    with pytest.raises(BloodflError, match="backbone.cls_token.*VisionTransformer"):
        check_private(net, (3, 32, 32), "ghost")


def test_out_of_place_resnet_blocks_compute_what_timm_computes() -> None:
    """The subclasses copy timm's forward; this catches a timm upgrade that changes it."""
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        stock = timm.create_model(arch, num_classes=0).eval()
        patched = copy.deepcopy(stock)
        assert _out_of_place_residuals(patched)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(patched(x), stock(x), rtol=0, atol=0)


def test_vit_token_module_computes_what_timm_computes() -> None:
    for kwargs in ({}, {"no_embed_class": True, "reg_tokens": 2}):
        torch.manual_seed(0)
        stock = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, **kwargs).eval()
        nn.init.normal_(stock.cls_token)  # timm initialises it near 0: make a mix-up visible
        patched = copy.deepcopy(stock)
        assert _wrap_vit_tokens(patched)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(patched.forward_features(x), stock.forward_features(x), rtol=0, atol=0)


def test_fused_norm_keeps_activation_and_affine_weights() -> None:
    net = timm.create_model("mobilenetv2_100", num_classes=0)
    nn.init.uniform_(net.bn1.weight)
    weight, act = net.bn1.weight.detach().clone(), net.bn1.act
    net, changes = make_dp_compatible(net)
    assert type(net.bn1) is GroupNormAct and net.bn1.act is act and not act.inplace  # the same module
    torch.testing.assert_close(net.bn1.weight.detach(), weight)
    assert net.bn1.num_groups == 32 and changes


@pytest.mark.parametrize("name", ["scatternet", "color_hist", "color_hist_joint"])
def test_fixed_feature_models_take_dp_steps_by_per_sample_hooks_and_say_why_not_ghost(name: str) -> None:
    """ScatterNet's (fixed wavelets) and color_hist's (histograms) first stages run without gradients, so ghost
    clipping's input-gradient pass cannot work: auto picks per-sample hooks and says so, ghost alone is refused
    with the setting to use."""
    torch.manual_seed(0)
    net = build_classifier(name, 4, 32)
    with pytest.raises(BloodflError, match="computed without gradients.*dp.grad_sample_mode=hooks"):
        check_private(make_dp_compatible(copy.deepcopy(net))[0], (3, 32, 32), "ghost")
    net, changes, mode = prepare_model(net, (3, 32, 32), "auto")
    assert mode == "hooks" and any("without gradients" in c for c in changes), changes
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0), num_samples=4, steps_per_epoch=1, total_steps=1,
                            grad_sample_mode=mode)
    before = copy.deepcopy(net.state_dict())
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with privacy.attach(net, torch.optim.SGD(net.parameters(), lr=0.01), loader) as private:
        loss, _ = private.step(x, y)
    assert torch.isfinite(loss) and privacy.steps == 1
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # every tensor is a parameter
