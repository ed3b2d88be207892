"""``dp.ema``: an exponential moving average of the weights, evaluated in their place (De et al. 2022).

Lightning's ``EMAWeightAveraging`` does the work (one update per optimizer step — DP steps count in
``global_step`` — the averaged weights swapped in for validation, written as the checkpoint's ``state_dict``,
copied into the model when fitting ends). One change: the stock callback's ``on_load_checkpoint`` also runs
when ``trainer.test``/``validate`` load a checkpoint, and then puts the raw weights (``current_model_state``)
back into the model, so the best checkpoint — selected on the averaged weights — would be tested with the raw
ones. Outside fitting the checkpoint's ``state_dict`` (the averaged weights) is what is evaluated.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging


class EvaluatedEMA(EMAWeightAveraging):
    """EMAWeightAveraging whose averaged weights are also the ones a checkpoint is tested with."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":  # resuming a fit: restore both the average and the raw weights
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
