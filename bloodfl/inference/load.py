"""A finished run's model with its preprocessing and class names, from nothing but its run directory.

Which weights: the model the run itself reports — a centralized run's ``best_checkpoint`` (lowest ``val/loss``,
the one it tested), a federated run's ``selected_checkpoint`` (the round it tested: the last, or the best by
validation with ``fl.select=best``; older runs: ``final_checkpoint``). Checkpoints are read
with ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code. The network is
rebuilt by the composition root from the run's own ``.hydra/config.yaml`` (DP runs get the same GroupNorm and
other replacements they were trained with), so the saved weights load strictly.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bloodfl.compose import Root
from bloodfl.data.datamodule import resolve_normalization
from bloodfl.data.preprocessing import PREPROCESSING_FILE, Preprocess, load_preprocessing
from bloodfl.errors import BloodflError
from bloodfl.fl.loop import list_checkpoints

log = logging.getLogger("bloodfl")

CONFIG_FILE = Path(".hydra") / "config.yaml"


class LoadedRun(NamedTuple):
    model: nn.Module        # in eval mode; returns logits (softmax gives the run's probabilities)
    preprocess: Preprocess  # image file -> the tensor the run's evaluation would have fed the model
    classes: list[str]      # class names in the order of the model's outputs


class Checkpoint(NamedTuple):
    path: Path
    kind: str  # "lightning" (train.py) or "round" (federate.py)
    what: str  # for the user: which of the run's models this is


def run_config(run_dir: Path) -> DictConfig:
    """The run's composed config; ``paths.output_dir`` points at ``run_dir`` (Hydra's resolver for it exists only
    inside the Hydra app that made the run)."""
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise BloodflError(f"run={run_dir}: no such directory; give a run directory such as "
                           "logs/train/runs/<timestamp>")
    if not path.is_file():
        raise BloodflError(f"run={run_dir} is not a bloodfl run directory (no {CONFIG_FILE}); give the directory "
                           "train.py or federate.py wrote, such as logs/train/runs/<timestamp>")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _recorded(path: str, run_dir: Path) -> Path | None:
    """A checkpoint path metrics.json recorded: as written, or by name inside the run directory (the run may have
    been moved, or have recorded a path relative to the directory it was started from)."""
    given = Path(path)
    if given.is_file() and run_dir.resolve() in given.resolve().parents:
        return given
    found = sorted(run_dir.rglob(given.name))
    return found[0] if found else None


def find_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The checkpoint of the model the run reports (see the module docstring)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    try:
        metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except ValueError as exc:
        raise BloodflError(f"{metrics_path} is not valid JSON ({exc}); restore it or retrain") from None
    last = run_dir / "checkpoints" / "last.ckpt"
    if "best_checkpoint" in metrics and not metrics["best_checkpoint"] and last.is_file():
        # no best checkpoint was saved (e.g. dp=true: DP-SGD's own optimizer steps leave Lightning's global_step at
        # 0, so ModelCheckpoint saves only last.ckpt): the run then tested its final weights, which last.ckpt holds
        return Checkpoint(last, "lightning", "the final weights the run tested (last.ckpt; it saved no best)")
    for key, kind, what in (("selected_checkpoint", "round", "the global model the run tested"),
                            ("final_checkpoint", "round", "the final global model"),
                            ("best_checkpoint", "lightning", "the best checkpoint by val/loss")):
        if key not in metrics:
            continue
        if not metrics[key]:
            raise BloodflError(f"run={run_dir} saved no checkpoint (trained with callbacks=none or fast_dev_run); "
                               "retrain it with callbacks=default")
        found = _recorded(str(metrics[key]), run_dir)
        if found is None:
            raise BloodflError(f"run={run_dir}: its {key} {Path(metrics[key]).name} is missing from the run "
                               "directory; restore the checkpoints/ folder or retrain")
        return Checkpoint(found, kind, f"{what} ({found.name})")
    # no metrics.json: an unfinished run; its newest round, or the best checkpoint so far
    rounds = list_checkpoints(run_dir)
    if rounds:
        return Checkpoint(rounds[-1][1], "round", f"round {rounds[-1][0]} of an unfinished run")
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    if len(best) == 1:
        return Checkpoint(best[0], "lightning", f"the best checkpoint so far of an unfinished run ({best[0].name})")
    raise BloodflError(f"run={run_dir} has no usable checkpoint (no metrics.json, no checkpoints/best-*.ckpt or "
                       "round_NNN.pt); give a run that trained with callbacks=default, or a federated run")


def _weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The network's state dict from a Lightning checkpoint (keys ``net.*``) or a federated round checkpoint."""
    try:
        state = torch.load(ckpt.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or pickled-code files: one line, not a traceback
        raise BloodflError(f"cannot read checkpoint {ckpt.path} ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                           "restore it from a backup or retrain") from None
    if ckpt.kind == "round":
        weights = state.get("weights") if isinstance(state, dict) else None
    else:
        lightning = state.get("state_dict") if isinstance(state, dict) else None
        # the module's other entries (e.g. a class-weighted loss's weight) are not the network's
        weights = None if lightning is None else {k[4:]: v for k, v in lightning.items() if k.startswith("net.")}
    if not weights:
        raise BloodflError(f"checkpoint {ckpt.path} holds no model weights; restore it from a backup or retrain")
    return weights


def _fallback_inputs(root: Root, run_dir: Path) -> tuple[Preprocess, list[str]]:
    """Preprocessing and classes of a run written before preprocessing.json existed, from its config."""
    settings = root.input_settings()
    mean_std = resolve_normalization(settings["normalize"])
    if mean_std is None:
        raise BloodflError(f"run={run_dir} predates {PREPROCESSING_FILE} and used normalize=train, whose "
                           "statistics it did not record; retrain it with this version of bloodfl")
    classes = settings["classes"]
    if classes is None:  # discovered from the folders: sorted names, as the imagefolder source sorts them
        with open(run_dir / "splits.csv", newline="") as fh:
            classes = sorted({row["label"] for row in csv.DictReader(fh)})
    pre = Preprocess(settings["image_size"], settings["resize"], tuple(mean_std[0]), tuple(mean_std[1]))
    return pre, list(classes)


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The model a run reports, in eval mode on ``device``, with its preprocessing and class names."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    root = Root(cfg)
    if (run_dir / PREPROCESSING_FILE).is_file():
        preprocess, classes = load_preprocessing(run_dir / PREPROCESSING_FILE)
    else:
        preprocess, classes = _fallback_inputs(root, run_dir)
    ckpt = find_checkpoint(run_dir)
    weights = _weights(ckpt)
    net = root.trained_network(len(classes))
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise BloodflError(f"checkpoint {ckpt.path} does not fit the model its run's config builds ({detail}); "
                           "was the run directory's config edited?") from None
    log.info("loaded %s from %s", ckpt.what, ckpt.path)
    return LoadedRun(net.eval().to(device), preprocess, classes)
