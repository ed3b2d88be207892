"""The composition root: every object a run needs, built from the Hydra config in this one place.

``train.py`` and ``federate.py`` hand the composed config to :class:`Root`; the tasks
(``bloodfl.training.run``, ``bloodfl.fl.run``) and the run skeleton (``bloodfl.runner``) ask it for plain
objects — a DataModule, a network, a LightningModule with its partial optimizer, trainers, loggers, a strategy,
each client's privacy accountant — and never read the config themselves. Objects a library or a class of ours
can name are built by ``_target_`` (``hydra.utils.instantiate``); the few settings that are not objects come
out as typed values (``RoundSettings``, ``DPSettings``).

Following one setting: ``dp.max_grad_norm`` -> :meth:`Root.dp_settings` (``DPSettings``) ->
:meth:`Root.client_privacy` (``ClientPrivacy``) -> ``PrivateTraining`` (clips each per-sample gradient to it);
``fl.local_epochs`` -> :meth:`Root.round_settings` -> ``Simulation.run_round`` -> ``FLClient.fit`` ->
the local trainer's ``max_epochs``.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bloodfl.config import dp_default_model, instantiate
from bloodfl.data.datamodule import ArrayDataModule, BloodDataModule
from bloodfl.errors import BloodflError
from bloodfl.models import format_params
from bloodfl.privacy.engine import ClientPrivacy, DPSettings, prepare_model
from bloodfl.training.module import ClassifierModule

log = logging.getLogger("bloodfl")

# settings that may change between a killed federated run and its resumption (all others must match)
RESUME_FREE = ("paths", "hydra", "logger", "callbacks", "task_name", "test", "optimized_metric", "fl.resume",
               "fl.rounds", "fl.keep_checkpoints", "fl.progress_bar", "trainer.default_root_dir",
               "trainer.enable_progress_bar", "loader.num_workers", "fl.flower")

TrainerFactory = Callable[..., pl.Trainer]


def _instantiate_each(node: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a group such as ``callbacks`` or ``logger`` (null entries switch one off)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


class Root:
    """Builds a run's objects from its config. One per run; cheap to create."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._dp_mode: str | None = None  # how per-sample gradients are computed, fixed when the network is built

    # ---- plain settings ----------------------------------------------------------------------------------

    @property
    def task_name(self) -> str:
        return str(self.cfg.get("task_name", "train"))

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def evaluate_test(self) -> bool:
        """Evaluate on the test split at the end (``test=false`` while tuning)."""
        return bool(self.cfg.get("test", True))

    @property
    def evaluate_on_training_images(self) -> bool:
        """``evaluation.on_training_images``: ONLY to measure papers/003's flaw (its 99.91% was measured on images
        it trained on). The selected model is also evaluated on its own training split, under ``train_eval/*``
        and ``train_eval_*`` files, never under ``test/*``; the held-out test evaluation is unchanged."""
        return bool(self.cfg.get("evaluation", {}).get("on_training_images", False))

    @property
    def bootstrap_resamples(self) -> int:
        return int(self.cfg.get("evaluation", {}).get("bootstrap", 1000))

    def title(self) -> str:
        """What a figure shows: data set, model, split (and fold), federation and DP."""
        cfg = self.cfg
        split = f"split {cfg.split.name}"
        if cfg.split.kind == "kfold":
            split += f" fold {cfg.split.fold}/{cfg.split.k}"
        parts = [str(cfg.dataset.name), str(cfg.model.name), split]
        if "fl" in cfg:
            parts.append(f"federated, {cfg.fl.num_clients} clients ({cfg.fl.partition})")
        if self.dp_settings() is not None:
            parts.append("DP")
        return ", ".join(parts)

    @property
    def image_size(self) -> int:
        return int(self.cfg.dataset.image_size)

    @property
    def resize(self) -> str:
        """How images are fitted to ``image_size`` (``dataset.resize``: stretch or pad)."""
        return str(self.cfg.dataset.get("resize", "stretch"))

    def config_dict(self) -> dict[str, Any]:
        """The resolved config, for loggers' hyper-parameters."""
        out = OmegaConf.to_container(self.cfg, resolve=True)
        assert isinstance(out, dict)
        return out

    def fingerprint(self) -> dict[str, str]:
        """Flat ``key -> value`` of every setting that decides a federated run's results (checked on resume)."""
        flat: dict[str, str] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{prefix}{k}.")
            else:
                key = prefix[:-1]
                if not any(key == f or key.startswith(f + ".") for f in RESUME_FREE):
                    flat[key] = repr(node)

        walk(OmegaConf.to_container(self.cfg, resolve=False), "")
        return flat

    def resume_command(self, out: Path) -> str | None:
        """The command line that continues this federated run, or None outside a Hydra app."""
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:  # not launched by Hydra (tests, notebooks)
            return None
        kept = [o for o in overrides if not o.startswith(("fl.resume=", "hydra.run.dir="))]
        return " ".join(["python federate.py", *kept, "fl.resume=true", f"hydra.run.dir={out}"])

    # ---- data ----------------------------------------------------------------------------------------------

    def augmentation(self) -> nn.Module | None:
        node = self.cfg.get("augment")
        return instantiate(node) if node and node.get("_target_") else None

    def datamodule(self) -> BloodDataModule:
        cfg = self.cfg
        self._log_image_size()
        self._check_dp_inputs()
        return BloodDataModule(dataset=cfg.dataset, split=cfg.split, augment=self.augmentation(),
                               batch_size=int(cfg.loader.batch_size), seed=self.seed,
                               cache_dir=cfg.paths.get("cache_dir"), num_workers=int(cfg.loader.num_workers),
                               augmult=self.augmult())

    def client_datamodule(self, dm: BloodDataModule, train_idx: np.ndarray, val_idx: np.ndarray,
                          normalize: dict[str, list[float]] | None = None) -> ArrayDataModule:
        """A federated client's own loaders over its shard of the decoded images; ``normalize``: the federation's
        constants where they are not ``dm``'s (a deployed site normalises as the server does)."""
        cfg = self.cfg
        return ArrayDataModule(dm.images, dm.labels, train_idx=train_idx, val_idx=val_idx,
                               batch_size=int(cfg.loader.batch_size), augment=self.augmentation(),
                               normalize=normalize or dm.normalization, seed=self.seed,
                               num_workers=int(cfg.loader.num_workers), classes=dm.classes, augmult=self.augmult())

    def augmult(self) -> int:
        """``dp.augmult``: augmented views per training image (0 without DP or with the recipe off)."""
        plan = self.dp_settings()
        if plan is None or plan.augmult <= 1:
            return 0
        from bloodfl.data.augment import NoAugment

        if isinstance(self.augmentation() or NoAugment(), NoAugment):
            raise BloodflError(f"dp.augmult={plan.augmult} averages gradients over random augmentations, but "
                               "augment=none; choose one (e.g. augment=flips) or set dp.augmult=0")
        return plan.augmult

    def held_out_datamodule(self, dm: BloodDataModule) -> ArrayDataModule:
        """The central validation and test images, for the federated server's evaluation of the global model."""
        return ArrayDataModule(dm.images, dm.labels, val_idx=dm.idx["val"], test_idx=dm.idx["test"],
                               batch_size=int(self.cfg.loader.batch_size), normalize=dm.normalization,
                               num_workers=int(self.cfg.loader.num_workers), classes=dm.classes)

    def input_settings(self) -> dict[str, Any]:
        """A finished run's inputs as its config gives them (for runs older than ``preprocessing.json``): image size,
        resize mode, the ``normalize`` setting, and the listed classes (None where the data set discovers them)."""
        ds = self.cfg.dataset
        normalize = ds.get("normalize", "imagenet")
        if isinstance(normalize, DictConfig):
            normalize = OmegaConf.to_container(normalize, resolve=True)
        classes = ds.get("classes")
        if classes is not None:
            drop = {str(c) for c in ds.get("drop_classes") or []}
            classes = [str(c) for c in classes if str(c) not in drop]
        return {"image_size": self.image_size, "resize": self.resize, "normalize": normalize, "classes": classes}

    def _log_image_size(self) -> None:
        """Say so when the data set's default size was raised to the model's minimum (conf: ``at_least``)."""
        raw = str(OmegaConf.to_container(self.cfg.dataset, resolve=False).get("image_size"))
        match = re.fullmatch(r"\$\{at_least:(\d+),.*\}", raw)
        if match and int(match.group(1)) < self.image_size:
            log.info("dataset.image_size=%d: raised from the data set's %s px to %s's minimum input size",
                     self.image_size, match.group(1), self.cfg.model.name)

    # ---- model ---------------------------------------------------------------------------------------------

    def network(self, num_classes: int) -> nn.Module:
        """The model config's backbone with the papers' head; DP-compatible layers when dp=true."""
        net = instantiate(self.cfg.model, num_classes=num_classes, image_size=self.image_size, _convert_="all")
        params = sum(p.numel() for p in net.parameters())
        log.info("model: %s, %s parameters, %d px input, %d classes", self.cfg.model.name, format_params(params),
                 self.image_size, num_classes)
        plan = self.dp_settings()
        if plan is not None:  # before any optimizer exists and before federated clients copy the network
            net, changes, self._dp_mode = prepare_model(net, (3, self.image_size, self.image_size),
                                                        plan.model_mode)
            for change in changes:
                log.info("dp: %s", change)
            default = dp_default_model()
            if self.cfg.model.name == default:
                log.info("dp: model %s is dp=true's default (docs/privacy.md); model=<name> trains another", default)
            elif OmegaConf.is_interpolation(self.cfg.optim, "lr"):  # the rate came from dp.lr, not the user
                log.warning("dp: optim.lr=%g is dp=true's rate for %s; %s needs its own (dp_cnn: 1e-2, "
                            "docs/privacy.md): give optim.lr=<rate>", self.cfg.optim.lr, default,
                            self.cfg.model.name)
            log.info("dp: per-sample gradients by %s",
                     "ghost clipping" if self._dp_mode == "ghost" else "per-sample hooks")
        return net

    def trained_network(self, num_classes: int) -> nn.Module:
        """A finished run's network, for its checkpoint to be loaded into: the layers it was trained with (DP's
        replacements included), without reading ``model.weights`` or fetching timm's ImageNet weights, which the
        checkpoint replaces anyway (and which may be gone, or offline, by now). torchvision's ``pretrained`` is
        kept: it also switches GoogLeNet's input transform, which is no weight."""
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            cfg.model.weights = None
            if cfg.model.get("source") != "torchvision":
                cfg.model.pretrained = False
        return Root(cfg).network(num_classes)

    def optimizer(self) -> Callable[..., Any]:
        """``optim.optimizer``: a partial optimizer that the module completes with its parameters."""
        return instantiate(self.cfg.optim.optimizer)

    def scheduler(self) -> dict[str, Any] | None:
        """``optim.scheduler`` names one of ``optim.schedulers``: a partial scheduler and Lightning's settings."""
        name = self.cfg.optim.get("scheduler")
        if name in (None, "none"):
            return None
        table = self.cfg.optim.get("schedulers") or {}
        if name not in table:
            raise BloodflError(f"unknown optim.scheduler {name!r}; valid: null, {', '.join(table)}")
        if name == "plateau" and self.dp_settings() is not None:
            raise BloodflError("optim.scheduler=plateau reacts to validation loss, which is not protected by DP "
                               "(it would release client data); use optim.scheduler=cosine or null with dp=true")
        return instantiate(table[name])

    def module(self, net: nn.Module, num_classes: int, class_counts: np.ndarray | None = None,
               privacy: ClientPrivacy | None = None) -> ClassifierModule:
        """The LightningModule; ``class_counts`` of its training data when ``class_weights=true``."""
        weights = None
        if self.cfg.get("class_weights"):
            from bloodfl.data.checks import class_weights

            assert class_counts is not None
            weights = class_weights(np.asarray(class_counts).tolist())
        return ClassifierModule(net, num_classes=num_classes, optimizer=self.optimizer(),
                                scheduler=self.scheduler(), class_weights=weights, privacy=privacy)

    # ---- training loop ---------------------------------------------------------------------------------------

    def callbacks(self) -> list[pl.Callback]:
        # finetune=frozen|two_phase: a callback freezing the backbone (conf/finetune, bloodfl/training/finetune.py)
        finetune = _instantiate_each(self.cfg.get("finetune"))
        return [*_instantiate_each(self.cfg.get("callbacks")), *finetune, *self._ema()]

    def _ema(self) -> list[pl.Callback]:
        """``dp.ema``: Lightning's EMAWeightAveraging (bloodfl/training/averaging.py), so the averaged weights are
        the ones validated, checkpointed (hence selected), tested and left in the model at the end.
        Post-processing of the DP-SGD iterates (the accountant already covers releasing every one): free."""
        plan = self.dp_settings()
        if plan is None or plan.ema is None:
            return []
        from bloodfl.training.averaging import EvaluatedEMA

        return [EvaluatedEMA(decay=float(plan.ema))]

    def loggers(self) -> list[Any]:
        return _instantiate_each(self.cfg.get("logger"))

    def trainer(self, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
        self._check_precision()
        return instantiate(self.cfg.trainer, callbacks=callbacks, logger=loggers or False)

    def trainer_factory(self) -> TrainerFactory:
        """``trainer.*`` for trainers that set their own epochs, callbacks and outputs (federated clients, the
        server's evaluator): keyword arguments given to the factory replace the config's."""
        self._check_precision()
        base = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                    enable_progress_bar=bool(self.cfg.get("fl", {}).get("progress_bar", False)))
        return functools.partial(instantiate, self.cfg.trainer, **base)

    def _check_dp_inputs(self) -> None:
        """What DP does not protect must not be computed from the private images."""
        if self.dp_settings() is not None and self.cfg.dataset.get("normalize") == "train":
            raise BloodflError("dataset.normalize=train computes per-channel statistics of the private training "
                               "images, which DP does not protect (and a federated server may not have); with "
                               "dp=true give constants: dataset.normalize='{mean: [r, g, b], std: [r, g, b]}'")

    def _check_precision(self) -> None:
        if self.dp_settings() is not None:
            from bloodfl.privacy.engine import check_precision

            check_precision(self.cfg.trainer.get("precision"))

    # ---- privacy ---------------------------------------------------------------------------------------------

    def dp_settings(self) -> DPSettings | None:
        """The ``dp`` group as settings, or None with dp=false."""
        node = self.cfg.get("dp")
        if node is None:
            return None
        return DPSettings.from_config(OmegaConf.to_container(node, resolve=True))

    def client_privacy(self, name: str, num_samples: int, steps_per_epoch: int, epochs: int) -> ClientPrivacy | None:
        """One accountant for every DP step a client (or the centralized trainer) takes in the whole run.
        ``steps_per_epoch``: the plain training loader's batches (replaced by n // dp.expected_batch_size)."""
        settings = self.dp_settings()
        if settings is None:
            return None
        mode = self._dp_mode
        if mode is None:
            raise BloodflError("dp=true but the network was not built by Root.network, so it is not DP-ready")
        steps = settings.steps_per_epoch(num_samples, steps_per_epoch)  # dp.expected_batch_size, when set
        return ClientPrivacy(settings, num_samples=num_samples, steps_per_epoch=steps,
                             total_steps=epochs * steps, grad_sample_mode=mode, name=name)

    def dp_record(self) -> dict[str, Any]:
        """The dp settings as given, for privacy.json."""
        out = OmegaConf.to_container(self.cfg.dp, resolve=True)
        assert isinstance(out, dict)
        # the rest of the recipe, as run (dp=true's defaults or what the command line gave)
        out["model"] = self.cfg.model.name
        out["optim.lr"] = self.cfg.optim.lr
        if "fl" in self.cfg:
            out["fl.local_epochs"] = self.cfg.fl.local_epochs
        if "fl" in self.cfg:  # what else the server learns about each client: declared public metadata
            out["fl.weighting"] = "examples (clients' counts sent to the server, not protected by DP)" \
                if self.release_counts() else "uniform (counts stay with the clients)"
        return out

    def centralized_epochs(self) -> int:
        epochs = self.cfg.trainer.get("max_epochs")
        if self.dp_settings() is not None and (epochs is None or int(epochs) < 1):
            raise BloodflError("dp=true needs a finite trainer.max_epochs to plan the privacy budget")
        return int(epochs or 1)

    # ---- federation ------------------------------------------------------------------------------------------

    def check_federated(self) -> None:
        """Settings that centralized training honours but a federation cannot (yet): refused, never ignored."""
        finetune = self.cfg.get("finetune") or {}
        if finetune.get("callback"):
            raise BloodflError("finetune=frozen/two_phase is not supported by federate.py (clients train the whole "
                               "network each round); use finetune=full, or train.py for the fine-tuning schemes")
        if self.evaluate_on_training_images:
            raise BloodflError("evaluation.on_training_images=true (papers/003's flaw) is implemented for train.py "
                               "only; federated clients' training images never leave them")
        plan = self.dp_settings()
        if plan is not None and plan.ema is not None:  # docs/privacy.md: a server-side EMA is the planned design
            raise BloodflError("dp.ema (an EMA of the weights) is implemented for train.py only, not yet for "
                               "federate.py; set dp.ema=null")

    @property
    def fl(self) -> DictConfig:
        return self.cfg.fl

    @property
    def fl_backend(self) -> str:
        """``fl.backend``: ``inprocess`` (bloodfl.fl.loop) or ``flower`` (bloodfl.fl.flower)."""
        backend = str(self.fl.get("backend", "inprocess"))
        if backend not in ("inprocess", "flower"):
            raise BloodflError(f"unknown fl.backend {backend!r}; valid: inprocess, flower")
        if backend == "flower":
            try:
                import flwr  # noqa: F401
            except ImportError:
                raise BloodflError("fl.backend=flower needs Flower: pip install -e '.[flower]'") from None
        return backend

    def flower_settings(self) -> dict[str, Any]:
        """``fl.flower``: the simulation runtime's resources and the server's waiting times."""
        node = self.fl.get("flower") or {}
        out = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        assert isinstance(out, dict)
        return out

    def round_settings(self) -> Any:
        from bloodfl.fl.loop import RoundSettings

        fl = self.fl
        return RoundSettings(rounds=int(fl.rounds), local_epochs=int(fl.local_epochs),
                             fraction_fit=float(fl.fraction_fit), seed=self.seed,
                             keep_checkpoints=fl.get("keep_checkpoints"), eval_every=int(fl.get("eval_every", 1)),
                             select=str(fl.get("select", "last")), monitor=str(fl.get("monitor", "val/loss")),
                             mode=str(fl.get("mode", "min")), bn_stats=str(fl.get("bn_stats", "recompute")),
                             bn_batches=int(fl.get("bn_batches", 2)))

    def shards(self, dm: BloodDataModule) -> list[np.ndarray]:
        from bloodfl.fl.partition import partition

        fl = self.fl
        assert dm.table is not None
        return partition(dm.labels, dm.idx["train"], int(fl.num_clients), str(fl.partition), seed=self.seed,
                         alpha=float(fl.alpha), groups=dm.table.groups, min_size=fl.get("min_size"))

    def release_counts(self) -> bool:
        """Whether clients send their example counts (FedAvg weighting) — ``fl.weighting``; not under DP by
        default, since a count is client data that DP does not protect."""
        weighting = str(self.fl.get("weighting", "auto"))
        if weighting not in ("auto", "examples", "uniform"):
            raise BloodflError(f"unknown fl.weighting {weighting!r}; valid: auto, examples, uniform")
        if weighting == "auto":
            return self.dp_settings() is None
        return weighting == "examples"

    def client_split(self, dm: BloodDataModule, shard: np.ndarray, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """A client's (train, local validation) indices: the same group-aware hold-out as the central split."""
        from bloodfl.data.splits import holdout

        groups = None if dm.split_groups is None else np.asarray(dm.split_groups, dtype=object)
        return holdout(dm.labels, groups, float(self.fl.val_fraction), self.seed + cid, np.sort(shard), strict=False)

    def strategy(self) -> Any:
        name = str(self.fl.strategy)
        table = self.fl.get("strategies") or {}
        if name not in table:
            raise BloodflError(f"unknown fl.strategy {name!r}; valid: {', '.join(table)}")
        return instantiate(table[name])
