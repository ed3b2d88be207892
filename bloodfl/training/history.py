"""One row per training epoch of what the module logged (``train/*``, ``val/*``), and the ε spent so far under
DP: the learning curves of a centralized run, whichever loggers are configured."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from bloodfl.privacy.engine import ClientPrivacy


class EpochHistory(pl.Callback):
    def __init__(self, privacy: ClientPrivacy | None = None) -> None:
        self.privacy = privacy
        self.rows: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # validation runs inside the training epoch, so the epoch's val/* and train/* are both in by now
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if self.privacy is not None:
            row["dp/epsilon"] = self.privacy.epsilon()
        self.rows.append(row)
