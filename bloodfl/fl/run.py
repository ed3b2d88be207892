"""Federated training from a composed Hydra config (``federate.py``): data -> shards -> clients -> rounds.

Everything centralized training configures (data set, model, split, augmentation, loader, optimizer, trainer,
logger) means the same here; ``fl.*`` adds the federation. The run directory gets, besides ``splits.csv``:
``partition.csv`` (images per client and class), ``rounds.csv``, ``rounds.png``, ``checkpoints/round_NNN.pt``
and, when all rounds are done, ``metrics.json`` for the final global model.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bloodfl.console import print_config_tree
from bloodfl.data.checks import class_weights
from bloodfl.data.datamodule import ArrayDataModule, BloodDataModule
from bloodfl.errors import BloodflError
from bloodfl.evaluation.report import class_report
from bloodfl.fl.client import FLClient, carve_validation
from bloodfl.fl.evaluator import GlobalEvaluator
from bloodfl.fl.loop import RoundSettings, Simulation, checkpoint_path, list_checkpoints, load_checkpoint
from bloodfl.fl.partition import class_count_table, partition, print_partition, save_partition_csv
from bloodfl.fl.strategy import Weights, build_strategy, weights_of
from bloodfl.privacy.integration import attach_client_privacy, dp_settings, privacy_summary, write_privacy_json
from bloodfl.training.module import ClassifierModule
from bloodfl.training.run import build_datamodule, build_module, close_loggers, instantiate_all

log = logging.getLogger("bloodfl")

# pl.Trainer arguments a client or the evaluator must not take from ``trainer.*``: it sets them itself
_TRAINER_OWN = {"_target_", "default_root_dir", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time",
                "callbacks", "logger", "enable_checkpointing", "enable_model_summary", "num_sanity_val_steps",
                "enable_progress_bar"}
# settings that may change between a killed run and its resumption (all others must match)
_RESUME_FREE = ("paths", "hydra", "logger", "callbacks", "task_name", "test", "optimized_metric", "fl.resume",
                "fl.rounds", "fl.keep_checkpoints", "fl.progress_bar", "trainer.default_root_dir",
                "trainer.enable_progress_bar", "loader.num_workers")

ClientHook = Callable[[FLClient, DictConfig], None]


def client_trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    out = {k: v for k, v in kwargs.items() if k not in _TRAINER_OWN}
    out["enable_progress_bar"] = bool(cfg.fl.get("progress_bar", False))
    return out


def fingerprint(cfg: DictConfig) -> dict[str, str]:
    """Flat ``key -> value`` of every setting that decides the results (interpolations left unresolved)."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            if not any(key == f or key.startswith(f + ".") for f in _RESUME_FREE):
                flat[key] = repr(node)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return flat


def _check_same_config(saved: dict[str, str], now: dict[str, str]) -> None:
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')} -> {now.get(k, '<unset>')}" for k in changed[:5])
        raise BloodflError(f"fl.resume=true with settings that differ from the interrupted run ({shown}); "
                           "resume with the same command line plus fl.resume=true")


def claim_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """The newest round checkpoint to resume from, or None to start at round 1; refuses finished runs."""
    if (out / "metrics.json").exists():
        raise BloodflError(f"{out} already holds a finished run (metrics.json); choose another hydra.run.dir")
    ckpts = list_checkpoints(out)
    if not resume:
        if ckpts:
            raise BloodflError(f"{out} holds an unfinished federated run (round {ckpts[-1][0]} done); continue it "
                               "with fl.resume=true or choose another hydra.run.dir")
        out.mkdir(parents=True, exist_ok=True)
        return None
    if ckpts:
        return load_checkpoint(ckpts[-1][1])
    if not (out / "partition.csv").exists():
        raise BloodflError(f"fl.resume=true but {out} holds no federated run; pass the interrupted run's directory "
                           "as hydra.run.dir=<dir>")
    log.warning("fl.resume=true: no round was finished in %s, starting at round 1", out)
    return None


def _resume_hint(out: Path) -> None:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (tests, notebooks)
        return
    args = " ".join([*(o for o in overrides if not o.startswith(("fl.resume=", "hydra.run.dir="))),
                     "fl.resume=true", f"hydra.run.dir={out}"])
    log.info("if this run is interrupted, continue it with: python federate.py %s", args)


def _client_datamodule(cfg: DictConfig, dm: BloodDataModule, train: Any, val: Any) -> ArrayDataModule:
    augment = instantiate(cfg.augment) if cfg.get("augment") and cfg.augment.get("_target_") else None
    return ArrayDataModule(dm.images, dm.labels, train_idx=train, val_idx=val, batch_size=cfg.loader.batch_size,
                           augment=augment, normalize=dm.normalization, seed=cfg.seed,
                           num_workers=cfg.loader.num_workers, classes=dm.classes)


def build_clients(cfg: DictConfig, dm: BloodDataModule, shards: list[Any], template: ClassifierModule,
                  trainer_kwargs: dict[str, Any]) -> list[FLClient]:
    """One client per shard, each with its own data module, local validation share and model copy."""
    clients = []
    for cid, shard in enumerate(shards):
        train, val = carve_validation(shard, dm.labels, float(cfg.fl.val_fraction), seed=cfg.seed + cid)
        data = _client_datamodule(cfg, dm, train, val)
        local_weights = class_weights(data.class_counts("train").tolist()) if cfg.get("class_weights") else None
        module = ClassifierModule(copy.deepcopy(template.net), num_classes=dm.num_classes, lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, class_weights=local_weights,
                                  scheduler=cfg.optim.get("scheduler"))
        clients.append(FLClient(cid, module, data, trainer_kwargs))
    return clients


