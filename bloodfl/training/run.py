"""Centralized training from a composed Hydra config: data, model, trainer, fit, test, outputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bloodfl.console import print_config_tree
from bloodfl.data.datamodule import BloodDataModule
from bloodfl.errors import BloodflError
from bloodfl.evaluation.report import class_report
from bloodfl.models import build_classifier
from bloodfl.privacy.integration import centralized_privacy, make_net_private, privacy_summary, write_privacy_json
from bloodfl.training.module import ClassifierModule

log = logging.getLogger("bloodfl")


def claim_output_dir(cfg: DictConfig) -> Path:
    """The run's own directory; refuses one that already holds finished results (never overwrite them)."""
    out = Path(cfg.paths.output_dir)
    if (out / "metrics.json").exists():
        raise BloodflError(f"{out} already holds a finished run (metrics.json); choose another hydra.run.dir")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_datamodule(cfg: DictConfig) -> BloodDataModule:
    augment = instantiate(cfg.augment) if cfg.get("augment") and cfg.augment.get("_target_") else None
    return BloodDataModule(
        dataset=cfg.dataset,
        split=cfg.split,
        augment=augment,
        batch_size=cfg.loader.batch_size,
        seed=cfg.seed,
        cache_dir=cfg.paths.get("cache_dir"),
        num_workers=cfg.loader.num_workers,
    )


def class_weights_for(dm: BloodDataModule) -> list[float]:
    """papers/000 eq. 1 on the training split: w_c = N_train / (n_c * C)."""
    from bloodfl.data.checks import class_weights

    return class_weights(dm.class_counts("train").tolist())


def build_module(cfg: DictConfig, dm: BloodDataModule) -> ClassifierModule:
    net = build_classifier(
        cfg.model.name,
        num_classes=dm.num_classes,
        image_size=int(cfg.dataset.image_size),
        pretrained=bool(cfg.model.pretrained),
        weights=cfg.model.get("weights"),
        head=OmegaConf.to_container(cfg.model.head, resolve=True),
    )
    if getattr(net, "weights_info", None):
        log.info(net.weights_info)
    net = make_net_private(net, cfg)  # no-op unless dp=true; before the optimizer and before FL copies it
    return ClassifierModule(
        net,
        num_classes=dm.num_classes,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        class_weights=class_weights_for(dm) if cfg.get("class_weights") else None,
        scheduler=cfg.optim.get("scheduler"),
    )


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group such as callbacks/ or logger/."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def close_loggers(loggers: list[Any]) -> None:
    """Always close W&B, even after a failure, so the next job of a multirun starts a fresh run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, torch.Tensor))}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on train, select by validation loss, evaluate the selected model on test; write the run outputs."""
    print_config_tree(cfg)
    out = claim_output_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    dm.save_splits(out / "splits.csv")
    log.info("data: %s", ", ".join(f"{s}={len(dm.idx[s])}" for s in ("train", "val", "test")))
    module = build_module(cfg, dm)

    callbacks = instantiate_all(cfg.get("callbacks"))
    privacy = centralized_privacy(cfg, dm, module.net)  # None with dp=false
    if privacy is not None:
        callbacks.append(privacy.callback())
    loggers = instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=dm)
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt_path = ckpt or None  # fast_dev_run saves no checkpoint: evaluate the weights as they are
        metrics: dict[str, Any] = {}
        metrics.update(_floats(trainer.validate(module, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0]))
        if "val/acc" in metrics:
            metrics["val/acc_best"] = max(module.val_acc_history or [metrics["val/acc"]])
        if cfg.get("test", True):
            metrics.update(_floats(trainer.test(module, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0]))
            report = class_report(module.test_probs, module.test_targets, dm.classes)
            report.write(out)
            metrics["test/auroc_macro"] = report.auroc_macro
        if privacy is not None:
            write_privacy_json(out / "privacy.json", [privacy], OmegaConf.to_container(cfg.dp, resolve=True))
            metrics["dp/epsilon"], metrics["dp/delta"] = privacy.epsilon(), privacy.delta
        metrics["epochs"] = trainer.current_epoch
        metrics["best_checkpoint"] = ckpt or None
    finally:
        close_loggers(loggers)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("test/acc", "test/f1_macro") if k in metrics)
    if privacy is not None:
        shown += " " + privacy_summary([privacy])
    log.info("outputs in %s %s", out, shown)
    print(f"Done: outputs in {out} {shown}")
    return metrics
