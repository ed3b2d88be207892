"""Privacy accounting: ε over a whole multi-round run, noise calibration, checkpoints of the accountant."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.errors import BloodflError
from bloodfl.privacy.accountant import PrivacyAccountant, calibrate_noise, default_delta
from bloodfl.privacy.engine import ClientPrivacy, DPSettings

N, BATCH, EPOCHS = 40, 8, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(n: int = N, batch: int = BATCH, drop_last: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=drop_last, generator=g)


def _fit(privacy: ClientPrivacy, model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """One local fit ("round"): a fresh optimizer, the run-long accountant."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with privacy.attach(model, opt, loader) as private:
        for _ in range(epochs):
            for x, y in private.loader:
                private.step(x, y)


def _opacus_epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_epsilon_after_k_rounds_matches_opacus(mechanism: str, mode: str) -> None:
    torch.manual_seed(0)
    loader = _loader(drop_last=True)
    steps_per_epoch = N // BATCH  # drop_last: floor(40 / 8); computed here, not taken from bloodfl
    sigma, rounds = 1.1, 3
    settings = DPSettings(noise_multiplier=sigma, accountant=mechanism)
    privacy = ClientPrivacy(settings, num_samples=N, steps_per_epoch=len(loader),
                            total_steps=rounds * EPOCHS * len(loader), grad_sample_mode=mode)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    delta = 1e-5
    assert privacy.delta == delta  # n = 40: min(1e-5, 0.1 / 40)
    previous = 0.0
    for k in range(1, rounds + 1):
        _fit(privacy, model, loader, EPOCHS)
        expected = _opacus_epsilon(mechanism, sigma, 1 / steps_per_epoch, k * EPOCHS * steps_per_epoch, delta)
        assert privacy.steps == k * EPOCHS * steps_per_epoch
        assert privacy.epsilon() == pytest.approx(expected, rel=1e-9)
        assert privacy.epsilon() > previous  # the rounds compose: ε grows every round
        previous = privacy.epsilon()


def test_reporting_only_the_last_round_would_under_report() -> None:
    """The known bug (a new PrivacyEngine per round) gives the one-round ε; ours is the k-round ε."""
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0), N, 5, 50, "hooks")
    one_round = _opacus_epsilon("rdp", 1.0, 0.2, 10, privacy.delta)
    privacy.accountant.step(1.0, 0.2, steps=50)
    assert privacy.epsilon() > 1.5 * one_round


@pytest.mark.parametrize(("target", "n", "batch", "steps", "mechanism"), [
    (1.0, 500, 50, 300, "rdp"),
    (3.0, 1200, 32, 750, "rdp"),
    (8.0, 100, 10, 100, "rdp"),
    (8.0, 640, 64, 200, "prv"),
])
def test_target_epsilon_is_met_and_not_wasted(target: float, n: int, batch: int, steps: int,
                                              mechanism: str) -> None:
    steps_per_epoch = math.ceil(n / batch)
    privacy = ClientPrivacy(DPSettings(target_epsilon=target, accountant=mechanism), num_samples=n,
                            steps_per_epoch=steps_per_epoch, total_steps=steps)
    privacy.accountant.step(privacy.noise_multiplier, privacy.sample_rate, steps=steps)
    eps = privacy.epsilon()
    assert 0.8 * target <= eps <= target
    assert eps >= target - 0.05  # get_noise_multiplier's tolerance is 0.01


def test_target_epsilon_met_by_real_training_over_rounds() -> None:
    torch.manual_seed(1)
    loader, rounds = _loader(), 3
    privacy = ClientPrivacy(DPSettings(target_epsilon=2.0), num_samples=N, steps_per_epoch=len(loader),
                            total_steps=rounds * EPOCHS * len(loader))
    model = nn.Linear(6, 3)
    for _ in range(rounds):
        _fit(privacy, model, loader, EPOCHS)
    assert privacy.steps == rounds * EPOCHS * 5  # ceil(40 / 8) batches per epoch, empty ones included
    assert 1.6 <= privacy.epsilon() <= 2.0


