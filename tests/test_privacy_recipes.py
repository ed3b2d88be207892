"""DP-SGD recipes (docs/privacy.md, "DP-SGD recipes") keep DP-SGD's promises, checked as an attacker would:

- augmentation multiplicity (``dp.augmult``): each image's gradient is the mean over its views BEFORE clipping,
  so one image moves the clipped sum by at most max_grad_norm (measured, as for the other modes);
- virtual steps (``dp.expected_batch_size``, ``dp.physical_batch_size``): chunks give the update one physical
  batch gives under the same noise, and exactly the sample rate and the steps taken are accounted;
- EMA of the weights (``dp.ema``): post-processing, the accountant sees exactly what it sees without it;
- automatic clipping (``dp.clipping=automatic``): every per-sample gradient scaled below C.

The replay attack against every recipe is in tests/test_privacy_boundary.py, ε recomputed from privacy.json in
tests/test_privacy_federated.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from opacus.accountants import RDPAccountant
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from bloodfl.data.augment import Flips
from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.errors import BloodflError
from bloodfl.privacy.engine import AUTOMATIC_CLIP_GAMMA, ClientPrivacy, DPSettings
from bloodfl.privacy.sampling import PoissonLoader
from bloodfl.training.averaging import EvaluatedEMA
from bloodfl.training.module import ClassifierModule

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # views per image


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, mode: str = "hooks",
                 **recipe: Any) -> torch.Tensor:
    """The sum of clipped per-image gradients that reaches the optimizer (noise 0) for one batch."""
    model = copy.deepcopy(model)
    privacy = ClientPrivacy(DPSettings(noise_multiplier=0.0, max_grad_norm=clip, **recipe), num_samples=100,
                            steps_per_epoch=1, total_steps=1, grad_sample_mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen.append(torch.cat([p.grad.flatten() for p in model.parameters()])))
    with privacy.attach(model, opt) as private:
        private.step(x, y)
        expected_batch = private.optimizer.expected_batch_size
    assert len(seen) == 1  # one parameter update per logical batch, whatever the chunks
    return seen[0] * expected_batch


def _view_grad(model: nn.Module, views: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One image's gradient as augmentation multiplicity defines it: the mean over its views' gradients."""
    m = copy.deepcopy(model)
    nn.functional.cross_entropy(m(views), y.repeat(len(views))).backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def test_augmult_averages_the_views_before_clipping() -> None:
    model, g = _model(), torch.Generator().manual_seed(1)
    views, y = torch.randn(1, K, 5, generator=g) * 3, torch.tensor([2])
    mean_grad = _view_grad(model, views[0], y)
    loose = float(mean_grad.norm()) * 2  # not clipped: exactly the mean of the views' gradients arrives
    torch.testing.assert_close(_clipped_sum(model, views, y, loose, augmult=K), mean_grad, rtol=1e-4, atol=1e-6)
    tight = float(mean_grad.norm()) / 4  # clipped as one vector: the mean's direction, at norm C
    torch.testing.assert_close(_clipped_sum(model, views, y, tight, augmult=K),
                               mean_grad * tight / mean_grad.norm(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("physical", [None, 2])
def test_augmult_neighbouring_batches_move_the_clipped_sum_by_at_most_the_clip(physical: int | None) -> None:
    model, g = _model(), torch.Generator().manual_seed(2)
    x, y = torch.randn(7, K, 5, generator=g), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    outlier_x, outlier_y = torch.randn(1, K, 5, generator=g) * 4, torch.tensor([2])
    clip = 0.3
    for base_x, base_y in ((x, y), (x[:3], y[:3])):
        without = _clipped_sum(model, base_x, base_y, clip, augmult=K, physical_batch_size=physical)
        with_one = _clipped_sum(model, torch.cat([base_x, outlier_x]), torch.cat([base_y, outlier_y]), clip,
                                augmult=K, physical_batch_size=physical)
        assert (with_one - without).norm() <= clip * (1 + 1e-5)
        assert (with_one - without).norm() >= clip * (1 - 1e-3)  # the outlier's mean gradient is clipped to C


def test_augmult_is_refused_where_it_cannot_hold() -> None:
    with pytest.raises(BloodflError, match="ghost clipping"):
        DPSettings(noise_multiplier=1.0, augmult=2, grad_sample_mode="ghost")
    assert DPSettings(noise_multiplier=1.0, augmult=2).model_mode == "hooks"
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0, augmult=K), num_samples=10, steps_per_epoch=1,
                            total_steps=1, grad_sample_mode="hooks")
    model = _model()
    with privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1)) as private, \
            pytest.raises(BloodflError, match="views"):
        private.step(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))  # one view only: not what K promises


