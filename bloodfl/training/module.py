"""The LightningModule: cross-entropy (optionally class-weighted), the configured optimizer, torchmetrics under
train/, val/ and test/, and DP-SGD when it is given a client's privacy accountant."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from bloodfl.privacy.engine import ClientPrivacy, PrivateTraining


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy (micro: fraction of images right) and macro precision, recall and F1."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    })


class ClassifierModule(pl.LightningModule):
    """Train ``net`` (a module returning logits) with cross-entropy.

    optimizer: a partial optimizer (``optim.optimizer``), completed here with the module's parameters.
    scheduler: None, or Lightning's lr_scheduler settings with a partial ``scheduler`` (``optim.schedulers``).
    class_weights: papers/000 eq. 1 weights per class, or None for an unweighted loss.
    privacy: a client's (or the centralized trainer's) DP accountant. With it the module owns its optimization
        (Lightning's manual optimization): every training step is a DP-SGD step of ``PrivateTraining`` —
        per-sample clipping, noise, accounting — on the Poisson batches its DataModule draws.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        privacy: ClientPrivacy | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "privacy"])
        self.net = net
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_config = scheduler
        self.privacy = privacy
        self.private: PrivateTraining | None = None  # the DP-SGD machinery of the current fit
        self.automatic_optimization = privacy is None
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.criterion = nn.CrossEntropyLoss(weight=weight)
        self.train_metrics = classification_metrics(num_classes).clone(prefix="train/")
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_probs: torch.Tensor | None = None  # (N, C) softmax of the last test run, for per-class reports
        self.test_targets: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.private is not None:  # DP-SGD: forward, per-sample clipping, noise and the step happen there
            # stepped through Lightning's wrapper of the DPOptimizer, so Lightning counts the step
            loss, logits = self.private.step(x, y, optimizer_step=self.optimizers().step)  # type: ignore[union-attr]
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

    def on_train_epoch_end(self) -> None:
        # under manual optimization Lightning leaves the schedulers to the module
        if self.private is not None and self.scheduler_config is not None:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()  # type: ignore[union-attr]

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

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.test_loss, self.test_metrics, "test")
        self._test_outputs.append((logits.softmax(1).detach().cpu(), batch[1].detach().cpu()))

    def on_test_epoch_end(self) -> None:
        self.test_probs = torch.cat([p for p, _ in self._test_outputs])
        self.test_targets = torch.cat([t for _, t in self._test_outputs])
        self._test_outputs = []

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax probabilities, targets) of a batch; nothing is logged (a split other than test is never
        reported under test/*)."""
        x, y = batch
        return self(x).softmax(1).detach().cpu(), y.detach().cpu()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.privacy is not None:
            self.private = self.privacy.attach(self.net, optimizer, criterion=self.criterion)
            optimizer = self.private.optimizer
        if self.scheduler_config is None:
            return optimizer
        settings = dict(self.scheduler_config)
        return {"optimizer": optimizer, "lr_scheduler": {**settings, "scheduler": settings["scheduler"](optimizer)}}

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.private is not None:  # a plain module again between federated rounds
            self.private.close()
            self.private = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.privacy is not None:  # Lightning checkpoints carry the accountant of a centralized DP run
            checkpoint["privacy"] = self.privacy.state_dict()
