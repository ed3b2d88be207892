"""What the papers report for a test set, from its predicted probabilities: accuracy; macro and weighted
precision, recall and F1; per class sensitivity (recall), specificity, precision, F1, support and one-vs-rest ROC
AUC; the confusion matrix; ROC curves; scikit-learn's text report; and bootstrap 95% confidence intervals
(papers/004) for accuracy, macro F1 and macro AUC.

Point estimates come from torchmetrics (the same definitions the LightningModule logs during training) and
scikit-learn. The bootstrap is vectorised here, see :func:`bootstrap_ci`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_roc,
    multiclass_specificity,
)

BOOTSTRAP_METRICS = ("acc", "f1_macro", "auroc_macro")


@dataclass
class Evaluation:
    """A test set's evaluation. ``scalars`` keys carry no split prefix (``acc``, ``f1_macro``, ``acc_ci95_low``)."""

    classes: list[str]
    scalars: dict[str, float]
    per_class: dict[str, list[float]]  # metric name -> one value per class
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    roc: list[tuple[list[float], list[float]]]  # per class: false-positive rates, true-positive rates
    text: str  # scikit-learn's classification report
    resamples: int = 0
    per_image: dict[str, list] = field(default_factory=dict)  # targets and probabilities, for ensembles

    def flat(self, prefix: str = "test") -> dict[str, float]:
        """The scalars and per-class values as logger keys: ``test/acc``, ``test/sensitivity/<class>``."""
        out = {f"{prefix}/{k}": v for k, v in self.scalars.items()}
        for name, values in self.per_class.items():
            out.update({f"{prefix}/{name}/{c}": v for c, v in zip(self.classes, values)})
        return out

    def write(self, out_dir: str | Path, prefix: str = "test") -> list[Path]:
        """``<prefix>_per_class.csv``, ``<prefix>_confusion_matrix.csv``, ``<prefix>_report.txt``."""
        out = Path(out_dir)
        written = [out / f"{prefix}_{name}" for name in ("per_class.csv", "confusion_matrix.csv", "report.txt")]
        with open(written[0], "w", newline="") as fh:
            w = csv.writer(fh)
            names = list(self.per_class)
            w.writerow(["class", *names])
            for i, c in enumerate(self.classes):
                w.writerow([c, *(f"{self.per_class[n][i]:.6f}" for n in names)])
        with open(written[1], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["true \\ predicted", *self.classes])
            for c, row in zip(self.classes, self.confusion):
                w.writerow([c, *row])
        ci = "\n".join(f"{m}: {self.scalars[m]:.4f} (95% CI {self.scalars[f'{m}_ci95_low']:.4f}-"
                       f"{self.scalars[f'{m}_ci95_high']:.4f})" for m in BOOTSTRAP_METRICS
                       if f"{m}_ci95_low" in self.scalars)
        written[2].write_text(f"{self.text}\nbootstrap: {self.resamples} resamples of the {prefix} set\n{ci}\n")
        return written


def evaluate(probs: torch.Tensor, target: torch.Tensor, classes: list[str], resamples: int = 1000,
             seed: int = 0) -> Evaluation:
    """``probs``: (N, C) softmax outputs; ``target``: (N,) true class indices; ``resamples``: bootstrap
    resamples for the 95% CIs (0: none); ``seed``: the bootstrap's seed (the same seed gives the same CIs)."""
    probs, target = probs.detach().float().cpu(), target.detach().long().cpu()
    c = len(classes)
    if probs.ndim != 2 or probs.shape[1] != c or len(target) != len(probs):
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} do not match {c} classes")
    each = {"num_classes": c, "average": "none"}
    per_class = {
        "support": torch.bincount(target, minlength=c).float(),
        "sensitivity": multiclass_recall(probs, target, **each),
        "specificity": multiclass_specificity(probs, target, **each),
        "precision": multiclass_precision(probs, target, **each),
        "f1": multiclass_f1_score(probs, target, **each),
        "auroc": multiclass_auroc(probs, target, **each),
    }
    scalars = {"acc": multiclass_accuracy(probs, target, num_classes=c, average="micro")}
    for avg in ("macro", "weighted"):
        scalars[f"precision_{avg}"] = multiclass_precision(probs, target, num_classes=c, average=avg)
        scalars[f"recall_{avg}"] = multiclass_recall(probs, target, num_classes=c, average=avg)
        scalars[f"f1_{avg}"] = multiclass_f1_score(probs, target, num_classes=c, average=avg)
    scalars["auroc_macro"] = multiclass_auroc(probs, target, num_classes=c, average="macro")
    out = {k: float(v) for k, v in scalars.items()}
    if resamples:
        for name, (low, high) in bootstrap_ci(probs.numpy(), target.numpy(), c, resamples, seed).items():
            out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = low, high
    fpr, tpr, _ = multiclass_roc(probs, target, num_classes=c)
    labels = list(range(c))
    text = classification_report(target.numpy(), probs.argmax(1).numpy(), labels=labels, target_names=list(classes),
                                 digits=4, zero_division=0)
    return Evaluation(
        classes=list(classes),
        scalars=out,
        per_class={k: v.tolist() for k, v in per_class.items()},
        confusion=multiclass_confusion_matrix(probs, target, num_classes=c).tolist(),
        roc=[(f.tolist(), t.tolist()) for f, t in zip(fpr, tpr)],
        text=text,
        resamples=resamples,
        per_image={"target": target.tolist(), "probs": probs.tolist()},
    )


