"""The run skeleton every task shares (``train.py``, ``federate.py``): the part of a run that is not training.

1. print the config, claim the run's own directory (never a finished one), seed, load and split the data,
   write ``splits.csv`` and ``preprocessing.json`` (image size, resize, mean/std in use, class names);
2. open the loggers — and always close them, also when the task fails, so the next job of a multirun starts
   a fresh W&B run;
3. run the task's middle (:class:`Task`), which returns an :class:`Outcome`;
4. write what every run writes with the same keys: the test evaluation (``bloodfl.evaluation.metrics``: per-class
   report, confusion matrix, bootstrap CIs, ``test_predictions.csv``), the figures (``figures/``, also sent to
   the loggers), ``privacy.json`` and ``dp/epsilon``/``dp/delta`` when DP was on, ``metrics.json``; print one
   ``Done:`` line.
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
from bloodfl.evaluation.figures import write_figures
from bloodfl.evaluation.learned import no_better_than_majority
from bloodfl.evaluation.metrics import Evaluation, evaluate, write_predictions
from bloodfl.evaluation.publish import publish
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
    model's test-set probabilities and targets (for the evaluation), the privacy accountants, and the learning
    curves: one row per ``history_x`` (epoch or round)."""

    metrics: dict[str, Any]
    test_probs: torch.Tensor | None = None
    test_targets: torch.Tensor | None = None
    privacies: Sequence[ClientPrivacy] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_x: str = "epoch"
    # evaluation.on_training_images: the selected model's (probabilities, targets) on its own training split
    train_eval: tuple[torch.Tensor, torch.Tensor] | None = None


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


def evaluate_test(root: Root, dm: BloodDataModule, out: Path, outcome: Outcome) -> Evaluation | None:
    """The selected model's test evaluation, written next to the run: ``test_per_class.csv``,
    ``test_confusion_matrix.csv``, ``test_report.txt`` and ``test_predictions.csv`` (what ensembles average)."""
    if outcome.test_probs is None or outcome.test_targets is None:
        return None
    ev = evaluate(outcome.test_probs, outcome.test_targets, list(dm.classes or []), root.bootstrap_resamples,
                  seed=root.seed)
    ev.write(out)
    write_predictions(out / "test_predictions.csv", ev, dm.refs("test"))
    return ev


TRAIN_EVAL = "train_eval"  # metrics.json prefix and file prefix of the evaluation on the training split


def evaluate_train_split(root: Root, dm: BloodDataModule, out: Path, outcome: Outcome) -> dict[str, Any]:
    """evaluation.on_training_images: the selected model on the images it trained on (papers/003's flaw, measured
    on purpose), as ``train_eval/*`` and ``train_eval_{per_class,confusion_matrix}.csv``/``train_eval_report.txt``:
    never under a test key or file, so it cannot be mistaken for a held-out result."""
    if outcome.train_eval is None:
        return {}
    log.warning("evaluation.on_training_images=true: train_eval/* ARE MEASURED ON THE MODEL'S OWN TRAINING IMAGES "
                "(papers/003's flaw, for measuring its size only); they are not a test result, test/* is")
    ev = evaluate(*outcome.train_eval, list(dm.classes or []), root.bootstrap_resamples, seed=root.seed)
    ev.write(out, prefix=TRAIN_EVAL)
    return {**ev.flat(TRAIN_EVAL), f"{TRAIN_EVAL}/confusion_matrix": ev.confusion}


def learned_check(dm: BloodDataModule, metrics: dict[str, Any]) -> str | None:
    """The warning for a model no better than the majority class on validation (None otherwise)."""
    acc = metrics.get("val/acc_best", metrics.get("val/acc"))
    val = dm.idx.get("val")
    if not isinstance(acc, (int, float)) or val is None or len(val) == 0:
        return None
    return no_better_than_majority(float(acc), dm.class_counts("val"), list(dm.classes or []))


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
        not_learned = learned_check(dm, metrics)
        if not_learned is not None:
            log.warning(not_learned)
        ev = evaluate_test(root, dm, out, outcome)
        if ev is not None:
            for k, v in ev.flat("test").items():  # the module's own test/* values stay (the same definitions)
                metrics.setdefault(k, v)
            metrics["test/confusion_matrix"] = ev.confusion
        metrics.update(evaluate_train_split(root, dm, out, outcome))
        metrics.update(dm.leakage)  # dataset.copies_before_split: the run says it used the leaky protocol
        figures = write_figures(out, ev, outcome.history, outcome.history_x, root.title())
        publish(loggers, ev, figures)
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
    if not_learned is not None:
        shown += " WARNING: no better than the majority class (see the log)"
    log.info("outputs in %s %s", out, shown)
    print(f"Done: outputs in {out} {shown}")
    return metrics
