"""The replay attack against whole runs: whoever knows a DP run's full config (public seed included) and its data
replays it; if that reproduced the released model bit for bit, one record's membership could be decided by
exact match. The client secret must make the replay fail — and the same replay must succeed once the secret is
known, which shows the attack is real and the secret is what stops it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from bloodfl.fl.run import federate
from bloodfl.training.run import train
from tests.conftest import FAST, compose_cfg
from tests.test_fl_run import FL_FAST, final_weights

pytestmark = pytest.mark.usefixtures("one_thread")

DP = ["dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=0.5"]


def _last(out: Path) -> dict[str, torch.Tensor]:
    ckpt = next((out / "checkpoints").glob("last.ckpt"))
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count(7)
    monkeypatch.setattr("bloodfl.privacy.engine.new_secret", lambda: next(counter))


def test_centralized_dp_run_cannot_be_replayed_from_its_config(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FAST, "callbacks=default", "callbacks.progress_bar=null", "trainer.max_epochs=2", *DP]
    train(compose_cfg(args, tmp_path / "released"))
    train(compose_cfg(args, tmp_path / "replayed"))  # the attacker: same config, same data, same public seed
    assert not _same(_last(tmp_path / "released"), _last(tmp_path / "replayed"))

    _known_secrets(monkeypatch)  # now the attacker also knows the secret: the replay is exact
    train(compose_cfg(args, tmp_path / "released_known"))
    _known_secrets(monkeypatch)
    train(compose_cfg(args, tmp_path / "replayed_known"))
    assert _same(_last(tmp_path / "released_known"), _last(tmp_path / "replayed_known"))


def test_federated_dp_run_cannot_be_replayed_from_its_config(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FL_FAST, "fl.rounds=1", *DP]
    federate(compose_cfg(args, tmp_path / "released", "federate"))
    federate(compose_cfg(args, tmp_path / "replayed", "federate"))
    assert not _same(final_weights(tmp_path / "released"), final_weights(tmp_path / "replayed"))

    _known_secrets(monkeypatch)
    federate(compose_cfg(args, tmp_path / "released_known", "federate"))
    _known_secrets(monkeypatch)
    federate(compose_cfg(args, tmp_path / "replayed_known", "federate"))
    assert _same(final_weights(tmp_path / "released_known"), final_weights(tmp_path / "replayed_known"))
