"""DP-SGD inside a Lightning fit, with Lightning kept out of the per-step DP path.

``DPCallback`` (one per fit, from ``ClientPrivacy.callback()``) at ``on_fit_start``:

* attaches Opacus to ``pl_module.net`` and the optimizer Lightning built (``PrivateTraining``);
* serves the Poisson-sampled loader as the datamodule's train loader (same dataset, collate and seeded
  generator; the datamodule's batch hooks — uint8 -> float, augmentation — still apply);
* switches the module to manual optimization and sets ``pl_module.private``: ``ClassifierModule.training_step``
  then calls ``private.step(x, y)`` (forward, per-sample clipping, noise, optimizer step, accounting) instead
  of returning a loss for Lightning's automatic backward;
* puts the DPOptimizer in ``trainer.optimizers`` (e.g. FedProx' callback hooks its inner optimizer).

Epoch-interval LR schedulers are stepped here, since Lightning leaves them to the user under manual
optimization. ``teardown`` undoes everything, so the next round's fit starts from a plain module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from bloodfl.errors import BloodflError

if TYPE_CHECKING:
    from bloodfl.privacy.engine import ClientPrivacy, PrivateTraining


class DPCallback(pl.Callback):
    """Train the fit's module with DP-SGD, accounting every step in ``privacy`` (which outlives the fit)."""

    def __init__(self, privacy: ClientPrivacy) -> None:
        self.privacy = privacy
        self.private: PrivateTraining | None = None
        self._automatic = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise BloodflError("DP training supports exactly one optimizer")
        datamodule = trainer.datamodule
        if datamodule is None:
            raise BloodflError("DP training needs the trainer to be fitted with a datamodule")
        loader = datamodule.train_dataloader()
        self.private = self.privacy.attach(pl_module.net, trainer.optimizers[0], loader,  # type: ignore[arg-type]
                                           getattr(pl_module, "criterion", None))
        private_loader = self.private.loader
        datamodule.train_dataloader = lambda: private_loader  # instance attribute: undone in teardown
        trainer.optimizers = [self.private.optimizer]
        self._automatic = pl_module.automatic_optimization
        pl_module.automatic_optimization = False
        pl_module.private = self.private  # type: ignore[assignment]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            if config.interval != "epoch" or (trainer.current_epoch + 1) % config.frequency:
                continue
            if config.reduce_on_plateau:
                value = trainer.callback_metrics.get(config.monitor or "")
                if value is not None:  # no validation this epoch: nothing to react to
                    config.scheduler.step(float(value))  # type: ignore[call-arg]
            else:
                config.scheduler.step()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.private is None:
            return
        self.private.close()
        self.private = None
        pl_module.private = None  # type: ignore[assignment]
        pl_module.automatic_optimization = self._automatic
        datamodule = trainer.datamodule
        if datamodule is not None and "train_dataloader" in vars(datamodule):
            del datamodule.train_dataloader

    def state_dict(self) -> dict[str, Any]:
        """Lightning checkpoints of centralized runs carry the accountant, so a resumed fit continues it."""
        return {"privacy": self.privacy.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("privacy")
        # Lightning also restores callbacks for validate/test(ckpt_path=best): never rewind the accountant to
        # an earlier checkpoint's step count; every step taken so far has been spent
        if state is not None and sum(n for *_, n in state["accountant"]["history"]) >= self.privacy.steps:
            self.privacy.load_state_dict(state)
