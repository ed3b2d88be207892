"""What DP-SGD promises, checked exactly: the steps and sample rate accounted are the ones recorded, one image
moves the clipped sum by at most max_grad_norm (class weights included), convolutions with any padding mode
get exact per-sample norms, and an empty Poisson batch through the real image pipeline is a noise-only step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.data.augment import Flips
from bloodfl.data.datamodule import ArrayDataModule, IndexedImages
from bloodfl.errors import BloodflError
from bloodfl.privacy.compat import check_private, make_dp_compatible
from bloodfl.privacy.engine import ClientPrivacy, DPSettings
from bloodfl.privacy.norms import conv2d_norm_sample, conv_grad_sample

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 2. exactly what was accounted is what is recorded -------------------------------------------------------

@pytest.mark.parametrize(("k", "mechanism"), [(93, "rdp"), (12, "rdp"), (93, "prv")])
def test_recorded_plan_is_what_was_accounted(k: int, mechanism: str) -> None:
    n, epochs, target = 2 * k, 2, 3.0
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)),
                        batch_size=2)
    assert len(loader) == k
    if k == 93:  # the case that went wrong: Opacus' own Poisson loader takes int(1 / (1 / 93)) = 92 steps
        assert len(DPDataLoader.from_data_loader(loader)) == k - 1
    privacy = ClientPrivacy(DPSettings(target_epsilon=target, accountant=mechanism), num_samples=n,
                            steps_per_epoch=len(loader), total_steps=epochs * len(loader), grad_sample_mode="hooks")
    model = nn.Linear(3, 2)
    with privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader) as private:
        assert len(private.loader) == k
        for _ in range(epochs):
            for x, y in private.loader:
                private.step(x, y)
    report = privacy.report()
    assert report["steps"] == report["planned_steps"] == epochs * k
    assert report["sample_rate"] == 1 / k and report["steps_per_epoch"] == k
    assert report["history"] == [[report["noise_multiplier"], 1 / k, epochs * k]]
    # ε recomputed from the report alone, by a fresh Opacus accountant
    fresh = RDPAccountant() if report["accountant"] == "rdp" else PRVAccountant()
    fresh.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    assert fresh.get_epsilon(delta=report["delta"]) == pytest.approx(report["epsilon"], rel=1e-9)
    assert report["epsilon"] <= target
    assert report["epsilon"] >= target - 0.02  # calibrated to within Opacus' tolerance of the target


# --- 3. class weights: each sample's gradient is its own ------------------------------------------------------

WEIGHTS = torch.tensor([0.2, 0.3, 6.0])  # class 2 is rare, heavily weighted


def _clipped_sum(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """The sum of clipped per-sample gradients that reaches the optimizer (noise 0), for one batch."""
    model = copy.deepcopy(model)
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=len(ds))  # one batch per epoch: expected batch size = len(ds)
    privacy = ClientPrivacy(DPSettings(noise_multiplier=0.0, max_grad_norm=clip), num_samples=100,
                            steps_per_epoch=1, total_steps=1, grad_sample_mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen.append(torch.cat([p.grad.flatten() for p in params])))
    with privacy.attach(model, opt, loader, nn.CrossEntropyLoss(weight=WEIGHTS)) as private:
        private.step(x, y)
        expected_batch = private.optimizer.expected_batch_size
    return seen[0] * expected_batch


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 0, 1, 0, 1, 0])  # common classes only
    rare_x, rare_y = torch.randn(1, 5) * 2, torch.tensor([2])
    return model, x, y, rare_x, rare_y


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_neighbouring_batches_move_the_clipped_sum_by_at_most_the_clip(mode: str) -> None:
    model, x, y, rare_x, rare_y = _data()
    clip = 0.5  # the common images' weighted gradients are below it, the rare one's above
    without = _clipped_sum(mode, model, x, y, clip)
    with_rare = _clipped_sum(mode, model, torch.cat([x, rare_x]), torch.cat([y, rare_y]), clip)
    assert (with_rare - without).norm() <= clip * (1 + 1e-5)
    # and the other way round: a rare image in both batches, a common one added
    base_x, base_y = torch.cat([x[:3], rare_x]), torch.cat([y[:3], rare_y])
    a = _clipped_sum(mode, model, base_x, base_y, clip)
    b = _clipped_sum(mode, model, torch.cat([base_x, x[3:4]]), torch.cat([base_y, y[3:4]]), clip)
    assert (b - a).norm() <= clip * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_lone_rare_image_keeps_its_class_weight(mode: str) -> None:
    model, _, _, rare_x, rare_y = _data()
    m = copy.deepcopy(model)
    nn.functional.cross_entropy(m(rare_x), rare_y, weight=WEIGHTS, reduction="sum").backward()
    own = torch.cat([p.grad.flatten() for p in m.parameters()])  # w_2 * its own gradient
    clip = float(own.norm()) * 2  # not clipped: what arrives is exactly the weighted gradient
    reached = _clipped_sum(mode, model, rare_x, rare_y, clip)
    torch.testing.assert_close(reached, own, rtol=1e-4, atol=1e-6)


# --- 6. convolutions with padding modes other than zeros -----------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_rules_are_exact_for_every_padding_mode(padding_mode: str, stride: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=stride, padding=(1, 2), padding_mode=padding_mode)
    x = torch.randn(4, 3, 7, 9)
    g = torch.randn_like(conv(x))
    expected: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in conv.parameters()}
    for i in range(len(x)):
        for p, gp in zip(conv.parameters(), torch.autograd.grad(conv(x[i:i + 1]), list(conv.parameters()),
                                                                g[i:i + 1])):
            expected[p].append(gp)
    for form in ("ghost", "materialized"):
        norms = conv2d_norm_sample(conv, [x], g, form=form)
        for p, n in norms.items():
            torch.testing.assert_close(n, torch.stack([e.norm() for e in expected[p]]), rtol=1e-4, atol=1e-5)
    samples = conv_grad_sample(conv, [x], g)  # the hooks-mode rule
    for p, gs in samples.items():
        torch.testing.assert_close(gs, torch.stack(expected[p]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_reflect_padded_model_trains_with_exact_clipping(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(4 * 36, 3))
    check_private(model, (3, 6, 6), mode)
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 2])
    raw = []
    for i in range(len(x)):
        m = copy.deepcopy(model)
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        raw.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    clip = float(torch.stack([r.norm() for r in raw]).median())
    expected = sum(r * min(1.0, clip / float(r.norm())) for r in raw)
    got = _clipped_sum_plain(mode, model, x, y, clip)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _clipped_sum_plain(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    model = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    privacy = ClientPrivacy(DPSettings(noise_multiplier=0.0, max_grad_norm=clip), num_samples=100,
                            steps_per_epoch=1, total_steps=1, grad_sample_mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen.append(torch.cat([p.grad.flatten() for p in model.parameters()])))
    with privacy.attach(model, opt, loader) as private:
        private.step(x, y)
        return seen[0] * private.optimizer.expected_batch_size


def test_conv1d_with_another_padding_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(BloodflError, match="padding_mode='zeros'"):
        make_dp_compatible(model)


# --- 5. an empty Poisson batch through the real image pipeline ------------------------------------------------

def test_indexed_images_gather_an_empty_batch() -> None:
    images = np.zeros((4, 5, 5, 3), dtype=np.uint8)
    x, y = IndexedImages(images, np.arange(4) % 2, np.arange(4)).__getitems__([])
    assert x.shape == (0, 5, 5, 3) and x.dtype == torch.uint8
    assert y.shape == (0,) and y.dtype == torch.long


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batch_is_a_noise_only_accounted_step(mode: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    dm = ArrayDataModule(images, labels, train_idx=np.arange(2), val_idx=np.arange(2, 4), test_idx=np.arange(4, 6),
                         batch_size=1, augment=Flips(), normalize="imagenet", classes=["a", "b", "c"])
    loader = dm.train_dataloader()  # 2 images, batches of 1: q = 1/2, a batch is empty with probability 1/4
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0), num_samples=2, steps_per_epoch=len(loader),
                            total_steps=200, grad_sample_mode=mode)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 36, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = 0
    with privacy.attach(model, opt, loader) as private:
        for _ in range(100):
            for x, y in private.loader:
                x = dm.to_float(x, train=True)  # uint8 -> float, augmentation, normalisation, as in training
                before = [p.detach().clone() for p in model.parameters()]
                steps = privacy.steps
                loss, logits = private.step(x, y)
                assert privacy.steps == steps + 1  # accounted, empty or not
                if len(y) == 0:
                    assert x.shape == (0, 3, 8, 8) and loss is None and logits is None
                    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # noise moved it
                    empty += 1
            if empty:
                break
    assert empty >= 1


# --- 7. every registry model can be made private (xception: out-of-place residual add) -----------------------

def test_xception_is_made_private_and_computes_what_timm_computes() -> None:
    from bloodfl.models.registry import build_classifier
    from bloodfl.privacy.compat import _out_of_place_residuals
    from bloodfl.privacy.engine import prepare_model

    torch.manual_seed(0)
    net = build_classifier("xception", 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    patched = copy.deepcopy(net)
    assert _out_of_place_residuals(patched) == ["made the residual add out-of-place in 12 Block"]
    with torch.no_grad():
        torch.testing.assert_close(patched(x), net(x))
    for mode in ("ghost", "hooks"):
        _, changes, got = prepare_model(copy.deepcopy(net).train(), (3, 32, 32), mode)
        assert got == mode and any("out-of-place in 12 Block" in c for c in changes)
