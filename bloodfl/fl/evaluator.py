"""Centralized evaluation of the global model on held-out data (Flower's ``evaluate_fn``).

Part of the simulation harness, not of the server strategy: it holds the central test (and validation) images,
which in a real deployment would be a separate evaluation site. It receives only global weights.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.fl.client import quiet_lightning
from bloodfl.fl.strategy import Weights
from bloodfl.training.module import ClassifierModule


class GlobalEvaluator:
    """Load global weights into ``module.net`` and run the module's test step over ``split`` of ``datamodule``."""

    def __init__(self, module: ClassifierModule, datamodule: ArrayDataModule,
                 make_trainer: Callable[..., pl.Trainer] | None = None) -> None:
        self.module = module
        self.datamodule = datamodule
        self.make_trainer = make_trainer or pl.Trainer

    def has(self, split: str) -> bool:
        idx = self.datamodule.idx.get(split)
        return idx is not None and len(idx) > 0

    def evaluate(self, weights: Weights, split: str = "test") -> dict[str, float]:
        """Metrics under ``test/`` (split="test") or ``val/`` (split="val") of the model with ``weights``."""
        # this copy of the model only ever runs inference: channels-last convolutions and max-pooling make the
        # evaluation 1.17x (resnet18) to 1.75x (simple_cnn) faster on CPU, outputs equal to NCHW's within 1e-7
        # (docs/parity.md section 3). load_state_dict copies into the existing tensors, so the layout stays; the
        # weights that cross the client/server boundary are untouched.
        self.module.net.to(memory_format=torch.channels_last)
        self.module.net.load_state_dict(weights, strict=True)
        with quiet_lightning():
            trainer = self.make_trainer(enable_progress_bar=False)
            if split == "test":
                out = trainer.test(self.module, datamodule=self.datamodule, verbose=False)[0]
            else:
                out = trainer.validate(self.module, datamodule=self.datamodule, verbose=False)[0]
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float, torch.Tensor))}
