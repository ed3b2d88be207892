"""The server side of federated learning: strategies that turn client updates into the next global model.

This module sees only weights and counts (a :class:`FitResult` per client), never images or labels: it does
not import any data code, so a network backend (e.g. Flower) can call it unchanged. The split follows
Flower: ``configure_fit`` says what the clients get besides the weights (e.g. FedProx' ``proximal_mu``),
``aggregate_fit`` turns their results into the new global weights.

Weights are a state-dict-like ``dict[str, Tensor]`` of CPU tensors: parameters *and* buffers.
Aggregation rules by dtype (FedAvg, McMahan et al. 2017, weighted by each client's training examples):
- floating point (parameters, BatchNorm running mean/var): weighted mean, accumulated in float64;
- integer (BatchNorm ``num_batches_tracked``): weighted mean rounded to the nearest integer. Every client
  starts from the global count and adds its own steps, so this is the global count plus the weighted mean
  of the clients' steps: the step count of the averaged model in FedAvg's own sense (it only matters for
  BatchNorm with ``momentum=None``), and with one client exactly that client's count;
- anything else (bool): taken from the client with the most examples.

Server optimizers (FedOpt, Reddi et al. 2021) treat ``average - global`` of the trainable parameters as a
pseudo-gradient and step on it; buffers keep the plain average (an Adam step on a running variance could
make it negative). FedAdam and FedYogi differ only in the second-moment update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bloodfl.errors import BloodflError

Weights = dict[str, Tensor]


@dataclass
class FitResult:
    """What one client returns to the server: its weights, how many images it trained on, its metrics."""

    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def weights_of(module: torch.nn.Module) -> Weights:
    """A detached CPU copy of a module's state dict (what crosses the client/server boundary)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def weighted_average(results: Sequence[FitResult]) -> Weights:
    """FedAvg's weighted mean of the clients' weights (rules by dtype in the module docstring)."""
    if not results:
        raise ValueError("no client results to aggregate")
    total = sum(r.num_examples for r in results)
    if total <= 0:
        raise ValueError("clients reported no training examples")
    keys = results[0].weights.keys()
    for r in results[1:]:
        if r.weights.keys() != keys:
            raise ValueError("clients returned different weight names")
    largest = max(results, key=lambda r: r.num_examples)
    out: Weights = {}
    for k in keys:
        ref = results[0].weights[k]
        if ref.is_floating_point() or ref.is_complex() or _is_integer(ref):
            acc_dtype = torch.complex128 if ref.is_complex() else torch.float64
            acc = torch.zeros(ref.shape, dtype=acc_dtype)
            for r in results:
                acc += r.weights[k].to(acc_dtype) * r.num_examples
            acc /= total
            out[k] = (acc.round() if _is_integer(ref) else acc).to(ref.dtype)
        else:
            out[k] = largest.weights[k].clone()
    return out


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


class Strategy:
    """Flower-like server strategy. Subclasses override ``aggregate_fit`` and optionally ``configure_fit``.

    initialize: the initial global weights and which of them are trainable parameters (the rest buffers).
    state_dict/load_state_dict: the server-side state (optimizer moments) saved in every round checkpoint.
    """

    name = "base"

    def __init__(self) -> None:
        self.param_names: set[str] = set()

    def initialize(self, weights: Weights, param_names: Sequence[str] | None = None) -> None:
        self.param_names = set(weights) if param_names is None else set(param_names)

    def configure_fit(self, server_round: int) -> dict[str, Any]:
        """The per-round instructions for every sampled client (besides the weights)."""
        return {}

    def aggregate_fit(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FedAvg(Strategy):
    """The new global model is the example-weighted mean of the clients' models."""

    name = "fedavg"

    def aggregate_fit(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        return weighted_average(results)


class FedProx(FedAvg):
    """FedAvg on the server; clients add ``mu/2 * ||w - w_global||^2`` to their loss (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if mu < 0:
            raise BloodflError(f"fl.mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def configure_fit(self, server_round: int) -> dict[str, Any]:
        return {"proximal_mu": self.mu}


class FedOpt(FedAvg):
    """Server optimizer on the pseudo-gradient ``delta = average - global`` of the trainable parameters.

    Subclasses define ``_second_moment``. The update is Reddi et al.'s Algorithm 2 (no bias correction; Flower's
    FedAdam adds one); defaults follow Flower (FedAdam: eta 0.1, betas 0.9/0.99, tau 1e-9). eta is a server
    learning rate on a pseudo-gradient: the first step moves every parameter by about eta, so with small
    models or small client learning rates try eta 1e-3..1e-2.
    """

    default_eta = 0.1

    def __init__(self, eta: float | None = None, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-9) -> None:
        super().__init__()
        eta = self.default_eta if eta is None else eta  # fl.server_lr=null: the strategy's own default
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)
        self.m: Weights = {}
        self.v: Weights = {}

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate_fit(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        avg = weighted_average(results)
        out = dict(avg)  # buffers and non-float entries: the plain average
        for k in self.param_names:
            if not avg[k].is_floating_point():
                continue
            w = global_weights[k].to(torch.float64)
            delta = avg[k].to(torch.float64) - w
            m = self.m.get(k, torch.zeros_like(delta))
            v = self.v.get(k, torch.zeros_like(delta))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            v = self._second_moment(v, delta * delta)
            self.m[k], self.v[k] = m, v
            out[k] = (w + self.eta * m / (v.sqrt() + self.tau)).to(avg[k].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


class FedAdam(FedOpt):
    name = "fedadam"

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq


class FedYogi(FedOpt):
    """Yogi's additive second moment: v grows or shrinks by at most (1 - beta_2) * delta^2 per round."""

    name = "fedyogi"

    default_eta = 0.01

    def __init__(self, eta: float | None = None, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta, beta_1, beta_2, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)
