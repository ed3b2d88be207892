"""DP-SGD training steps: Opacus per-sample clipping, Gaussian noise and Poisson sampling, accounted per client.

Usage (one ``ClientPrivacy`` per client for the whole run; one ``PrivateTraining`` per local fit)::

    model, changes, mode = prepare_model(model, (3, 64, 64), settings.grad_sample_mode)  # before the optimizer
    privacy = ClientPrivacy(settings, num_samples=len(train_set), steps_per_epoch=len(loader),
                            total_steps=rounds * epochs * len(loader), grad_sample_mode=mode)
    with privacy.attach(model, optimizer, loader, criterion) as private:      # every round
        for x, y in private.loader:
            loss, logits = private.step(x, y)
    privacy.epsilon()                       # cumulative over all rounds so far

The fastest correct mode is ghost clipping (per-sample gradient norms without storing per-sample gradients,
then one backward of the loss re-weighted by the clipping factors), with bloodfl's convolution norm rule
(norms.py) and an input-only first backward: resnet18 / mobilenetv2 at 64 px train 4-7x faster than with
stock Opacus in its best mode (bench/bench_dp.py, docs/privacy.md). ``grad_sample_mode=auto`` uses it unless
the dry run fails, then per-sample hooks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from bloodfl.errors import BloodflError
from bloodfl.privacy.accountant import MECHANISMS, PrivacyAccountant, calibrate_noise, default_delta
from bloodfl.privacy.compat import check_private, make_dp_compatible
from bloodfl.privacy.norms import ghost_norm_samplers

MODES = ("auto", "ghost", "hooks")

# Opacus' hooks see module outputs only (images do not require grad); PyTorch says so on every step
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                        "to module outputs", category=UserWarning)


@dataclass(frozen=True)
class DPSettings:
    """The ``dp`` config group (conf/dp/true.yaml). Exactly one of noise_multiplier / target_epsilon."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None  # None: default_delta(n) per client
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise BloodflError("with dp=true set exactly one of dp.noise_multiplier (e.g. 1.0) or "
                               "dp.target_epsilon (e.g. 8); set the other to null")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise BloodflError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise BloodflError(f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise BloodflError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in MECHANISMS:
            raise BloodflError(f"dp.accountant must be one of {', '.join(MECHANISMS)}, got {self.accountant!r}")
        if self.grad_sample_mode not in MODES:
            raise BloodflError(f"dp.grad_sample_mode must be one of {', '.join(MODES)}, "
                               f"got {self.grad_sample_mode!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> DPSettings | None:
        """Settings from the ``dp`` config node, or None when DP is off (``dp=false`` or no node)."""
        if cfg is None or not cfg.get("enabled", False):
            return None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known - {"enabled"})
        if unknown:
            raise BloodflError(f"unknown dp setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**{k: cfg[k] for k in known if k in cfg})


def prepare_model(model: nn.Module, input_shape: tuple[int, ...],
                  grad_sample_mode: str = "auto") -> tuple[nn.Module, list[str], str]:
    """Make ``model`` DP-compatible (in place), prove it on a dry run, and resolve ``auto`` to a mode.

    Call before creating the optimizer: layers are replaced. Returns (model, changes, mode)."""
    model, changes = make_dp_compatible(model)
    if grad_sample_mode != "auto":
        check_private(model, input_shape, grad_sample_mode)
        return model, changes, grad_sample_mode
    try:
        check_private(model, input_shape, "ghost")
        return model, changes, "ghost"
    except BloodflError as ghost_error:
        try:
            check_private(model, input_shape, "hooks")
        except BloodflError:
            raise ghost_error from None
        return model, [*changes, f"ghost clipping unavailable ({ghost_error}); using per-sample hooks"], "hooks"


class ClientPrivacy:
    """One client's (or the centralized trainer's) DP state for the whole run: σ, δ, sample rate, accountant."""

    def __init__(self, settings: DPSettings, num_samples: int, steps_per_epoch: int, total_steps: int,
                 grad_sample_mode: str = "ghost", name: str = "client") -> None:
        if steps_per_epoch < 1:
            raise BloodflError(f"{name}: DP training needs at least one batch per epoch")
        self.settings = settings
        self.name = name
        self.num_samples = num_samples
        self.sample_rate = 1.0 / steps_per_epoch  # what Opacus' DPDataLoader uses: 1 / len(loader)
        self.planned_steps = total_steps
        self.grad_sample_mode = "ghost" if grad_sample_mode == "auto" else grad_sample_mode
        self.delta = settings.delta if settings.delta is not None else default_delta(num_samples)
        if self.delta >= 1.0 / num_samples:
            raise BloodflError(f"{name}: dp.delta={self.delta:g} is not below 1/n = 1/{num_samples}; a delta "
                               "that large allows leaking a whole record; use dp.delta=null (auto)")
        if settings.noise_multiplier is not None:
            self.noise_multiplier = float(settings.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise(settings.target_epsilon, self.delta, self.sample_rate,
                                                    total_steps, settings.accountant)
        self.accountant = PrivacyAccountant(settings.accountant)

    @property
    def steps(self) -> int:
        return self.accountant.steps

    def epsilon(self) -> float:
        """Cumulative ε over every DP step this client took in the run."""
        return self.accountant.epsilon(self.delta)

    def report(self) -> dict[str, Any]:
        """What privacy.json records for this client."""
        return {"client": self.name, "epsilon": self.epsilon(), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "planned_steps": self.planned_steps, "num_samples": self.num_samples,
                "grad_sample_mode": self.grad_sample_mode, **{f"dp.{k}": v for k, v in asdict(self.settings).items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if not math.isclose(state[key], getattr(self, key), rel_tol=1e-9):
                hint = ("dp.target_epsilon fixes the noise for the planned number of steps, so the rounds and "
                        f"epochs cannot change; to go on past the plan use dp.target_epsilon=null "
                        f"dp.noise_multiplier={state[key]!r}") if key == "noise_multiplier" and \
                    self.settings.target_epsilon is not None else "resume with the same dp, data and batch settings"
                raise BloodflError(f"{self.name}: the checkpoint was trained with {key}={state[key]:.6g} but this run "
                                   f"has {getattr(self, key):.6g}; {hint}")
        self.accountant.load_state_dict(state["accountant"])

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
               criterion: nn.Module | None = None) -> PrivateTraining:
        """DP versions of optimizer, loader and loss for one local fit; steps are added to this accountant."""
        return PrivateTraining(self, model, optimizer, data_loader, criterion or nn.CrossEntropyLoss())


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PrivateTraining:
    """Opacus objects for one fit: hooks on the (unwrapped) model, DPOptimizer, Poisson DPDataLoader."""

    def __init__(self, privacy: ClientPrivacy, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data_loader: DataLoader, criterion: nn.Module) -> None:
        if not math.isclose(1.0 / len(data_loader), privacy.sample_rate, rel_tol=1e-9):
            raise BloodflError(f"{privacy.name}: the training loader has {len(data_loader)} batches per epoch but "
                               f"the DP plan assumed {round(1 / privacy.sample_rate)}; build ClientPrivacy with "
                               "steps_per_epoch=len(loader)")
        self.privacy = privacy
        self.model = model
        self.mode = privacy.grad_sample_mode
        engine = PrivacyEngine(accountant=privacy.accountant.mechanism)
        engine.accountant = privacy.accountant.opacus  # steps land in the run-long accountant
        with warnings.catch_warnings(), _quiet("opacus.data_loader"):
            # documented in docs/privacy.md: secure RNG is off; drop_last is meaningless under Poisson sampling
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            out = engine.make_private(module=model, optimizer=optimizer, criterion=criterion,
                                      data_loader=data_loader, noise_multiplier=privacy.noise_multiplier,
                                      max_grad_norm=privacy.settings.max_grad_norm, poisson_sampling=True,
                                      grad_sample_mode=self.mode, wrap_model=False)
        if self.mode == "ghost":
            self.hooks, self.optimizer, _, self.loader = out  # Opacus' DP loss is replaced by _ghost_backward
            self.hooks.NORM_SAMPLERS = ghost_norm_samplers()  # exact conv norms, ~4x faster (norms.py)
        else:
            self.hooks, self.optimizer, self.loader = out
        self.criterion = criterion
        self.per_sample_loss = copy.copy(criterion)
        self.per_sample_loss.reduction = "none"
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._all_trainable = all(p.requires_grad for p in model.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One DP-SGD step on a Poisson batch; returns (mean loss, logits), both detached (None if empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        if x.shape[0] == 0:  # Poisson sampling can draw nobody: still a DP step (noise only), still accounted
            self._noise_only_step()
            return None, None
        if self.mode == "ghost":
            loss, logits = self._ghost_backward(x, y)
        else:
            logits = self.model(x)
            loss = self.criterion(logits, y)
            loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def _ghost_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ghost clipping: a backward that only feeds Opacus' hooks the per-sample gradient norms, then the
        backward of the loss re-weighted by each sample's clipping factor (= the sum of clipped gradients).

        Unlike Opacus' DPLossFastGradientClipping, the first pass asks autograd for the gradient of the input
        image only, so no weight gradient is computed and then thrown away (10-15% faster per step). With frozen
        layers that shortcut would backpropagate through them for nothing: then both passes are full ones."""
        input_pass = self._all_trainable
        x = x.detach().requires_grad_(input_pass)
        logits = self.model(x)
        per_sample = self.per_sample_loss(logits, y)
        loss = per_sample.mean()  # loss_reduction="mean", as the hooks and the DPOptimizer expect
        if input_pass:
            torch.autograd.grad(loss, x, retain_graph=True)
        else:
            loss.backward(retain_graph=True)
            self.optimizer.zero_grad(set_to_none=True)  # unclipped gradients: never let them reach the step
        coeff = self.hooks.get_clipping_coef()
        for p in self._trainable:  # a norm not refreshed next step must fail, not be reused silently
            p._norm_sample = None
        self.hooks.disable_hooks()
        try:
            (coeff.to(per_sample.dtype) * per_sample).sum().backward()
        finally:
            self.hooks.enable_hooks()
        return loss, logits

    def _noise_only_step(self) -> None:
        for p in self.optimizer.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def close(self) -> None:
        """Remove Opacus hooks and attributes; the model is a plain module again."""
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.cleanup()

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
