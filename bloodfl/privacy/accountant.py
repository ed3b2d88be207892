"""Privacy accounting for a whole run: one accountant per client, noise calibrated for every step of every round.

Re-creating Opacus' PrivacyEngine each federated round and reporting that round's ε under-reports the privacy
spent (the rounds compose). Here each client owns one ``PrivacyAccountant`` for the run; its history (noise
multiplier, sample rate, steps) is saved in round checkpoints so a resumed run continues the same sum.
"""

from __future__ import annotations

import math
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from bloodfl.errors import BloodflError

MECHANISMS = ("rdp", "prv")


def default_delta(num_samples: int) -> float:
    """δ for a training set of ``num_samples``: at most 1e-5 and always 10x below 1/n.

    δ is the chance that the ε guarantee fails outright; at δ ≥ 1/n a mechanism could publish one whole
    record and still be "(ε, δ)-private", so δ must sit well below 1/n.
    """
    if num_samples < 1:
        raise BloodflError("a DP client has no training samples; check the data split")
    return min(1e-5, 0.1 / num_samples)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                    mechanism: str = "rdp") -> float:
    """Noise multiplier σ such that ``total_steps`` Poisson-sampled steps at ``sample_rate`` spend at most
    ``target_epsilon`` (and within 0.01 of it) at ``delta``."""
    _check_mechanism(mechanism)
    if target_epsilon <= 0:
        raise BloodflError(f"dp.target_epsilon must be > 0, got {target_epsilon}")
    if total_steps < 1:
        raise BloodflError(f"DP training plans {total_steps} steps; nothing to calibrate the noise for")
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=total_steps, accountant=mechanism,
                                          epsilon_tolerance=0.01))
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise BloodflError(f"dp.target_epsilon={target_epsilon} cannot be met in {total_steps} steps at "
                           f"sample rate {sample_rate:.4g} (noise would exceed 1e6); raise the target or train "
                           "fewer steps") from exc


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise BloodflError(f"dp.accountant must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")


class PrivacyAccountant:
    """Opacus accountant (RDP or PRV) that lives for a whole run and can be checkpointed."""

    def __init__(self, mechanism: str = "rdp") -> None:
        _check_mechanism(mechanism)
        self.opacus = create_accountant(mechanism=mechanism)  # what DPOptimizer's step hook updates

    @property
    def mechanism(self) -> str:
        return self.opacus.mechanism()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self.opacus.history)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.opacus.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps (what DPOptimizer's hook does once per optimizer step)."""
        for _ in range(steps):
            self.opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before the first step)."""
        if not self.opacus.history:
            return 0.0
        eps = float(self.opacus.get_epsilon(delta=delta))
        return eps if math.isfinite(eps) else float("inf")

    def state_dict(self) -> dict[str, Any]:
        # plain lists so the state survives torch.save(weights_only=True) and JSON
        return {"mechanism": self.mechanism, "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise BloodflError(f"checkpoint's privacy accountant is {state.get('mechanism')!r} but dp.accountant="
                               f"{self.mechanism}; resume with the same dp settings")
        self.opacus.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
