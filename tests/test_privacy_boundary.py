"""The privacy boundary of a DP client: its noise and Poisson batches come from a secret only it holds.

An honest-but-curious server knows the config, the public seed, the initial weights and every training record
but one. If the client's randomness were a function of those public values, the server could replay the fit
once per candidate record and keep the one that reproduces the observed update bit for bit. These tests run
that attack at the engine level (ClientPrivacy + PrivateTraining, tiny model, tiny data): it fails against
the client, and succeeds as soon as the client's secret is handed to the attacker, so the attack is real and
the secret is what stops it. Resuming from the client's state_dict continues the same secret stream.
"""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.errors import BloodflError
from bloodfl.privacy.engine import ClientPrivacy, ClientSecret, DPSettings, check_precision

pytestmark = pytest.mark.usefixtures("one_thread")

PUBLIC_SEED, N, BATCH, EPOCHS = 1234, 8, 4, 10  # 2 Poisson batches per epoch, 20 steps per fit
SETTINGS = DPSettings(noise_multiplier=0.8, max_grad_norm=1.0)
# DP-SGD recipes (tests/test_privacy_recipes.py) under the same attack: virtual steps of one image, 3 views
RECIPES = {"plain": {}, "virtual_steps": {"physical_batch_size": 1}, "augmult": {"augmult": 3},
           "automatic_clipping": {"clipping": "automatic"}}


def _records() -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """N - 1 records everybody knows, and two candidates for the last one."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(N - 1, 6, generator=g), torch.randint(0, 3, (N - 1,), generator=g)
    candidates = {"a": (torch.full((6,), 2.0), torch.tensor(0)), "b": (torch.full((6,), -2.0), torch.tensor(2))}
    return x, y, candidates


def _initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(PUBLIC_SEED)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).state_dict()


def _fit(privacy: ClientPrivacy, weights: dict[str, torch.Tensor], record: tuple[torch.Tensor, torch.Tensor],
         mode: str = "hooks", seed: int = PUBLIC_SEED) -> dict[str, torch.Tensor]:
    """One local fit as a client runs it: torch reseeded from the public seed, the loader's generator too."""
    torch.manual_seed(seed)  # what seed_all(client_seed(...)) does before every fit
    x, y, _ = _records()
    x, y = torch.cat([x, record[0][None]]), torch.cat([y, record[1][None]])
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    model.load_state_dict(weights)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    views = privacy.settings.augmult
    with privacy.attach(model, opt, loader) as private:
        for _ in range(EPOCHS):
            for xb, yb in private.loader:
                if views > 1:  # K "augmented" views of each record (deterministic stand-ins)
                    xb = torch.stack([xb * s for s in (1.0, -1.0, 0.5)][:views], 1)
                private.step(xb, yb)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _client(mode: str = "hooks", recipe: str = "plain") -> ClientPrivacy:
    settings = dataclasses.replace(SETTINGS, **RECIPES[recipe])
    return ClientPrivacy(settings, num_samples=N, steps_per_epoch=N // BATCH, total_steps=EPOCHS * N // BATCH,
                         grad_sample_mode=mode)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _replay(weights: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], mode: str,
            client_state: dict | None, recipe: str = "plain") -> set[str]:
    """The attacker: replays the fit for each candidate with the same code and public seed, and a
    ClientPrivacy of its own (given the client's state only when the secret leaked); returns the matches."""
    _, _, candidates = _records()
    matches = set()
    for name, record in candidates.items():
        mine = _client(mode, recipe)
        if client_state is not None:
            mine.load_state_dict(client_state)
        if _same(_fit(mine, weights, record, mode), observed):
            matches.add(name)
    return matches


@pytest.mark.parametrize(("mode", "recipe"), [("hooks", "plain"), ("ghost", "plain"), ("hooks", "virtual_steps"),
                                             ("ghost", "virtual_steps"), ("hooks", "augmult"),
                                             ("hooks", "automatic_clipping"), ("ghost", "automatic_clipping")])
def test_replay_attack_fails_without_the_secret_and_succeeds_with_it(mode: str, recipe: str) -> None:
    weights = _initial_weights()
    _, _, candidates = _records()
    client = _client(mode, recipe)
    before = client.state_dict()  # what a leak of the client's own checkpoint would give away
    observed = _fit(client, weights, candidates["a"], mode)  # the update the server sees
    assert not _same(observed, weights)

    assert _replay(weights, observed, mode, client_state=None, recipe=recipe) == set()  # the secret stops it
    # the same attack with the secret known: exactly the true record reproduces the update (with 20 steps at
    # q = 1/2 the record is in some batch but with probability 2^-20, so the other candidate's update differs)
    assert _replay(weights, observed, mode, client_state=before, recipe=recipe) == {"a"}


