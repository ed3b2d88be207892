"""Server strategies on known tensors: FedAvg's weighted mean, integer buffers, FedProx, FedAdam/FedYogi."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bloodfl.errors import BloodflError
from bloodfl.fl.strategy import FedAdam, FedAvg, FedProx, FedYogi, FitResult, weighted_average


def result(w: float, b: list[float], steps: int, n: int) -> FitResult:
    return FitResult({"w": torch.tensor([[w, 2 * w]]), "bn.running_mean": torch.tensor(b),
                      "bn.num_batches_tracked": torch.tensor(steps)}, n)


def test_fedavg_equals_hand_computed_weighted_mean() -> None:
    results = [result(1.0, [0.0, 4.0], 10, 10), result(4.0, [2.0, 0.0], 13, 30)]
    out = FedAvg().aggregate_fit(1, {}, results)
    # (10 * 1 + 30 * 4) / 40 = 3.25; running mean (10*[0,4] + 30*[2,0]) / 40 = [1.5, 1.0]
    assert torch.equal(out["w"], torch.tensor([[3.25, 6.5]]))
    assert torch.equal(out["bn.running_mean"], torch.tensor([1.5, 1.0]))
    # integer buffer: (10 * 10 + 30 * 13) / 40 = 12.25 -> 12, still an integer tensor
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 12
    assert out["w"].dtype == torch.float32


def test_fedavg_one_client_is_identity_and_does_not_alias() -> None:
    w = {"a": torch.randn(3, 4), "n": torch.tensor(7), "flag": torch.tensor(True), "h": torch.randn(2).half()}
    out = weighted_average([FitResult(w, 17)])
    for k in w:
        assert torch.equal(out[k], w[k]) and out[k].dtype == w[k].dtype
        assert out[k].data_ptr() != w[k].data_ptr()


def test_fedavg_float64_accumulation_is_exact_for_equal_models() -> None:
    w = torch.randn(1000)
    out = weighted_average([FitResult({"w": w.clone()}, n) for n in (3, 7, 11)])
    assert torch.equal(out["w"], w)


def test_mismatched_or_empty_results_are_rejected() -> None:
    with pytest.raises(ValueError):
        weighted_average([])
    with pytest.raises(ValueError):
        weighted_average([FitResult({"a": torch.zeros(1)}, 1), FitResult({"b": torch.zeros(1)}, 1)])


def test_fedprox_sends_mu_and_averages() -> None:
    s = FedProx(mu=0.3)
    assert isinstance(s, FedProx) and s.configure_fit(1) == {"proximal_mu": 0.3}
    assert FedAvg().configure_fit(1) == {}
    out = s.aggregate_fit(1, {}, [result(1.0, [0, 0], 1, 1), result(3.0, [0, 0], 1, 1)])
    assert torch.equal(out["w"], torch.tensor([[2.0, 4.0]]))
    with pytest.raises(BloodflError):
        FedProx(-1)


def test_fedadam_first_step_and_buffers() -> None:
    glob = {"w": torch.zeros(1, 2), "bn.running_mean": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    s = FedAdam(eta=0.5, tau=0.0)
    s.initialize(glob, param_names=["w"])
    out = s.aggregate_fit(1, glob, [result(1.0, [2.0, 2.0], 4, 1)])
    # m = 0.1 d, v = 0.01 d^2 -> step = eta * sign(d) on the parameters
    assert torch.allclose(out["w"], torch.tensor([[0.5, 0.5]]))
    # buffers are not stepped: plain average
    assert torch.equal(out["bn.running_mean"], torch.tensor([2.0, 2.0]))
    state = s.state_dict()
    s2 = FedAdam(eta=0.5, tau=0.0)
    s2.initialize(glob, param_names=["w"])
    s2.load_state_dict(state)
    nxt = [result(-1.0, [0.0, 0.0], 1, 1)]
    assert torch.equal(s.aggregate_fit(2, out, nxt)["w"], s2.aggregate_fit(2, out, nxt)["w"])


def test_fedyogi_second_moment() -> None:
    s = FedYogi(eta=1.0, beta_2=0.5, tau=0.0)
    v = s._second_moment(torch.tensor([0.0, 10.0]), torch.tensor([4.0, 4.0]))
    # v - (1 - b2) d^2 sign(v - d^2): 0 - 0.5*4*(-1) = 2; 10 - 0.5*4*(+1) = 8
    assert torch.equal(v, torch.tensor([2.0, 8.0]))


def test_unknown_strategy_lists_the_valid_ones(tmp_path: Path) -> None:
    from bloodfl.compose import Root
    from tests.conftest import compose_cfg

    with pytest.raises(BloodflError, match="unknown fl.strategy 'scaffold'; valid: fedavg, fedprox, fedadam, fedyogi"):
        Root(compose_cfg(["fl.strategy=scaffold"], tmp_path, "federate")).strategy()