def bootstrap_ci(probs: np.ndarray, target: np.ndarray, num_classes: int, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of accuracy, macro F1 and macro one-vs-rest AUC over ``resamples`` seeded
    resamples (with replacement) of the test set.

    ``groups`` (one label per image): resample the groups instead of the images (a cluster bootstrap), for test
    sets whose images are not independent, e.g. wbc4's TEST folder, 2,487 augmented copies of 71 source images:
    resampling the images would treat it as 2,487 independent observations and give far too narrow a CI.

    Hand-vectorised because calling torchmetrics or scikit-learn once per resample costs ~15 s per run on a
    2-core CPU (~15 ms per AUC); here a resample is a row of multiplicities and every metric is a weighted
    count, which gives exactly what those libraries compute on the resampled set (tests compare them). The
    definitions follow torchmetrics: macro F1 leaves out classes absent from both targets and predictions; a
    resample's macro AUC averages the classes that have both positives and negatives in it (resamples without
    any such class have no AUC and do not count).
    """
    n = len(target)
    rng = np.random.default_rng(seed)
    if groups is None:
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # (B, N)
    else:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} labels for {n} images")
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        g = int(member.max()) + 1
        weights = rng.multinomial(g, np.full(g, 1.0 / g), size=resamples).astype(np.float64)[:, member]
    pred = probs.argmax(1)
    onehot_t = np.eye(num_classes)[target]  # (N, C)
    onehot_p = np.eye(num_classes)[pred]
    correct = (pred == target).astype(np.float64)
    acc = weights @ correct / weights.sum(1)
    tp = weights @ (onehot_t * onehot_p)  # (B, C)
    support = weights @ onehot_t
    predicted = weights @ onehot_p
    fp, fn = predicted - tp, support - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    f1_macro = (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    aucs = np.stack([_weighted_auc(probs[:, k], target == k, weights) for k in range(num_classes)], axis=1)
    defined = ~np.isnan(aucs).all(1)  # a resample holding one class only has no AUC: it is left out
    auc_macro = np.array([np.nanmean(row) if ok else np.nan for row, ok in zip(aucs, defined)])
    tail = 100 * (1 - level) / 2
    return {name: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail)))
            for name, v in zip(BOOTSTRAP_METRICS, (acc, f1_macro, auc_macro))}


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of ``score`` per row of ``weights`` (multiplicities): P(score_pos > score_neg) plus half
    the ties (the Mann-Whitney form of the area under the ROC curve). NaN where a row has no positive or no
    negative."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    w_pos = weights[:, order] * positive[order]
    w_neg = weights[:, order] * ~positive[order]
    # tied scores form one group: negatives strictly below a group, and those tied with it
    first = np.searchsorted(s, s, side="left")
    last = np.searchsorted(s, s, side="right")
    cum_neg = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(w_neg, axis=1)], axis=1)
    below = cum_neg[:, first]
    tied = cum_neg[:, last] - below
    pairs = w_pos.sum(1) * w_neg.sum(1)
    wins = (w_pos * (below + 0.5 * tied)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def write_predictions(path: str | Path, ev: Evaluation, refs: list[str] | None = None) -> None:
    """Each test image's reference, true class and probabilities: what an ensemble averages (soft voting)."""
    refs = refs or [str(i) for i in range(len(ev.per_image["target"]))]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", *(f"p_{c}" for c in ev.classes)])
        for ref, y, p in zip(refs, ev.per_image["target"], ev.per_image["probs"]):
            w.writerow([ref, ev.classes[y], ev.classes[int(np.argmax(p))], *(f"{v:.6g}" for v in p)])


def read_predictions(path: str | Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """(refs, true class names, class names, (N, C) probabilities) of a ``test_predictions.csv``."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    classes = [h.removeprefix("p_") for h in rows[0][3:]]
    body = rows[1:]
    return ([r[0] for r in body], [r[1] for r in body], classes,
            np.array([[float(v) for v in r[3:]] for r in body], dtype=np.float64).reshape(len(body), len(classes)))