def test_secret_is_not_a_function_of_the_public_seed() -> None:
    torch.manual_seed(PUBLIC_SEED)
    one = _client()
    torch.manual_seed(PUBLIC_SEED)
    two = _client()
    assert one.state_dict()["rng"]["secret"] != two.state_dict()["rng"]["secret"]
    report = json.dumps(one.report())
    assert one.state_dict()["rng"]["secret"] not in report  # privacy.json never carries it
    weights, (_, _, candidates) = _initial_weights(), _records()
    assert not _same(_fit(one, weights, candidates["a"]), _fit(two, weights, candidates["a"]))


def test_fit_leaves_the_public_random_streams_alone() -> None:
    """Noise and masks come from the secret generators only: the global torch stream is untouched by a DP fit
    (dropout, augmentation and the data order keep their public, reproducible streams)."""
    x, y, _ = _records()
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(PUBLIC_SEED)
    before = torch.get_rng_state()
    with _client().attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader) as private:
        for _ in range(3):
            for xb, yb in private.loader:
                private.step(xb, yb)
    assert torch.equal(torch.get_rng_state(), before)


def test_cpu_generator_state_uses_the_whole_secret() -> None:
    """torch keeps only 32 bits of a CPU manual_seed; ClientSecret sets the full Mersenne-Twister state, so
    secrets equal in their low 64 bits still give different streams."""
    low = 0x1234_5678_9ABC_DEF0
    a, b = ClientSecret(low), ClientSecret(low | (1 << 100))
    ga, gb = a.generator("noise"), b.generator("noise")
    assert ga.initial_seed() == 0  # the secret is not exposed through initial_seed()
    assert not torch.equal(torch.randn(8, generator=ga), torch.randn(8, generator=gb))
    ga2 = ClientSecret(low).generator("noise")
    assert torch.equal(torch.randn(8, generator=ga2), torch.randn(8, generator=ClientSecret(low).generator("noise")))
    sampling = ClientSecret(low).generator("sampling")
    assert not torch.equal(torch.rand(8, generator=sampling), torch.rand(8, generator=ClientSecret(low).generator(
        "noise")))  # purposes get independent streams


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_resume_from_state_dict_is_bit_identical(mode: str) -> None:
    weights, (_, _, candidates) = _initial_weights(), _records()
    record = candidates["b"]
    client = _client(mode)
    after_one = _fit(client, weights, record, mode, seed=1)
    buf = io.BytesIO()
    torch.save(client.state_dict(), buf)  # a round checkpoint, read back as fl/loop.py does
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    json.dumps(saved)  # plain containers and strings only
    straight = _fit(client, after_one, record, mode, seed=2)

    resumed = _client(mode)
    resumed.load_state_dict(saved)
    assert _same(_fit(resumed, after_one, record, mode, seed=2), straight)
    assert resumed.steps == client.steps

    fresh = _client(mode)  # a new secret: the same round draws other noise and batches
    fresh.accountant.load_state_dict(saved["accountant"])
    assert not _same(_fit(fresh, after_one, record, mode, seed=2), straight)


def test_restore_after_attach_continues_the_restored_stream() -> None:
    """Lightning may restore the callback's state after the generators were first used: set_state in place."""
    src = ClientSecret()
    gen = src.generator("noise")
    torch.randn(5, generator=gen)
    state = src.state_dict()
    expected = torch.randn(5, generator=gen)
    dst = ClientSecret()
    held = dst.generator("noise")  # e.g. PrivateTraining already holds it
    dst.load_state_dict(state)
    assert torch.equal(torch.randn(5, generator=held), expected)

    later = ClientSecret()  # restored before the generator is made: it starts at the restored position
    later.load_state_dict(state)
    assert later.state_dict() == state  # a checkpoint taken before any use keeps the positions
    assert torch.equal(torch.randn(5, generator=later.generator("noise")), expected)


def test_secure_mode_fails_clearly_without_torchcsprng() -> None:
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng is installed")
    with pytest.raises(BloodflError, match="torchcsprng") as err:
        DPSettings(noise_multiplier=1.0, secure_mode=True)
    assert "\n" not in str(err.value)
    with pytest.raises(BloodflError, match="torchcsprng"):
        DPSettings.from_config({"enabled": True, "noise_multiplier": 1.0, "secure_mode": True})
    assert DPSettings.from_config({"enabled": True, "noise_multiplier": 1.0}).secure_mode is False


@pytest.mark.parametrize("precision", [None, 32, "32", "32-true", "64-true", 64])
def test_full_precision_is_accepted(precision: object) -> None:
    check_precision(precision)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true", "bf16-true", 16, "16", "bf16",
                                       "transformer-engine"])
def test_reduced_precision_is_refused(precision: object) -> None:
    with pytest.raises(BloodflError, match="trainer.precision=32-true") as err:
        check_precision(precision)
    assert "\n" not in str(err.value)
