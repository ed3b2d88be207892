"""Send a run's evaluation to its loggers beyond scalars, so a dashboard shows what the run directory holds:
W&B gets the figures as images, the confusion matrix as a W&B plot and the per-class report as a table;
TensorBoard gets the figures as images. CSV loggers get the scalars only (the files sit next to them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from bloodfl.evaluation.metrics import Evaluation


def per_class_table(ev: Evaluation) -> tuple[list[str], list[list[Any]]]:
    names = list(ev.per_class)
    return ["class", *names], [[c, *(ev.per_class[n][i] for n in names)] for i, c in enumerate(ev.classes)]


def publish(loggers: Sequence[Any], ev: Evaluation | None, figures: dict[str, Path], prefix: str = "test") -> None:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            _to_wandb(lg, ev, figures, prefix)
        elif isinstance(lg, TensorBoardLogger):
            for name, path in figures.items():
                image = np.asarray(Image.open(path).convert("RGB"))
                lg.experiment.add_image(f"figures/{name}", image, dataformats="HWC")


def _to_wandb(lg: WandbLogger, ev: Evaluation | None, figures: dict[str, Path], prefix: str) -> None:
    import wandb

    for name, path in figures.items():
        lg.log_image(key=f"figures/{name}", images=[str(path)])
    if ev is None:
        return
    columns, rows = per_class_table(ev)
    lg.log_table(key=f"{prefix}/per_class", columns=columns, data=rows)
    y_true = ev.per_image["target"]
    y_pred = [int(np.argmax(p)) for p in ev.per_image["probs"]]
    lg.experiment.log({f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
        y_true=y_true, preds=y_pred, class_names=ev.classes, title=f"{prefix} confusion matrix")})
