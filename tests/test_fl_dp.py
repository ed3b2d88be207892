"""Federated DP-SGD: one accountant per client, epsilon per round, privacy.json, exact resume with accountants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bloodfl.fl.client import FLClient
from bloodfl.fl.run import federate
from tests.conftest import compose_cfg
from tests.test_fl_run import FL_FAST, final_weights, rounds


def test_dp_clients_keep_accountants_across_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FL_FAST, "dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=1.0"]
    whole = tmp_path / "whole"
    metrics = federate(compose_cfg(args, whole, "federate"))
    eps = [[float(r[f"client{c}/epsilon"]) for r in rounds(whole)] for c in (0, 1)]
    assert all(0 < e[0] < e[1] for e in eps), eps  # cumulative over rounds
    privacy = json.loads((whole / "privacy.json").read_text())
    assert len(privacy["clients"]) == 2
    assert metrics["dp/epsilon_max"] == pytest.approx(max(e[-1] for e in eps))

    broken = tmp_path / "broken"
    real_fit = FLClient.fit

    def fit_then_die(self: FLClient, weights: dict, server_round: int, config: dict) -> object:
        if server_round == 2:
            raise KeyboardInterrupt
        return real_fit(self, weights, server_round, config)

    monkeypatch.setattr(FLClient, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        federate(compose_cfg(args, broken, "federate"))
    monkeypatch.setattr(FLClient, "fit", real_fit)
    federate(compose_cfg([*args, "fl.resume=true"], broken, "federate"))
    a, b = final_weights(whole), final_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((broken / "privacy.json").read_text())
    assert [c["epsilon"] for c in again["clients"]] == [c["epsilon"] for c in privacy["clients"]]
    assert [c["steps"] for c in again["clients"]] == [c["steps"] for c in privacy["clients"]]