def test_datamodule_makes_k_augmented_views_per_training_image() -> None:
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    dm = ArrayDataModule(images, np.zeros(6, dtype=np.int64), train_idx=np.arange(6), augment=Flips(),
                         normalize="minmax", augmult=K)
    x = torch.from_numpy(images[:4])
    out = dm.to_float(x, train=True)
    assert out.shape == (4, K, 3, 8, 8)
    torch.manual_seed(0)
    for i in range(4):  # every view is the image itself, flipped or not
        original = x[i].permute(2, 0, 1).float() / 255
        flips = [original, original.flip(-1), original.flip(-2), original.flip(-1, -2)]
        assert all(any(torch.allclose(v, f) for f in flips) for v in out[i])
    assert dm.to_float(x, train=False).shape == (4, 3, 8, 8)  # evaluation: one plain view


@pytest.mark.parametrize(("mode", "augmult"), [("hooks", 0), ("ghost", 0), ("hooks", K)])
def test_virtual_steps_give_the_update_of_one_physical_batch(mode: str, augmult: int) -> None:
    g = torch.Generator().manual_seed(4)
    shape = (7, augmult, 5) if augmult else (7, 5)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (7,), generator=g)
    updates, histories = [], []
    for physical in (None, 2, 1):
        privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0, max_grad_norm=0.5, physical_batch_size=physical,
                                           augmult=augmult), num_samples=70, steps_per_epoch=10, total_steps=10,
                                grad_sample_mode=mode)
        privacy.secret.load_state_dict({"secret": "2a" * 16})  # the same noise for every chunking
        model = _model()
        with privacy.attach(model, torch.optim.SGD(model.parameters(), lr=1.0)) as private:
            private.step(x, y)
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        histories.append(privacy.accountant.state_dict()["history"])
    for other in updates[1:]:
        torch.testing.assert_close(other, updates[0], rtol=1e-5, atol=1e-6)
    assert histories == [[[1.0, 0.1, 1]]] * 3  # one accounted step per logical batch


def test_virtual_steps_account_exactly_the_sample_rate_and_steps_taken() -> None:
    n, epochs, logical, physical = 100, 2, 20, 3
    settings = DPSettings(target_epsilon=3.0, expected_batch_size=logical, physical_batch_size=physical)
    steps_per_epoch = settings.steps_per_epoch(n, loader_steps=n // 8)  # the plain loader's count is replaced
    assert steps_per_epoch == n // logical
    privacy = ClientPrivacy(settings, num_samples=n, steps_per_epoch=steps_per_epoch,
                            total_steps=epochs * steps_per_epoch, grad_sample_mode="ghost")
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))
    loader = PoissonLoader(data, sample_rate=privacy.sample_rate, steps=privacy.steps_per_epoch,
                           generator=privacy.sampling_generator(), collate_fn=default_collate)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updates, forwards, drawn = [], [], []
    opt.register_step_post_hook(lambda *_: updates.append(1))
    model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    with privacy.attach(model, opt) as private:
        for _ in range(epochs):
            for xb, yb in loader:
                drawn.append(len(xb))
                private.step(xb, yb)
    report = privacy.report()
    assert report["steps"] == report["planned_steps"] == len(updates) == epochs * steps_per_epoch
    assert report["sample_rate"] == 1 / steps_per_epoch and report["expected_batch_size"] == logical
    assert report["history"] == [[report["noise_multiplier"], 1 / steps_per_epoch, epochs * steps_per_epoch]]
    assert max(forwards) <= physical and sum(forwards) == sum(drawn) > len(updates)  # chunks, each image once
    fresh = RDPAccountant()
    fresh.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    assert fresh.get_epsilon(delta=report["delta"]) == pytest.approx(report["epsilon"], rel=1e-9)
    assert report["epsilon"] <= 3.0
    # a client with fewer images than the logical batch (dp=true's 128 on a small site) samples all of them
    # at every step: sample rate 1, one step per epoch, accounted as such
    assert settings.steps_per_epoch(10, loader_steps=1) == 1


