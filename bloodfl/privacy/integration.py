"""Glue between the ``dp`` config group and the training entry points (train.py, federate.py).

* ``build_module`` -> ``make_net_private(net, cfg)``: DP-compatible layers, checked on a dry run, before the
  optimizer exists (and before federated clients copy the network).
* ``train``        -> ``centralized_privacy(cfg, dm, net)``: its ``callback()`` joins the trainer's callbacks.
* ``federate``     -> ``attach_client_privacy`` as the client hook: one ``ClientPrivacy`` per client.
* at the end       -> ``write_privacy_json`` and ``privacy_summary`` (the worst client's ε).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bloodfl.errors import BloodflError
from bloodfl.privacy.engine import ClientPrivacy, DPSettings, prepare_model

log = logging.getLogger("bloodfl")

_MODE_ATTR = "dp_grad_sample_mode"  # set on the network by make_net_private; copies of the net carry it


def dp_settings(cfg: DictConfig) -> DPSettings | None:
    """The run's DP settings, or None with dp=false (or no dp group)."""
    node = cfg.get("dp")
    if node is None:
        return None
    return DPSettings.from_config(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig)
                                  else node)


def make_net_private(net: nn.Module, cfg: DictConfig) -> nn.Module:
    """With dp=true: replace what Opacus cannot train (logged), prove it on a dry run, pick the DP mode."""
    settings = dp_settings(cfg)
    if settings is None:
        return net
    size = int(cfg.dataset.image_size)
    net, changes, mode = prepare_model(net, (3, size, size), settings.grad_sample_mode)
    for change in changes:
        log.info("dp: %s", change)
    log.info("dp: per-sample gradients by %s", "ghost clipping" if mode == "ghost" else "per-sample hooks")
    setattr(net, _MODE_ATTR, mode)
    return net


def _mode_of(net: nn.Module) -> str:
    mode = getattr(net, _MODE_ATTR, None)
    if mode is None:
        raise BloodflError("dp=true but the network was not prepared for DP (make_net_private was not called)")
    return mode


def _max_epochs(cfg: DictConfig) -> int:
    epochs = cfg.trainer.get("max_epochs")
    if epochs is None or int(epochs) < 1:
        raise BloodflError("dp=true needs a finite trainer.max_epochs to plan the privacy budget")
    return int(epochs)


def centralized_privacy(cfg: DictConfig, datamodule: Any, net: nn.Module) -> ClientPrivacy | None:
    """The single 'client' of a centralized DP run, planned for trainer.max_epochs epochs."""
    settings = dp_settings(cfg)
    if settings is None:
        return None
    steps = len(datamodule.train_dataloader())
    return ClientPrivacy(settings, num_samples=len(datamodule.idx["train"]), steps_per_epoch=steps,
                         total_steps=_max_epochs(cfg) * steps, grad_sample_mode=_mode_of(net), name="central")


def attach_client_privacy(client: Any, cfg: DictConfig) -> None:
    """federate's client hook: a ClientPrivacy planned for every step of every round of this client."""
    settings = dp_settings(cfg)
    if settings is None:
        return
    steps = client.steps_per_epoch
    client.privacy = ClientPrivacy(settings, num_samples=client.num_examples, steps_per_epoch=steps,
                                   total_steps=int(cfg.fl.rounds) * int(cfg.fl.local_epochs) * steps,
                                   grad_sample_mode=_mode_of(client.module.net), name=f"client{client.cid}")
    log.info("dp: client %d: n=%d, sample rate %.4g, noise multiplier %.4g, delta %.2g", client.cid,
             client.num_examples, client.privacy.sample_rate, client.privacy.noise_multiplier,
             client.privacy.delta)


def worst(privacies: Sequence[ClientPrivacy]) -> ClientPrivacy:
    return max(privacies, key=lambda p: p.epsilon())


def privacy_summary(privacies: Sequence[ClientPrivacy]) -> str:
    """One line for the end of a run: the worst client's (ε, δ)."""
    w = worst(privacies)
    who = "" if len(privacies) == 1 else f" (worst client: {w.name})"
    return f"DP: epsilon={w.epsilon():.3f} at delta={w.delta:.2g}{who}"


def write_privacy_json(path: str | Path, privacies: Sequence[ClientPrivacy],
                       settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """privacy.json: final (ε, δ) and σ, sample rate, steps per client, the worst client, the dp settings."""
    reports = [p.report() for p in privacies]
    w = max(reports, key=lambda r: r["epsilon"])
    doc = {"worst": {"client": w["client"], "epsilon": w["epsilon"], "delta": w["delta"]},
           "clients": reports, "settings": dict(settings or {})}
    Path(path).write_text(json.dumps(doc, indent=2))
    return doc