def test_empty_poisson_batches_are_noise_only_steps_and_accounted() -> None:
    torch.manual_seed(0)
    loader = _loader(n=4, batch=1)  # q = 1/4: P(empty batch) = 0.75^4 = 0.32
    privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0, delta=1e-3), 4, len(loader), 40, "ghost")
    model = nn.Linear(6, 3)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empties = 0
    with privacy.attach(model, opt, loader) as private:
        for _ in range(10):
            for x, y in private.loader:
                empties += len(x) == 0
                loss, _ = private.step(x, y)
                assert (loss is None) == (len(x) == 0)
    assert empties > 0
    assert privacy.steps == 40
    assert not torch.equal(before, model.weight)


def test_accountant_checkpoint_continues_the_same_sum(tmp_path) -> None:
    settings = DPSettings(noise_multiplier=0.9, accountant="rdp")
    full = ClientPrivacy(settings, N, 5, 30)
    first = ClientPrivacy(settings, N, 5, 30)
    for p in (full, first):
        p.accountant.step(0.9, 0.2, steps=10)
    torch.save(first.state_dict(), tmp_path / "round.pt")
    resumed = ClientPrivacy(settings, N, 5, 30)
    resumed.load_state_dict(torch.load(tmp_path / "round.pt", weights_only=True))
    for p in (full, resumed):
        p.accountant.step(0.9, 0.2, steps=20)
    assert resumed.steps == full.steps == 30
    assert resumed.epsilon() == full.epsilon()


def test_checkpoint_from_other_settings_is_refused() -> None:
    a = ClientPrivacy(DPSettings(target_epsilon=4.0), N, 5, 30)
    b = ClientPrivacy(DPSettings(target_epsilon=4.0), N, 5, 60)  # more planned rounds: other noise
    with pytest.raises(BloodflError, match="noise_multiplier"):
        b.load_state_dict(a.state_dict())
    rdp, prv = PrivacyAccountant("rdp"), PrivacyAccountant("prv")
    with pytest.raises(BloodflError, match="accountant"):
        prv.load_state_dict(rdp.state_dict())


def test_default_delta_is_well_below_one_over_n() -> None:
    for n in (1, 10, 999, 10_000, 1_000_000):
        assert default_delta(n) < 1 / n
        assert default_delta(n) <= 1e-5
    with pytest.raises(BloodflError, match="below 1/n"):
        ClientPrivacy(DPSettings(noise_multiplier=1.0, delta=0.01), num_samples=200, steps_per_epoch=5,
                      total_steps=5)


@pytest.mark.parametrize("kwargs", [{}, {"noise_multiplier": 1.0, "target_epsilon": 3.0},
                                    {"noise_multiplier": 1.0, "accountant": "gdp"},
                                    {"noise_multiplier": 1.0, "max_grad_norm": 0},
                                    {"noise_multiplier": 1.0, "grad_sample_mode": "functorch"}])
def test_bad_settings_are_one_line_errors(kwargs: dict) -> None:
    with pytest.raises(BloodflError):
        DPSettings(**kwargs)


def test_settings_from_config() -> None:
    assert DPSettings.from_config({"enabled": False}) is None
    assert DPSettings.from_config(None) is None
    s = DPSettings.from_config({"enabled": True, "target_epsilon": 3.0, "noise_multiplier": None})
    assert s is not None and s.target_epsilon == 3.0
    with pytest.raises(BloodflError, match="unknown dp setting"):
        DPSettings.from_config({"enabled": True, "target_epsilon": 3.0, "epsilon": 2})


def test_unreachable_target_is_a_one_line_error() -> None:
    with pytest.raises(BloodflError, match="cannot be met"):
        calibrate_noise(1e-3, 1e-5, 0.01, 10)
