"""Clipping is real: with noise 0, what reaches the optimizer is the sum of per-sample gradients each clipped to
max_grad_norm, checked against per-sample gradients computed one image at a time with plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.models.registry import build_classifier
from bloodfl.privacy.engine import ClientPrivacy, DPSettings, prepare_model

BATCH = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each image's full gradient, flattened, from its own forward/backward on a copy (no Opacus)."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = []
    for i in range(len(x)):
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    return grads


@pytest.mark.parametrize(("name", "size", "mode", "frozen"), [
    ("simple_cnn", 16, "hooks", False), ("simple_cnn", 16, "ghost", False),
    ("simple_cnn", 16, "ghost", True),  # frozen backbone: both ghost passes are full backward passes
    ("resnet18", 16, "ghost", False),  # out-of-place residual blocks
    ("mobilenetv2", 32, "ghost", False), ("mobilenetv2", 32, "hooks", False),  # GroupNormAct, depthwise convs
    ("vit_tiny", 32, "ghost", False),  # TokenEmbed, 3-d linear layers
])
def test_optimizer_receives_clipped_per_sample_gradients(name: str, size: int, mode: str, frozen: bool) -> None:
    torch.manual_seed(0)
    # a small head keeps the test fast; dropout would differ between the passes compared
    net = build_classifier(name, 3, size, head={"pool": "avg", "hidden": 32, "dropout": 0.0})
    net, _, mode = prepare_model(net, (3, size, size), mode)
    net.backbone.requires_grad_(not frozen)
    x, y = torch.randn(BATCH, 3, size, size) * 2, torch.randint(0, 3, (BATCH,))
    raw = _per_sample_grads(net, x, y)
    norms = torch.stack([g.norm() for g in raw])
    clip = float(norms.median())  # about half the images are clipped, half are not

    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)  # sample rate 1: expected batch = BATCH
    privacy = ClientPrivacy(DPSettings(noise_multiplier=0.0, max_grad_norm=clip), num_samples=BATCH,
                            steps_per_epoch=1, total_steps=BATCH + 1, grad_sample_mode=mode)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    params = [p for p in net.parameters() if p.requires_grad]
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen.append(torch.cat([p.grad.flatten() for p in params])))
    with privacy.attach(net, opt, loader) as private:
        assert private.mode == mode
        for i in range(BATCH):  # one image per step: the optimizer gets exactly that image's clipped gradient
            private.step(x[i:i + 1], y[i:i + 1])
        private.step(x, y)  # the whole batch: the sum of the clipped gradients

    for i, g in enumerate(seen[:BATCH]):
        reached = g * BATCH  # loss_reduction=mean divides the clipped sum by the expected batch size
        assert reached.norm() <= clip * (1 + 1e-4)
        assert reached.norm() == pytest.approx(min(norms[i].item(), clip), rel=1e-3)
        assert torch.nn.functional.cosine_similarity(reached, raw[i], dim=0) > 0.9999
    expected = sum(g * min(1.0, clip / n.item()) for g, n in zip(raw, norms)) / BATCH
    assert (seen[-1] - expected).norm() <= 1e-3 * expected.norm()  # float32 sums over ~1e6 weights
