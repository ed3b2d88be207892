"""The client side: one hospital's data shard, its own model, and a local Lightning fit per round.

A client keeps its images and labels to itself: ``fit`` takes global weights and instructions and returns a
:class:`~bloodfl.fl.strategy.FitResult` (weights, number of training examples, local metrics), nothing else.
Weights crossing the boundary are the network's state dict (``module.net``): the loss' class weights and
metric states stay with the client.

Exact resume: before every local fit the client seeds Python, NumPy, torch and its loader's shuffling from
``(seed, round, client id)`` alone, so a round gives the same result whether or not the run was restarted.

Privacy plugs in through ``client.privacy`` (one object per client for the whole run, e.g. bloodfl.privacy's
``ClientPrivacy``): its ``state_dict()`` goes into every round checkpoint, and if it has ``callbacks(client)``
those Lightning callbacks join the local trainer. A DP fit that does not fit Lightning's loop can subclass
``FLClient`` and override ``train_locally``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split

from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.fl.strategy import FitResult, Weights
from bloodfl.training.module import ClassifierModule

# local metrics a client reports (when its trainer produced them)
LOCAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
_QUIET_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def client_seed(seed: int, server_round: int, cid: int) -> int:
    """The seed of client ``cid``'s fit in ``server_round``: a function of these three numbers only."""
    return int(np.random.SeedSequence([seed, server_round, 2, cid]).generate_state(1)[0])


def carve_validation(shard: np.ndarray, labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's shard into (train, local validation); stratified when every class allows it."""
    shard = np.sort(np.asarray(shard, dtype=np.int64))
    n_val = int(round(fraction * len(shard)))
    if fraction <= 0 or n_val < 1 or len(shard) - n_val < 1:
        return shard, shard[:0]
    y = labels[shard]
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and n_val >= len(counts) and len(shard) - n_val >= len(counts) else None
    train, val = train_test_split(shard, test_size=n_val, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(val)


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

    trainer_kwargs: pl.Trainer arguments shared by all clients (accelerator, precision, limits...); the
    client sets max_epochs from the round's instructions and turns off checkpoints and loggers itself.
    """

    def __init__(self, cid: int, module: ClassifierModule, datamodule: ArrayDataModule,
                 trainer_kwargs: dict[str, Any] | None = None, privacy: Any = None) -> None:
        self.cid = cid
        self.module = module
        self.datamodule = datamodule
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.privacy = privacy

    @property
    def num_examples(self) -> int:
        return len(self.datamodule.idx["train"])

    @property
    def has_validation(self) -> bool:
        val = self.datamodule.idx["val"]
        return val is not None and len(val) > 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one local epoch (what a DP accountant needs)."""
        return len(self.datamodule.train_dataloader())

    def get_weights(self) -> Weights:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.net.state_dict().items()}

    def set_weights(self, weights: Weights) -> None:
        self.module.net.load_state_dict(weights, strict=True)

    def fit(self, weights: Weights, server_round: int, config: dict[str, Any]) -> FitResult:
        """Load the global weights, train ``config['local_epochs']`` epochs locally, return the update."""
        self.set_weights(weights)
        seed = client_seed(int(config["seed"]), server_round, self.cid)
        seed_all(seed)
        self.datamodule.reseed(seed)
        metrics = self.train_locally(weights, config)
        return FitResult(self.get_weights(), self.num_examples, metrics)

    def train_locally(self, global_weights: Weights, config: dict[str, Any]) -> dict[str, float]:
        """One local Lightning fit; returns the local metrics of its last epoch."""
        callbacks: list[pl.Callback] = []
        mu = float(config.get("proximal_mu", 0.0))
        if mu > 0:
            callbacks.append(ProximalTerm(mu, global_weights))
        if self.privacy is not None and hasattr(self.privacy, "callbacks"):
            callbacks += list(self.privacy.callbacks(self))
        kwargs = {"enable_progress_bar": False, **self.trainer_kwargs}
        if not self.has_validation:
            kwargs["limit_val_batches"] = 0
        with quiet_lightning():
            trainer = pl.Trainer(max_epochs=int(config["local_epochs"]), callbacks=callbacks, logger=False,
                                 enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 **kwargs)
            trainer.fit(self.module, datamodule=self.datamodule)
        done = trainer.callback_metrics
        return {k: float(done[k]) for k in LOCAL_METRICS if k in done}

    def state_dict(self) -> dict[str, Any]:
        """Client state that lives across rounds (the privacy accountant); saved in every round checkpoint."""
        return {"privacy": self.privacy.state_dict()} if self.privacy is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
