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

The mechanism's randomness (Gaussian noise, Poisson masks) comes from the client's own secret
(``ClientSecret``, in ``ClientPrivacy.state_dict``), never from the public seed; each epoch takes exactly
``steps_per_epoch`` Poisson steps at q = 1 / steps_per_epoch (``PoissonLoader``), the numbers the plan, the
accountant and ``report()`` use. Callers must also ``check_precision(trainer precision)``: 16-bit and mixed
precision break the clip bound.

DP-SGD recipes (docs/privacy.md) are ``DPSettings`` options handled in ``PrivateTraining.step``: a logical batch
in physical chunks (virtual steps), augmentation multiplicity, automatic clipping; ``dp.ema`` is a Lightning
callback (bloodfl/training/averaging.py), outside the mechanism.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from torch import nn
from torch.utils.data import DataLoader

from bloodfl.errors import BloodflError
from bloodfl.privacy.accountant import MECHANISMS, PrivacyAccountant, calibrate_noise, default_delta
from bloodfl.privacy.compat import check_private, make_dp_compatible
from bloodfl.privacy.norms import ghost_norm_samplers, hooks_grad_samplers

MODES = ("auto", "ghost", "hooks")
log = logging.getLogger(__name__)

CLIPPINGS = ("flat", "automatic")
# dp.* keys that set other groups' defaults under dp=true (optim.lr, fl.local_epochs; conf/dp/true.yaml): not
# DP-SGD settings; privacy.json records the values the run used (Root.dp_record)
OUTSIDE_DP_SGD = ("lr", "local_epochs")
AUTOMATIC_CLIP_GAMMA = 0.01  # Bu et al. 2023's stability constant: factor C / (||g|| + gamma)

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
    secure_mode: bool = False  # Opacus' secure RNG (torchcsprng) for noise and sampling; see docs/privacy.md
    # recipes (docs/privacy.md, "DP-SGD recipes"); all off by default
    expected_batch_size: int | None = None  # logical (Poisson expected) batch; None: loader.batch_size
    physical_batch_size: int | None = None  # images per forward/backward chunk of a logical batch; None: all
    augmult: int = 0  # augmentation multiplicity K (De et al. 2022): 0 or 1 off
    ema: float | None = None  # decay of an EMA of the weights (post-processing); None off
    clipping: str = "flat"  # flat: min(1, C / ||g||); automatic: C / (||g|| + 0.01) (Bu et al. 2023)

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
        for key in ("expected_batch_size", "physical_batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BloodflError(f"dp.{key} must be a positive integer or null, got {value!r}")
        if not isinstance(self.augmult, int) or self.augmult < 0:
            raise BloodflError(f"dp.augmult must be an integer >= 0 (0 or 1: off), got {self.augmult!r}")
        if self.augmult > 1 and self.grad_sample_mode == "ghost":
            raise BloodflError("dp.augmult needs per-sample gradients of every view (averaged before clipping), "
                               "which ghost clipping never forms; use dp.grad_sample_mode=auto or hooks")
        if self.clipping not in CLIPPINGS:
            raise BloodflError(f"dp.clipping must be one of {', '.join(CLIPPINGS)}, got {self.clipping!r}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise BloodflError(f"dp.ema is the EMA decay, in (0, 1) (e.g. 0.999) or null (off); got {self.ema!r}")
        if self.secure_mode:
            check_secure_mode()

    def steps_per_epoch(self, num_samples: int, loader_steps: int) -> int:
        """Poisson steps per epoch: ``num_samples // expected_batch_size`` when the logical batch is set, else the
        plain loader's batches per epoch (so the expected Poisson batch is ``loader.batch_size``)."""
        if self.expected_batch_size is None:
            return loader_steps
        if self.expected_batch_size > num_samples:  # a small client: every step samples all its images (q = 1)
            log.warning("dp.expected_batch_size=%d exceeds the %d training images: full-batch steps (sample rate "
                        "1), recorded in privacy.json", self.expected_batch_size, num_samples)
            return 1
        return max(1, num_samples // self.expected_batch_size)

    @property
    def model_mode(self) -> str:
        """The grad_sample_mode to prepare the network with: augmentation multiplicity needs per-sample hooks."""
        return "hooks" if self.augmult > 1 and self.grad_sample_mode == "auto" else self.grad_sample_mode

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> DPSettings | None:
        """Settings from the ``dp`` config node, or None when DP is off (``dp=false`` or no node)."""
        if cfg is None or not cfg.get("enabled", False):
            return None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known - {"enabled", *OUTSIDE_DP_SGD})
        if unknown:
            raise BloodflError(f"unknown dp setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**{k: cfg[k] for k in known if k in cfg})


def automatic_clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Automatic (normalised) clipping, Bu et al. 2023: every per-sample gradient scaled by C / (||g|| + gamma),
    so its norm is C·||g|| / (||g|| + gamma) < C — the same sensitivity as flat clipping, with no threshold to
    tune (C only scales the update, as a learning rate does)."""
    return max_grad_norm / (norms + AUTOMATIC_CLIP_GAMMA)


def check_secure_mode() -> None:
    """``dp.secure_mode=true`` needs torchcsprng (Opacus' secure RNG); fail with one line where it is missing."""
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        raise BloodflError("dp.secure_mode=true needs the torchcsprng package (cryptographically secure noise and "
                           "sampling), which is not installed and has no release for this torch/Python (its last, "
                           "0.2.1, targets torch 1.8); use dp.secure_mode=false: noise and batches then come from "
                           "the client's secret generator (docs/privacy.md)") from None


_FULL_PRECISION = {None, 32, 64, "32", "64", "32-true", "64-true"}


def check_precision(precision: object) -> None:
    """DP-SGD needs full-precision per-sample gradients: 16-bit or mixed precision rounds them after clipping,
    so one sample's contribution can exceed dp.max_grad_norm (bf16 autocast: up to 1.0085x) and the privacy
    guarantee no longer holds. Raises a one-line BloodflError for anything but 32/64-bit precision."""
    key = precision.strip().lower() if isinstance(precision, str) else precision
    if key not in _FULL_PRECISION:
        raise BloodflError(f"dp=true cannot train with trainer.precision={precision!r}: 16-bit/mixed precision rounds "
                           "clipped per-sample gradients past dp.max_grad_norm, which breaks the privacy guarantee; "
                           "use trainer.precision=32-true")


def new_secret() -> int:
    """128 bits from the operating system's CSPRNG. Tests that compare two separate runs bit for bit replace
    this function (monkeypatch) with a deterministic one; nothing in configuration can set a secret."""
    return secrets.randbits(128)


class ClientSecret:
    """The randomness of a client's DP mechanism: Gaussian noise and Poisson sampling masks.

    Both must be unpredictable to whoever sees the client's updates (the server, other clients, the readers of
    the final model): were they a function of public values (the run seed, the round, the client id), an
    attacker who knows every record but one could replay the fit per candidate record and recognise the one
    whose update matches bit for bit. So the secret is 128 bits from the OS' CSPRNG (``secrets``), made here,
    never derived from configuration, and kept only in the client's own state (``state_dict``).

    Generators are made per purpose ("noise", "sampling") and device, each from the secret through BLAKE2b:
    a CPU generator gets its whole Mersenne-Twister state (19968 bits) from the secret, since
    ``torch.Generator.manual_seed`` keeps only 32 bits of a seed on CPU; a CUDA (Philox) generator a 64-bit
    seed. ``state_dict`` carries the secret and every generator's position, so a resumed or replayed round
    draws exactly the noise and batches the original would have (no second, differently noised release).
    """

    _MT_WORDS, _MT_OFFSET, _CPU_STATE_BYTES = 624, 24, 5056  # torch's CPUGeneratorImplState layout

    def __init__(self, secret: int | None = None) -> None:
        self._secret = new_secret() if secret is None else int(secret)
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, str] = {}  # restored positions of generators not made yet (hex states)

    def generator(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        """The run-long generator for ``purpose`` on ``device`` (made from the secret on first use, or at the
        position a loaded state_dict recorded for it)."""
        key = f"{purpose}@{torch.device(device)}"
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=torch.device(device))
            if key in self._pending:
                self._set(key, self._pending.pop(key))
            else:
                self._reseed(key)
        return self._generators[key]

    def _set(self, key: str, hex_state: str) -> None:
        self._generators[key].set_state(torch.tensor(list(bytes.fromhex(hex_state)), dtype=torch.uint8))

    def _stream(self, key: str, nbytes: int) -> bytes:
        out, counter = b"", 0
        while len(out) < nbytes:
            h = hashlib.blake2b(counter.to_bytes(8, "little") + key.encode(), digest_size=64,
                                key=self._secret.to_bytes(16, "little"), person=b"bloodfl-dp-rng")
            out += h.digest()
            counter += 1
        return out[:nbytes]

    def _reseed(self, key: str) -> None:
        gen = self._generators[key]
        if gen.device.type != "cpu":
            gen.manual_seed(int.from_bytes(self._stream(key, 8), "little"))
            return
        state = torch.Generator().manual_seed(0).get_state()  # valid header: left=1 (twist next), caches empty
        if state.numel() != self._CPU_STATE_BYTES:
            raise BloodflError(f"this torch's CPU generator state has {state.numel()} bytes, not "
                               f"{self._CPU_STATE_BYTES}; bloodfl.privacy.engine.ClientSecret needs updating")
        words = np.frombuffer(self._stream(key, 4 * self._MT_WORDS), dtype="<u4").astype("<u8")
        state[self._MT_OFFSET:self._MT_OFFSET + 8 * self._MT_WORDS] = torch.from_numpy(
            np.frombuffer(words.tobytes(), dtype=np.uint8).copy())
        gen.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        # hex strings: survive torch.save(weights_only=True) and JSON alike
        states = {k: bytes(g.get_state().tolist()).hex() for k, g in self._generators.items()}
        return {"secret": f"{self._secret:032x}", "generators": {**self._pending, **states}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the secret and every generator's position. Generators already made are set in place (a
        PrivateTraining holding one keeps drawing from the restored stream); the others when first made (a
        generator of a device this process lacks is simply never made)."""
        self._secret = int(state["secret"], 16)
        self._pending = dict(state.get("generators", {}))
        for key in self._generators:
            if key in self._pending:
                self._set(key, self._pending.pop(key))
            else:
                self._reseed(key)


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
        self.secret = ClientSecret()  # noise and Poisson masks; never derived from public values

    @property
    def steps_per_epoch(self) -> int:
        """Poisson batches per epoch: exactly 1 / sample_rate (what the loader takes and the plan counts)."""
        return round(1.0 / self.sample_rate)

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
                "steps": self.steps, "planned_steps": self.planned_steps, "steps_per_epoch": self.steps_per_epoch,
                "num_samples": self.num_samples, "grad_sample_mode": self.grad_sample_mode,
                "expected_batch_size": self.num_samples * self.sample_rate,
                # exactly what the accountant composed: [noise multiplier, sample rate, steps] per phase
                "accountant": self.accountant.mechanism, "history": self.accountant.state_dict()["history"],
                **{f"dp.{k}": v for k, v in asdict(self.settings).items()}}

    def state_dict(self) -> dict[str, Any]:
        """The client's own checkpoint state: accountant, plan, and its secret randomness (never publish it)."""
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "rng": self.secret.state_dict()}

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
        if "rng" in state:  # checkpoints from before the client secret keep the fresh one made in __init__
            self.secret.load_state_dict(state["rng"])

    def sampling_generator(self) -> torch.Generator | None:
        """Where the Poisson masks come from: the client's secret generator (or the secure RNG in secure mode)."""
        if self.settings.secure_mode:
            return _secure_generator()
        return self.secret.generator("sampling", "cpu")

    def poisson_loader(self, data_loader: DataLoader) -> DataLoader:
        """``data_loader``'s data set drawn the DP way: exactly ``steps_per_epoch`` Poisson batches per epoch
        at this plan's sample rate, from the client's secret generator."""
        from bloodfl.privacy.sampling import PoissonLoader

        if len(data_loader) != self.steps_per_epoch:
            raise BloodflError(f"{self.name}: the training loader has {len(data_loader)} batches per epoch but "
                               f"the DP plan assumed {self.steps_per_epoch}; build ClientPrivacy with "
                               "steps_per_epoch=len(loader)")
        return PoissonLoader(data_loader.dataset, sample_rate=self.sample_rate, steps=self.steps_per_epoch,
                             generator=self.sampling_generator(), collate_fn=data_loader.collate_fn,
                             num_workers=data_loader.num_workers, public_generator=data_loader.generator)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader | None = None,
               criterion: nn.Module | None = None) -> PrivateTraining:
        """DP-SGD for one fit (per-sample clipping, noise, accounting in this accountant). The batches must be
        Poisson batches of this plan: a DataModule switched with ``use_poisson_sampling`` draws them; given a
        plain ``data_loader``, the returned object's ``loader`` draws them from its data set."""
        private = PrivateTraining(self, model, optimizer, criterion or nn.CrossEntropyLoss())
        if data_loader is not None:
            private.loader = self.poisson_loader(data_loader)
        return private


def _secure_generator() -> torch.Generator:
    check_secure_mode()
    import torchcsprng  # type: ignore[import-not-found]

    return torchcsprng.create_random_device_generator("/dev/urandom")


class PrivateTraining:
    """Opacus objects for one fit: hooks on the (unwrapped) model, DPOptimizer, Poisson DPDataLoader."""

    def __init__(self, privacy: ClientPrivacy, model: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: nn.Module) -> None:
        self.privacy = privacy
        self.model = model
        self.mode = privacy.grad_sample_mode
        self.loader: DataLoader | None = None  # set by ClientPrivacy.attach when it was given a plain loader
        settings = privacy.settings
        # Opacus' own building blocks, as PrivacyEngine.make_private assembles them, minus its data loader: the
        # DataModule draws the Poisson batches (use_poisson_sampling), from the client's secret generator
        extra = {"max_grad_norm": settings.max_grad_norm} if self.mode == "ghost" else {}
        self.hooks = prepare_module(model, grad_sample_mode=self.mode, wrap_model=False, batch_first=True,
                                    loss_reduction="mean", **extra)
        self.hooks.forbid_grad_accumulation()  # each step must see exactly one Poisson batch
        if self.mode == "ghost":
            self.hooks.NORM_SAMPLERS = ghost_norm_samplers()  # exact conv norms, ~4x faster (norms.py)
        self.hooks.GRAD_SAMPLERS = hooks_grad_samplers()  # convolutions with non-zero padding modes (norms.py)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        noise = _secure_generator() if settings.secure_mode else privacy.secret.generator("noise", device)
        optim_class = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=self.mode)
        self.optimizer = optim_class(optimizer=optimizer, noise_multiplier=privacy.noise_multiplier,
                                     max_grad_norm=settings.max_grad_norm,
                                     expected_batch_size=int(privacy.num_samples * privacy.sample_rate),
                                     loss_reduction="mean", generator=noise, secure_mode=settings.secure_mode)
        # every step lands in the run-long accountant, at exactly the recorded sample rate
        self.optimizer.attach_step_hook(privacy.accountant.opacus.get_optimizer_hook_fn(
            sample_rate=privacy.sample_rate))
        self.criterion = criterion
        self.per_sample_loss = copy.copy(criterion)
        self.per_sample_loss.reduction = "none"  # each sample's class weight applies to its own loss only
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._all_trainable = all(p.requires_grad for p in model.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor,
             optimizer_step: Callable[[], Any] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One DP-SGD step on a Poisson batch; returns (mean loss, logits), both detached (None if empty).

        optimizer_step: what steps the DPOptimizer (default: its ``step``); Lightning passes its wrapper of the
        same optimizer, so the step is counted (``global_step``: checkpoints, schedulers, logging intervals).

        With ``dp.augmult`` K > 1, x is (B, K, C, H, W): K augmented views of each image, whose gradients are
        averaged per image before clipping. With ``dp.physical_batch_size`` the (logical) batch goes through forward and
        backward in chunks of that many images (virtual steps): Opacus' DPOptimizer clips and sums each chunk
        (``signal_skip_step``: no noise, no parameter update, no accountant step), and the last chunk's step adds
        the noise once, divides by the expected logical batch and is the one accounted step."""
        step = optimizer_step or self.optimizer.step
        self.optimizer.zero_grad(set_to_none=True)
        if x.shape[0] == 0:  # Poisson sampling can draw nobody: still a DP step (noise only), still accounted
            self._noise_only_step(step)
            return None, None
        size = self.privacy.settings.physical_batch_size or x.shape[0]
        chunks = list(zip(x.split(size), y.split(size)))
        logits = []
        for i, (xc, yc) in enumerate(chunks):
            if i:  # the clipped sums so far are kept in p.summed_grad (the last step was a skipped one)
                self.optimizer.zero_grad(set_to_none=True)
            logits.append(self._clipped_backward(xc, yc))
            if i < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()  # clip and accumulate only: neither counted by Lightning nor accounted
        step()
        out = torch.cat(logits)
        with torch.no_grad():  # what is logged: the criterion as configured (as val/loss), not what was clipped
            loss = self.criterion(out, y)
        return loss, out

    def _clipped_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Backward passes that leave this batch's per-sample gradients for the DPOptimizer to clip (hooks) or
        their clipped sum (ghost); returns the logits (averaged over the views with augmentation multiplicity)."""
        if self.privacy.settings.augmult > 1:
            return self._augmult_backward(x, y)
        if self.mode == "ghost":
            return self._ghost_backward(x, y).detach()
        # per-sample losses, each with its own class weight, averaged over the batch: Opacus' hooks
        # (loss_reduction="mean") multiply by the batch size, so each per-sample gradient is that sample's
        # alone. A class-weighted criterion's own mean divides by the batch's summed weights instead, which
        # ties every sample's gradient to the rest of the batch (sensitivity above max_grad_norm).
        logits = self.model(x)
        self.per_sample_loss(logits, y).mean().backward()
        self._automatic_clipping()
        return logits.detach()

    def _augmult_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Augmentation multiplicity (De et al. 2022): each image's gradient is the mean of its K views' gradients,
        formed BEFORE clipping, so an image still contributes at most max_grad_norm. Opacus' hooks give one
        per-sample gradient per view (B * K rows); they are averaged per image here, where the DPOptimizer reads
        them (``p.grad_sample``) — hand-written, since Opacus has no option for it."""
        b, k = x.shape[:2]
        if self.mode != "hooks" or k != self.privacy.settings.augmult:
            raise BloodflError(f"dp.augmult={self.privacy.settings.augmult} needs per-sample hooks "
                               "(dp.grad_sample_mode=hooks or auto) and batches of (images, views, ...) from a data "
                               f"module built with augmult (Root.datamodule); got mode {self.mode}, "
                               f"shape {tuple(x.shape)}")
        logits = self.model(x.flatten(0, 1))
        self.per_sample_loss(logits, y.repeat_interleave(k)).mean().backward()
        for p in self._trainable:
            if p.grad_sample is not None:
                p.grad_sample = p.grad_sample.view(b, k, *p.shape).mean(1)
        self._automatic_clipping()
        return logits.detach().view(b, k, -1).mean(1)

    def _automatic_clipping(self) -> None:
        """dp.clipping=automatic with per-sample hooks: scale each per-sample gradient by C / (||g|| + gamma)
        where the DPOptimizer reads it; its flat clipping then finds every norm below C (factor 1, or for norms
        above 1e4·C slightly below: never above C). Opacus has no automatic clipping (flat, per_layer, adaptive)."""
        if self.privacy.settings.clipping != "automatic":
            return
        grads = [p.grad_sample for p in self._trainable if p.grad_sample is not None]
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
        factors = automatic_clip_factors(norms, self.privacy.settings.max_grad_norm)
        for p in self._trainable:
            if p.grad_sample is not None:
                p.grad_sample = p.grad_sample * factors.view(-1, *([1] * p.dim())).to(p.grad_sample.dtype)

    def _ghost_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Ghost clipping: a backward that only feeds Opacus' hooks the per-sample gradient norms, then the
        backward of the loss re-weighted by each sample's clipping factor (= the sum of clipped gradients).

        Unlike Opacus' DPLossFastGradientClipping, the first pass asks autograd for the gradient of the input
        image only, so no weight gradient is computed and then thrown away (10-15% faster per step). With frozen
        layers that shortcut would backpropagate through them for nothing: then both passes are full ones."""
        input_pass = self._all_trainable
        x = x.detach().requires_grad_(input_pass)
        logits = self.model(x)
        per_sample = self.per_sample_loss(logits, y)  # each sample's class weight on its own loss only
        loss = per_sample.mean()  # loss_reduction="mean", as the hooks and the DPOptimizer expect
        if input_pass:
            torch.autograd.grad(loss, x, retain_graph=True)
        else:
            loss.backward(retain_graph=True)
            self.optimizer.zero_grad(set_to_none=True)  # unclipped gradients: never let them reach the step
        if self.privacy.settings.clipping == "automatic":
            coeff = automatic_clip_factors(self.hooks.get_norm_sample(), self.privacy.settings.max_grad_norm)
        else:
            coeff = self.hooks.get_clipping_coef()
        for p in self._trainable:  # a norm not refreshed next step must fail, not be reused silently
            p._norm_sample = None
        self.hooks.disable_hooks()
        try:
            (coeff.to(per_sample.dtype) * per_sample).sum().backward()
        finally:
            self.hooks.enable_hooks()
        return logits

    def _noise_only_step(self, step: Callable[[], Any]) -> None:
        for p in self.optimizer.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        step()

    def close(self) -> None:
        """Remove Opacus hooks and attributes; the model is a plain module again."""
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.cleanup()

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