def federate(cfg: DictConfig, client_hook: ClientHook | None = None) -> dict[str, Any]:
    """Run (or resume) a federated simulation; returns the final metrics written to metrics.json.

    client_hook(client, cfg): called once per client after it is built, e.g. to attach ``client.privacy``;
    with dp=true and no hook given, bloodfl.privacy's ``attach_client_privacy`` (one accountant per client).
    """
    print_config_tree(cfg)
    if client_hook is None and dp_settings(cfg) is not None:
        client_hook = attach_client_privacy
    fl = cfg.fl
    settings = RoundSettings(rounds=int(fl.rounds), local_epochs=int(fl.local_epochs),
                             fraction_fit=float(fl.fraction_fit), seed=int(cfg.seed),
                             keep_checkpoints=fl.get("keep_checkpoints"))
    out = Path(cfg.paths.output_dir)
    state = claim_run_dir(out, bool(fl.resume))
    fp = fingerprint(cfg)
    if state is not None:
        _check_same_config(state["meta"]["fingerprint"], fp)
        if state["round"] > settings.rounds:
            raise BloodflError(f"the run already finished round {state['round']} > fl.rounds={settings.rounds}; "
                               f"set fl.rounds >= {state['round']}")
        log.info("resuming after round %d from %s", state["round"], out)
    _resume_hint(out)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same order as train(): same initial weights
    dm = build_datamodule(cfg)
    dm.setup("fit")
    dm.save_splits(out / "splits.csv")
    assert dm.table is not None
    shards = partition(dm.labels, dm.idx["train"], int(fl.num_clients), str(fl.partition), seed=int(cfg.seed),
                       alpha=float(fl.alpha), groups=dm.table.groups, min_size=fl.get("min_size"))
    counts = class_count_table(dm.labels, shards, dm.num_classes)
    print_partition(counts, dm.classes, title=f"fl.partition={fl.partition}: images per client and class")
    save_partition_csv(out / "partition.csv", counts, dm.classes)

    global_module = build_module(cfg, dm)  # the evaluator's model; clients get copies of its initial net
    trainer_kwargs = client_trainer_kwargs(cfg)
    clients = build_clients(cfg, dm, shards, global_module, trainer_kwargs)
    for client in clients:
        if client_hook is not None:
            client_hook(client, cfg)
    held_out = ArrayDataModule(dm.images, dm.labels, val_idx=dm.idx["val"], test_idx=dm.idx["test"],
                               batch_size=cfg.loader.batch_size, normalize=dm.normalization,
                               num_workers=cfg.loader.num_workers, classes=dm.classes)
    evaluator = GlobalEvaluator(global_module, held_out, trainer_kwargs)

    initial = weights_of(global_module.net)
    strategy = build_strategy(str(fl.strategy), mu=float(fl.mu), eta=fl.get("server_lr"))
    strategy.initialize(initial, param_names=[n for n, p in global_module.net.named_parameters() if p.requires_grad])
    loggers = instantiate_all(cfg.get("logger"))
    eval_split = "test" if cfg.get("test", True) else "val"
    sim = Simulation(clients, strategy, evaluator, settings, out, initial, meta={"fingerprint": fp},
                     loggers=loggers, eval_split=eval_split)
    if state is not None:
        sim.restore(state)
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        sim.replay_to_loggers()
        final = sim.run()
        metrics = _final_metrics(sim, evaluator, final, out, dm.classes)
        privacies = [c.privacy for c in sim.clients if c.privacy is not None]
        if privacies:
            doc = write_privacy_json(out / "privacy.json", privacies, OmegaConf.to_container(cfg.dp, resolve=True))
            metrics["dp/epsilon_max"], metrics["dp/delta"] = doc["worst"]["epsilon"], doc["worst"]["delta"]
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=settings.rounds)
            lg.finalize("success")
    finally:
        close_loggers(loggers)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("test/acc", "test/f1_macro") if k in metrics)
    if privacies:
        shown += " " + privacy_summary(privacies)
    log.info("outputs in %s %s", out, shown)
    print(f"Done: outputs in {out} {shown}")
    return metrics


def _final_metrics(sim: Simulation, evaluator: GlobalEvaluator, final: Weights, out: Path,
                   classes: list[str]) -> dict[str, Any]:
    """The final global model on the central validation split and (unless test=false) the test split, with
    the per-class report train() writes (test_per_class.csv, test_confusion_matrix.csv)."""
    metrics: dict[str, Any] = {}
    if evaluator.has("val"):  # for sweeps: an optimised metric that is not a test value
        metrics.update(evaluator.evaluate(final, "val"))
    if sim.eval_split == "test":
        metrics.update({k: float(v) for k, v in sim.history[-1].items() if k.startswith("test/")})
        module = evaluator.module
        if module.test_probs is None:  # resumed after the last round: predictions were not kept
            evaluator.evaluate(final, "test")
        report = class_report(module.test_probs, module.test_targets, classes)
        report.write(out)
        metrics["test/auroc_macro"] = report.auroc_macro
    s = sim.settings
    metrics.update({"rounds": s.rounds, "local_epochs": s.local_epochs, "num_clients": len(sim.clients),
                    "strategy": sim.strategy.name, "final_checkpoint": str(checkpoint_path(out, s.rounds))})
    return metrics
