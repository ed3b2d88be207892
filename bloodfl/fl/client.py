"""The client side: one hospital's data shard, its own model, and a local Lightning fit per round.

A client keeps its images and labels to itself: ``fit`` takes global weights and instructions and returns a
:class:`~bloodfl.fl.strategy.FitResult`, nothing else. What it releases:
- the network's weights (``module.net``'s state dict; the loss' class weights and metric states stay here);
- its number of training examples, or 1 with ``release_count=False`` (uniform FedAvg weights: the count stays
  with the client; the default under DP, where only what DP protects should leave);
- its local train/val metrics — but not under DP: they are exact statistics of private images, so a private
  client writes them to its own log (``local_log``) and releases none;
- with ``fl.bn_stats=recompute`` and without DP, the BatchNorm running mean/var of the new global weights on a
  few of its training batches (:meth:`FLClient.bn_statistics`, ``bloodfl.fl.batchnorm``), and how many images.

Exact resume: before every local fit the client seeds Python, NumPy, torch and its loader's shuffling from
``(seed, round, client id)`` alone, so a round gives the same result whether or not the run was restarted.
A private client's DP noise and Poisson batches come from its own secret generator instead (part of
``module.privacy``'s state, saved with the client's state in every round checkpoint).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch

from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.errors import BloodflError
from bloodfl.fl.batchnorm import measure
from bloodfl.fl.strategy import FitResult, Weights
from bloodfl.training.module import ClassifierModule

if TYPE_CHECKING:
    from bloodfl.privacy.engine import ClientPrivacy

# local metrics a client reports (when its trainer produced them)
LOCAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
_QUIET_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def client_seed(seed: int, server_round: int, cid: int) -> int:
    """The seed of client ``cid``'s fit in ``server_round``: a function of these three numbers only."""
    return int(np.random.SeedSequence([seed, server_round, 2, cid]).generate_state(1)[0])


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer info lines (GPU available..., `Trainer.fit` stopped...) for a block."""
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def seed_all(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


class ProximalTerm(pl.Callback):
    """FedProx: add the gradient of ``mu/2 * ||w - w_global||^2``, i.e. ``mu * (w - w_global)``, to every
    parameter's gradient after each backward pass, before the optimizer step.

    Under Opacus (a DPOptimizer, which replaces the gradients by clipped noisy sums inside ``step``) the term is
    added by a step pre-hook on the inner torch optimizer instead, i.e. after clipping and noise: the term does
    not touch the data, so it costs no privacy and must not be clipped.
    """

    def __init__(self, mu: float, global_weights: Weights) -> None:
        self.mu = mu
        self.global_weights = global_weights
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net  # type: ignore[attr-defined]
        self._pairs = [(p, self.global_weights[name].to(p.device, p.dtype))
                       for name, p in net.named_parameters() if p.requires_grad]
        for opt in trainer.optimizers:
            if hasattr(opt, "original_optimizer"):  # Opacus DPOptimizer
                self._handles.append(opt.original_optimizer.register_step_pre_hook(
                    lambda *_: self.add_gradient()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not hasattr(optimizer, "original_optimizer"):
            self.add_gradient()

    def add_gradient(self) -> None:
        with torch.no_grad():
            for p, g in self._pairs:
                if p.grad is not None:
                    p.grad.add_(p - g, alpha=self.mu)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pairs = []


class FLClient:
    """One federated client: its data module (train shard + local validation share), its model, its trainer.

    make_trainer: builds the local trainer (``Root.trainer_factory``: the run's ``trainer.*`` settings); the
        client sets the epochs from the round's instructions and adds its callbacks.
    release_count: report the real number of training examples (FedAvg weighting) or 1 (uniform weighting).
    local_log: where a private client keeps its local metrics instead of releasing them (a CSV of its own).
    """

    def __init__(self, cid: int, module: ClassifierModule, datamodule: ArrayDataModule,
                 make_trainer: Callable[..., pl.Trainer] | None = None, release_count: bool = True,
                 local_log: Path | None = None) -> None:
        self.cid = cid
        self.module = module
        self.datamodule = datamodule
        self.make_trainer = make_trainer or pl.Trainer
        self.release_count = release_count
        self.local_log = local_log

    @property
    def privacy(self) -> ClientPrivacy | None:
        """The client's DP accountant (None without DP); it lives in the module that trains with it."""
        return self.module.privacy

    @property
    def num_examples(self) -> int:
        return len(self.datamodule.idx["train"])

    @property
    def has_validation(self) -> bool:
        val = self.datamodule.idx["val"]
        return val is not None and len(val) > 0

    def get_weights(self) -> Weights:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.net.state_dict().items()}

    def set_weights(self, weights: Weights) -> None:
        self.module.net.load_state_dict(weights, strict=True)

    def fit(self, weights: Weights, server_round: int, config: dict[str, Any]) -> FitResult:
        """Load the global weights, train ``config['local_epochs']`` epochs locally, return the update."""
        self._start(weights, server_round, config)
        metrics = self.train_locally(weights, config)
        if self.privacy is not None:  # exact statistics of private images: they stay here
            self._keep_locally(server_round, metrics)
            metrics = {}
        return FitResult(self.get_weights(), self.num_examples if self.release_count else 1, metrics)

    def bn_statistics(self, weights: Weights, server_round: int, config: dict[str, Any]) -> FitResult:
        """BatchNorm running mean/var of the global ``weights`` on ``config['bn_batches']`` of this client's
        training batches (augmented, as its fit sees them), and how many images (or 1, as ``fit`` counts)."""
        if self.privacy is not None:  # not protected by DP; private networks have no BatchNorm anyway
            raise BloodflError(f"client {self.cid} trains with DP: it does not release BatchNorm statistics of its "
                               "images; use fl.bn_stats=average or a network without BatchNorm")
        self._start(weights, server_round, config)
        batches = (self.datamodule.to_float(x, train=True)
                   for x, _ in itertools.islice(self.datamodule.train_dataloader(), int(config["bn_batches"])))
        stats, seen = measure(self.module.net, batches)
        return FitResult(stats, seen if self.release_count else 1)

    def _start(self, weights: Weights, server_round: int, config: dict[str, Any]) -> None:
        """Load the global weights and seed everything from (seed, round, client id) alone (exact resume)."""
        self.set_weights(weights)
        seed = client_seed(int(config["seed"]), server_round, self.cid)
        seed_all(seed)
        self.datamodule.reseed(seed)

    def train_locally(self, global_weights: Weights, config: dict[str, Any]) -> dict[str, float]:
        """One local Lightning fit; returns the local metrics of its last epoch."""
        callbacks: list[pl.Callback] = []
        mu = float(config.get("proximal_mu", 0.0))
        if mu > 0:
            callbacks.append(ProximalTerm(mu, global_weights))
        kwargs: dict[str, Any] = {} if self.has_validation else {"limit_val_batches": 0}
        with quiet_lightning():
            trainer = self.make_trainer(max_epochs=int(config["local_epochs"]), callbacks=callbacks, **kwargs)
            trainer.fit(self.module, datamodule=self.datamodule)
        done = trainer.callback_metrics
        # The finished trainer is garbage, but in reference cycles (its loops point back at it) that only a full
        # gc pass frees; until then it keeps its optimizer, whose state (Adam: twice the model) piled up round after
        # round (resnet18, 5 clients, all_pbs: ~0.6 GB a round, 11.5 GB by round 18). Dropping it frees it now.
        trainer.strategy.optimizers = []
        return {k: float(done[k]) for k in LOCAL_METRICS if k in done}

    def _keep_locally(self, server_round: int, metrics: dict[str, float]) -> None:
        if self.local_log is None:
            return
        self.local_log.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if self.local_log.exists():  # a resumed run repeats the interrupted round: its old row goes
            with open(self.local_log, newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if int(r["round"]) < server_round]
        with open(self.local_log, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["round", *LOCAL_METRICS], extrasaction="ignore")
            w.writeheader()
            w.writerows([*kept, {"round": server_round, **metrics}])

    def state_dict(self) -> dict[str, Any]:
        """Client state that lives across rounds (the privacy accountant); saved in every round checkpoint."""
        return {"privacy": self.privacy.state_dict()} if self.privacy is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