def _fit_lightning(ema: float | None, out: Path, secret: str | None = "5c" * 16,
                   ) -> tuple[ClientPrivacy, ClassifierModule, pl.Trainer]:
    """A centralized DP fit through Lightning (the path train.py takes), with or without dp.ema's callback;
    secret=None: the client's own fresh secret (what an attacker replaying the fit does not have)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (24, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, 24)
    dm = ArrayDataModule(images, labels, train_idx=np.arange(16), val_idx=np.arange(16, 24),
                         test_idx=np.arange(16, 24), batch_size=4, normalize="minmax", classes=["a", "b", "c"])
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0, ema=ema), num_samples=16, steps_per_epoch=4,
                            total_steps=8, grad_sample_mode="hooks")
    if secret is not None:
        privacy.secret.load_state_dict({"secret": secret})
    dm.use_poisson_sampling(privacy.sample_rate, privacy.steps_per_epoch, privacy.sampling_generator())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    module = ClassifierModule(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), privacy=privacy)
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=out, monitor="val/loss", save_last=False)]
    if ema is not None:
        callbacks.append(EvaluatedEMA(decay=ema))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == privacy.steps  # the EMA updates once per DP step
    return privacy, module, trainer


def test_ema_changes_nothing_in_the_accountant_and_is_what_is_evaluated(tmp_path: Path) -> None:
    plain, plain_module, _ = _fit_lightning(None, tmp_path / "plain")
    averaged, module, trainer = _fit_lightning(0.5, tmp_path / "ema")
    assert averaged.accountant.state_dict() == plain.accountant.state_dict()  # same σ, q, steps: same ε
    assert averaged.epsilon() == plain.epsilon() and averaged.report()["dp.ema"] == 0.5
    assert not all(torch.equal(a, b) for a, b in zip(module.net.parameters(), plain_module.net.parameters()))
    # the best checkpoint holds the averaged weights, and testing it tests them (not the raw ones kept beside;
    # Lightning's own EMAWeightAveraging put those back: bloodfl/training/averaging.py)
    best = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    averaged_w, raw_w = ckpt["state_dict"]["net.1.weight"], ckpt["current_model_state"]["net.1.weight"]
    assert not torch.equal(averaged_w, raw_w)
    seen: list[torch.Tensor] = []
    module.net.register_forward_pre_hook(lambda m, i: seen.append(m[1].weight.detach().clone()))
    trainer.test(module, datamodule=trainer.datamodule, ckpt_path=best, verbose=False)
    assert seen and all(torch.equal(w, averaged_w) for w in seen)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_automatic_clipping_scales_each_gradient_below_the_clip(mode: str) -> None:
    model, g = _model(), torch.Generator().manual_seed(6)
    x, y = torch.randn(1, 5, generator=g) * 3, torch.tensor([2])
    own = _view_grad(model, x, y)  # one view: the image's own gradient
    clip = 0.5
    reached = _clipped_sum(model, x, y, clip, mode=mode, clipping="automatic")
    torch.testing.assert_close(reached, own * clip / (own.norm() + AUTOMATIC_CLIP_GAMMA), rtol=1e-4, atol=1e-6)
    # neighbouring batches (an outlier added to 7 images, also with physical chunks) differ by less than C
    x7, y7 = torch.randn(7, 5, generator=g), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    for physical in (None, 3):
        without = _clipped_sum(model, x7, y7, clip, mode=mode, clipping="automatic", physical_batch_size=physical)
        with_one = _clipped_sum(model, torch.cat([x7, x * 10]), torch.cat([y7, y]), clip, mode=mode,
                                clipping="automatic", physical_batch_size=physical)
        assert (with_one - without).norm() <= clip * (1 + 1e-5)


def test_recipes_that_cannot_hold_are_refused_in_one_line(tmp_path: Path) -> None:
    from bloodfl.compose import Root
    from tests.conftest import compose_cfg

    fed = Root(compose_cfg(["dp='true'", "dp.ema=0.999"], tmp_path, "federate"))
    with pytest.raises(BloodflError, match="dp.ema=null"):  # not built for federated runs yet (docs/privacy.md)
        fed.check_federated()
    with pytest.raises(BloodflError, match="augment=none"):  # K copies of the same image: nothing to average
        Root(compose_cfg(["dp='true'", "dp.augmult=4", "augment=none"], tmp_path)).augmult()
    assert Root(compose_cfg(["dp='true'", "dp.augmult=4", "augment=flips"], tmp_path)).augmult() == 4
    assert Root(compose_cfg(["augment=flips"], tmp_path)).augmult() == 0  # no DP: one view


def test_ema_weights_cannot_be_replayed_without_the_secret(tmp_path: Path) -> None:
    """The replay attack (tests/test_privacy_boundary.py) against the released EMA weights: same code, data,
    public seed and initial weights; only the client's secret makes the replay differ."""
    def released(name: str, secret: str | None) -> list[torch.Tensor]:
        return [p.detach().clone() for p in _fit_lightning(0.5, tmp_path / name, secret)[1].net.parameters()]

    observed = released("client", None)
    assert not all(torch.equal(a, b) for a, b in zip(observed, released("attacker", None)))
    known = released("client_known", "77" * 16)
    assert all(torch.equal(a, b) for a, b in zip(known, released("attacker_known", "77" * 16)))
