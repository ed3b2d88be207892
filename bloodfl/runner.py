"""The run skeleton every task shares (``train.py``, ``federate.py``): the part of a run that is not training.

1. print the config, claim the run's own directory (never a finished one), seed, load and split the data,
   write ``splits.csv`` and ``preprocessing.json`` (image size, resize, mean/std in use, class names);
2. open the loggers — and always close them, also when the task fails, so the next job of a multirun starts
   a fresh W&B run;
3. run the task's middle (:class:`Task`), which returns an :class:`Outcome`;
4. write what every run writes with the same keys: the per-class report of the test predictions,
   ``privacy.json`` and ``dp/epsilon``/``dp/delta`` when DP was on, ``metrics.json``; print one ``Done:`` line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from bloodfl.compose import Root
from bloodfl.console import print_config_tree
from bloodfl.data.datamodule import BloodDataModule
from bloodfl.data.preprocessing import PREPROCESSING_FILE, save_preprocessing
from bloodfl.errors import BloodflError
from bloodfl.evaluation.report import class_report
from bloodfl.privacy.engine import ClientPrivacy
from bloodfl.privacy.integration import privacy_summary, write_privacy_json

log = logging.getLogger("bloodfl")


@dataclass
class RunContext:
    """What the skeleton has set up for the task's middle."""

    root: Root
    out: Path
    dm: BloodDataModule
    loggers: list[Any]


@dataclass
class Outcome:
    """What a task's middle returns: scalar metrics (``val/*``, ``test/*`` and its own keys), the selected
    model's test-set probabilities and targets (for the per-class report), and the privacy accountants."""

    metrics: dict[str, Any]
    test_probs: torch.Tensor | None = None
    test_targets: torch.Tensor | None = None
    privacies: Sequence[ClientPrivacy] = field(default_factory=list)


class Task(Protocol):
    def prepare(self, root: Root, out: Path) -> None:
        """Checks before anything is written (e.g. a federated run's resume state)."""

    def run(self, ctx: RunContext) -> Outcome:
        """The middle: build, fit and evaluate; everything else is the skeleton's."""


def claim_run_dir(out: Path) -> Path:
    """The run's own directory; refuses one that already holds finished results (never overwrite them)."""
    if (out / "metrics.json").exists():
        raise BloodflError(f"{out} already holds a finished run (metrics.json); choose another hydra.run.dir")
    out.mkdir(parents=True, exist_ok=True)
    return out


def close_loggers(loggers: Sequence[Any]) -> None:
    """Always close W&B, even after a failure, so the next job of a multirun starts a fresh run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)}


def run(cfg: DictConfig, task: Task) -> dict[str, Any]:
    """Run ``task`` inside the skeleton; returns the metrics written to ``metrics.json``."""
    root = Root(cfg)
    print_config_tree(cfg)
    out = claim_run_dir(root.output_dir)
    task.prepare(root, out)
    pl.seed_everything(root.seed, workers=True, verbose=False)  # before the data and the network: same weights
    dm = root.datamodule()
    dm.setup("fit")
    dm.save_splits(out / "splits.csv")
    # what predict needs to feed the model as the run did (normalize=train's statistics, class order)
    save_preprocessing(out / PREPROCESSING_FILE, dm, root.image_size, root.resize)
    log.info("data: %s: %s", dm.dataset_cfg.name, ", ".join(f"{s}={len(dm.idx[s])}" for s in ("train", "val", "test")))

    loggers = root.loggers()
    try:
        for lg in loggers:
            lg.log_hyperparams(root.config_dict())
        outcome = task.run(RunContext(root, out, dm, loggers))
        metrics = dict(outcome.metrics)
        if outcome.test_probs is not None and outcome.test_targets is not None:
            report = class_report(outcome.test_probs, outcome.test_targets, list(dm.classes or []))
            report.write(out)
            metrics["test/auroc_macro"] = report.auroc_macro
        if outcome.privacies:
            doc = write_privacy_json(out / "privacy.json", outcome.privacies, root.dp_record())
            metrics["dp/epsilon"], metrics["dp/delta"] = doc["worst"]["epsilon"], doc["worst"]["delta"]
        for lg in loggers:
            lg.log_metrics(scalars({k: v for k, v in metrics.items() if "/" in k}))
            lg.finalize("success")
    finally:
        close_loggers(loggers)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("test/acc", "test/f1_macro", "val/acc") if k in metrics)
    if outcome.privacies:
        shown += " " + privacy_summary(outcome.privacies)
    log.info("outputs in %s %s", out, shown)
    print(f"Done: outputs in {out} {shown}")
    return metrics
