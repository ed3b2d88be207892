"""The figures of a run, as PNG files titled with data set, model and split: the confusion matrix (counts and
row-normalised), one-vs-rest ROC curves per class, and learning curves (per epoch, or per round for federated
runs with each client's ε under DP). scikit-learn draws the confusion matrix and ROC curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads and on servers
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from bloodfl.evaluation.metrics import Evaluation

FIGURES = ("confusion_matrix", "roc", "learning_curves")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def confusion_matrix(path: Path, ev: Evaluation, title: str) -> Path:
    cm = np.asarray(ev.confusion)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = max(5.0, 0.6 * len(ev.classes) + 2)
    fig = Figure(figsize=(2 * size + 1, size))
    axes = fig.subplots(1, 2)
    for ax, m, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], normalised, ".2f", "row-normalised (recall)")):
        ConfusionMatrixDisplay(m, display_labels=ev.classes).plot(ax=ax, values_format=fmt, colorbar=False,
                                                                 xticks_rotation=45, cmap="Blues")
        ax.set_title(sub)
    fig.suptitle(f"Confusion matrix: {title}")
    return _save(fig, path)


def roc_curves(path: Path, ev: Evaluation, title: str) -> Path:
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    for name, (fpr, tpr), auc in zip(ev.classes, ev.roc, ev.per_class["auroc"]):
        RocCurveDisplay(fpr=np.asarray(fpr), tpr=np.asarray(tpr), roc_auc=auc, name=name).plot(ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ci = ""
    if "auroc_macro_ci95_low" in ev.scalars:
        ci = f" (95% CI {ev.scalars['auroc_macro_ci95_low']:.3f}-{ev.scalars['auroc_macro_ci95_high']:.3f})"
    ax.set_title(f"ROC, one vs rest: {title}\nmacro AUC {ev.scalars['auroc_macro']:.3f}{ci}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def learning_curves(path: Path, history: Sequence[dict[str, Any]], x: str, title: str) -> Path:
    """Loss and accuracy per ``x`` (``epoch`` or ``round``) for every split the history holds; a third panel
    with each client's ε when the history has ``*/epsilon`` columns."""
    xs = [h[x] for h in history]
    eps_keys = sorted({k for h in history for k in h if k.endswith("/epsilon")})
    panels = 3 if eps_keys else 2
    fig = Figure(figsize=(5.2 * panels, 4))
    axes = fig.subplots(1, panels)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test"):
            key = f"{split}/{metric}"
            pts = [(a, h[key]) for a, h in zip(xs, history) if h.get(key) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=split)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if eps_keys:
        ax = axes[2]
        for key in eps_keys:
            ax.plot(xs, [float(h.get(key) or np.nan) for h in history], marker=".", label=key.split("/")[0])
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ε (spent so far)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Learning curves: {title}")
    return _save(fig, path)


def write_figures(out_dir: Path, ev: Evaluation | None, history: Sequence[dict[str, Any]], x: str,
                  title: str) -> dict[str, Path]:
    """Every figure the run can draw, into ``out_dir/figures``; returns name -> path."""
    out = {}
    if ev is not None:
        out["confusion_matrix"] = confusion_matrix(out_dir / "figures" / "confusion_matrix.png", ev, title)
        out["roc"] = roc_curves(out_dir / "figures" / "roc.png", ev, title)
    if history:
        out["learning_curves"] = learning_curves(out_dir / "figures" / "learning_curves.png", history, x, title)
    return out
