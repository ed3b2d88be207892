"""Per-class evaluation the papers report: sensitivity (recall), specificity, precision, F1, one-vs-rest
ROC AUC, and the confusion matrix, all from torchmetrics on collected test predictions."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.functional.classification import (
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_specificity,
)


@dataclass
class ClassReport:
    classes: list[str]
    per_class: dict[str, list[float]]  # metric name -> one value per class
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    auroc_macro: float

    def write(self, out_dir: str | Path, prefix: str = "test") -> None:
        out = Path(out_dir)
        with open(out / f"{prefix}_per_class.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            names = list(self.per_class)
            w.writerow(["class", *names])
            for i, c in enumerate(self.classes):
                w.writerow([c, *(f"{self.per_class[n][i]:.6f}" for n in names)])
        with open(out / f"{prefix}_confusion_matrix.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["true \\ predicted", *self.classes])
            for c, row in zip(self.classes, self.confusion):
                w.writerow([c, *row])


def class_report(probs: torch.Tensor, target: torch.Tensor, classes: list[str]) -> ClassReport:
    """``probs``: (N, C) softmax outputs; ``target``: (N,) true class indices."""
    c = len(classes)
    kw = {"num_classes": c, "average": "none"}
    per_class = {
        "support": torch.bincount(target, minlength=c).float(),
        "sensitivity": multiclass_recall(probs, target, **kw),
        "specificity": multiclass_specificity(probs, target, **kw),
        "precision": multiclass_precision(probs, target, **kw),
        "f1": multiclass_f1_score(probs, target, **kw),
        "auroc": multiclass_auroc(probs, target, **kw),
    }
    return ClassReport(
        classes=list(classes),
        per_class={k: v.tolist() for k, v in per_class.items()},
        confusion=multiclass_confusion_matrix(probs, target, num_classes=c).tolist(),
        auroc_macro=float(multiclass_auroc(probs, target, num_classes=c, average="macro")),
    )
