"""Centralized training (``train.py``): the middle of a run — fit on train, select by validation, test once."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from bloodfl.compose import Root
from bloodfl.runner import Outcome, RunContext, run, scalars
from bloodfl.training.history import EpochHistory

log = logging.getLogger("bloodfl")


class CentralizedTask:
    """One Lightning fit; the checkpoint with the lowest ``val/loss`` is the model evaluated on the test split."""

    def prepare(self, root: Root, out: Path) -> None:
        pass

    def run(self, ctx: RunContext) -> Outcome:
        root, dm = ctx.root, ctx.dm
        net = root.network(dm.num_classes)
        privacy = root.client_privacy("central", len(dm.idx["train"]), len(dm.train_dataloader()),
                                      root.centralized_epochs())
        if privacy is not None:
            dm.use_poisson_sampling(privacy.sample_rate, privacy.steps_per_epoch, privacy.sampling_generator())
        module = root.module(net, dm.num_classes, dm.class_counts("train"), privacy)
        history = EpochHistory(privacy)
        trainer = root.trainer([*root.callbacks(), history], ctx.loggers)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        fit_seconds = time.perf_counter() - start
        write_history(ctx.out / "history.csv", history.rows)

        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt_path = ckpt or None  # fast_dev_run saves no checkpoint: evaluate the weights as they are
        # the selected epoch's validation values were logged when it ran: no second validation pass (issue #8)
        metrics: dict[str, Any] = selected_epoch(history.rows, trainer.checkpoint_callback) or scalars(
            trainer.validate(module, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0])
        if "val/acc" in metrics:
            fitted = [r["val/acc"] for r in history.rows if "val/acc" in r]  # per validated epoch
            metrics["val/acc_best"] = max(fitted or [metrics["val/acc"]])
        probs: torch.Tensor | None = None
        if root.evaluate_test:
            metrics.update(scalars(trainer.test(module, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0]))
            probs = module.test_probs
        metrics["epochs"] = trainer.current_epoch
        metrics["best_checkpoint"] = ckpt or None
        metrics["model/params"] = sum(p.numel() for p in net.parameters())
        metrics["time/fit_s"] = fit_seconds
        # images through the training step per second, validation included in the time (what a user waits for)
        metrics["time/images_per_s"] = len(dm.idx["train"]) * len(history.rows) / max(fit_seconds, 1e-9)
        train_eval = None
        if root.evaluate_on_training_images:  # papers/003's flaw, on purpose: the runner reports it as train_eval/*
            dm.predict_split = "train"
            batches = trainer.predict(module, datamodule=dm, ckpt_path=ckpt_path)
            dm.predict_split = "test"
            train_eval = (torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
        return Outcome(metrics, probs, module.test_targets if probs is not None else None,
                       [privacy] if privacy is not None else [], history=history.rows, history_x="epoch",
                       train_eval=train_eval)


def selected_epoch(rows: list[dict[str, Any]], checkpoint: ModelCheckpoint | None) -> dict[str, float] | None:
    """The ``val/*`` values of the epoch whose weights the checkpoint callback selected, or None when that
    epoch cannot be told from the history (then the caller validates the checkpoint again)."""
    if checkpoint is None or not checkpoint.best_model_path or not rows:
        return None
    if checkpoint.monitor is None:  # Lightning's default callback keeps the last epoch
        row = rows[-1]
    else:
        score = checkpoint.best_model_score
        if score is None:
            return None
        # the first epoch with the best score: ModelCheckpoint replaces its best only on a strict improvement
        row = next((r for r in rows if r.get(checkpoint.monitor) == float(score)), None)
        if row is None:
            return None
    return {k: v for k, v in row.items() if k.startswith("val/")}


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """The learning curves as a table: one row per epoch."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train, select by validation loss, evaluate the selected model on test; write the run outputs."""
    return run(cfg, CentralizedTask())
