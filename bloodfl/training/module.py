"""The LightningModule: cross-entropy (optionally class-weighted), Adam, torchmetrics under val/ and test/."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from bloodfl.errors import BloodflError


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy (micro: fraction of images right) and macro precision, recall and F1."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    })


class ClassifierModule(pl.LightningModule):
    """Train ``net`` (a module returning logits) with cross-entropy and Adam.

    class_weights: papers/000 eq. 1 weights per class, or None for an unweighted loss.
    scheduler: None, "cosine" (over trainer.max_epochs) or "plateau" (on val/loss).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        class_weights: list[float] | None = None,
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.private: Any = None  # set by bloodfl.privacy.lightning.DPCallback during a DP fit
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.criterion = nn.CrossEntropyLoss(weight=weight)
        self.train_metrics = classification_metrics(num_classes).clone(prefix="train/")
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_history: list[float] = []  # per fitted epoch, for val/acc_best
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_probs: torch.Tensor | None = None  # (N, C) softmax of the last test run, for per-class reports
        self.test_targets: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.private is not None:  # DP-SGD: forward, per-sample clipping, noise and the step happen there
            loss, logits = self.private.step(x, y)
            if loss is None:  # an empty Poisson batch: a noise-only step was taken, nothing to log
                return None
        else:
            logits = self(x)
            loss = self.criterion(logits, y)
        self.train_loss(loss.detach(), weight=len(y))
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, loss_metric: MeanMetric, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss_metric(self.criterion(logits, y), weight=len(y))
        metrics.update(logits, y)
        self.log(f"{prefix}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.val_acc_history.append(float(self.val_metrics["acc"].compute()))

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.test_loss, self.test_metrics, "test")
        self._test_outputs.append((logits.softmax(1).detach().cpu(), batch[1].detach().cpu()))

    def on_test_epoch_end(self) -> None:
        self.test_probs = torch.cat([p for p, _ in self._test_outputs])
        self.test_targets = torch.cat([t for _, t in self._test_outputs])
        self._test_outputs = []

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler in (None, "none"):
            return optimizer
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
            return {"optimizer": optimizer, "lr_scheduler": sched}
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}
        raise BloodflError(f"unknown optim.scheduler {hp.scheduler!r}; valid: null, cosine, plateau")
