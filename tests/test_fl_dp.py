"""Federated DP-SGD: one accountant per client, epsilon per round, privacy.json, exact resume with accountants
and client secrets, and nothing but the update crossing to the server."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from bloodfl.fl.client import FLClient
from bloodfl.fl.run import federate
from tests.conftest import compose_cfg
from tests.test_fl_run import FL_FAST, final_weights, rounds


def _fixed_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two separate runs get different client secrets by design; to compare them bit for bit, give both the
    same secrets (the resumed run must then restore its clients' secrets from the checkpoint)."""
    counter = itertools.count(1)
    monkeypatch.setattr("bloodfl.privacy.engine.new_secret", lambda: next(counter))


def test_dp_clients_keep_accountants_across_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FL_FAST, "dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=1.0"]
    whole = tmp_path / "whole"
    _fixed_secrets(monkeypatch)
    metrics = federate(compose_cfg(args, whole, "federate"))
    eps = [[float(r[f"client{c}/epsilon"]) for r in rounds(whole)] for c in (0, 1)]
    assert all(0 < e[0] < e[1] for e in eps), eps  # cumulative over rounds
    privacy = json.loads((whole / "privacy.json").read_text())
    assert len(privacy["clients"]) == 2
    assert metrics["dp/epsilon"] == pytest.approx(max(e[-1] for e in eps))

    broken = tmp_path / "broken"
    real_fit = FLClient.fit

    def fit_then_die(self: FLClient, weights: dict, server_round: int, config: dict) -> object:
        if server_round == 2 and self.cid == 1:  # client 0 has finished (and logged) round 2 already
            raise KeyboardInterrupt
        return real_fit(self, weights, server_round, config)

    monkeypatch.setattr(FLClient, "fit", fit_then_die)
    _fixed_secrets(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        federate(compose_cfg(args, broken, "federate"))
    monkeypatch.setattr(FLClient, "fit", real_fit)
    monkeypatch.setattr("bloodfl.privacy.engine.new_secret", lambda: 10**6)  # fresh secrets must be replaced
    federate(compose_cfg([*args, "fl.resume=true"], broken, "federate"))
    a, b = final_weights(whole), final_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((broken / "privacy.json").read_text())
    assert [c["epsilon"] for c in again["clients"]] == [c["epsilon"] for c in privacy["clients"]]
    assert [c["steps"] for c in again["clients"]] == [c["steps"] for c in privacy["clients"]]
    for c in (0, 1):  # each client's own log: one row per round, the repeated round's row replaced
        logged = (broken / "clients" / f"client{c}.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in logged] == ["round", *map(str, range(1, len(eps[c]) + 1))]


def test_only_the_update_leaves_a_private_client(tmp_path: Path) -> None:
    """Under dp=true what crosses to the server is the weights and a count of 1 (uniform FedAvg weights): no local
    train/val metric and no example count; rounds.csv holds only what the server knows; each client keeps its
    own metrics in its own log."""
    released: list[object] = []

    def spy(client: FLClient) -> None:
        real = client.fit

        def fit(*args: object, **kwargs: object) -> object:
            res = real(*args, **kwargs)
            released.append(res)
            return res

        client.fit = fit  # type: ignore[method-assign]

    args = [*FL_FAST, "dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=1.0"]
    federate(compose_cfg(args, tmp_path, "federate"), client_hook=spy)
    assert len(released) == 4
    for res in released:
        assert res.metrics == {} and res.num_examples == 1  # type: ignore[attr-defined]
    header = (tmp_path / "rounds.csv").read_text().splitlines()[0].split(",")
    assert not [c for c in header if c.startswith("client") and not c.endswith("/epsilon") and c != "clients"], header
    local = (tmp_path / "clients" / "client0.csv").read_text().splitlines()
    assert local[0].startswith("round,train/loss") and len(local) == 3


def test_a_hook_cannot_switch_dp_off(tmp_path: Path) -> None:
    from bloodfl.errors import BloodflError

    def forget_privacy(client: FLClient) -> None:
        client.module.privacy = None

    args = [*FL_FAST, "dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=1.0"]
    with pytest.raises(BloodflError, match="without its privacy accountant"):
        federate(compose_cfg(args, tmp_path, "federate"), client_hook=forget_privacy)


def test_dp_refuses_mixed_precision_and_weighting_is_explicit(tmp_path: Path) -> None:
    from bloodfl.compose import Root
    from bloodfl.errors import BloodflError

    root = Root(compose_cfg([*FL_FAST, "dp='true'", "trainer.precision=bf16-mixed"], tmp_path, "federate"))
    with pytest.raises(BloodflError, match="trainer.precision=32-true"):
        root.trainer_factory()
    assert not root.release_counts()  # auto under DP: uniform weights, counts stay with the clients
    assert "uniform" in root.dp_record()["fl.weighting"]
    declared = Root(compose_cfg([*FL_FAST, "dp='true'", "fl.weighting=examples"], tmp_path, "federate"))
    assert declared.release_counts() and "not protected" in declared.dp_record()["fl.weighting"]
    assert Root(compose_cfg(FL_FAST, tmp_path, "federate")).release_counts()


def test_federate_refuses_fine_tuning_schemes_it_would_ignore(tmp_path: Path) -> None:
    from bloodfl.errors import BloodflError

    with pytest.raises(BloodflError, match="finetune=frozen/two_phase is not supported by federate.py"):
        federate(compose_cfg([*FL_FAST, "finetune=frozen"], tmp_path, "federate"))
