"""Where the Hydra configs live, the resolvers they use, and reading one group option outside a Hydra app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bloodfl.errors import BloodflError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _at_least(default: int, minimum: int) -> int:
    """``dataset.image_size: ${at_least:64,${model.min_size}}``: a data set's default image size, raised to the
    chosen model's minimum (inception_v3 needs 75 px), so every model runs with the defaults. A size the user
    sets explicitly replaces the expression and is checked against the minimum instead."""
    return max(int(default), int(minimum))


def _data_dir() -> str:
    """``paths.data_dir``: $BLOODFL_DATA if set; else ./data; else the data sets beside the clone
    (../shared/data, as in the project's own workspace and CI); else ./data, which the run then reports missing."""
    env = os.environ.get("BLOODFL_DATA")
    if env:
        return env
    for candidate in ("data", os.path.join("..", "shared", "data")):
        if os.path.isdir(candidate):
            return candidate
    return "data"


OmegaConf.register_new_resolver("at_least", _at_least, replace=True)
OmegaConf.register_new_resolver("bloodfl_data_dir", _data_dir, replace=True)


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group (``model`` -> ``["densenet121", ...]``), sorted."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def load_option(group: str, name: str, conf_dir: Path = CONF_DIR) -> DictConfig:
    """One option of a group with the configs it inherits (its ``defaults`` of the form ``/group/opt@_here_``),
    as ``python train.py <group>=<name>`` would compose it; for code that runs outside a Hydra app."""
    path = conf_dir / group / f"{name}.yaml"
    if not path.exists():
        raise BloodflError(f"unknown {group} {name!r}; valid: {', '.join(group_options(group, conf_dir))}")
    node = OmegaConf.load(path)
    bases = []
    for entry in node.pop("defaults", []):
        if entry == "_self_":
            continue
        ref = str(entry).split("@", 1)[0].lstrip("/")
        base_group, base_name = ref.rsplit("/", 1)
        bases.append(OmegaConf.load(conf_dir / base_group / f"{base_name}.yaml"))
    merged = OmegaConf.merge(*bases, node)
    assert isinstance(merged, DictConfig)
    return merged


def dp_default_model(conf_dir: Path = CONF_DIR) -> str:
    """The model ``dp=true`` trains when none is named: its ``override /model`` in ``conf/dp/true.yaml`` (whose
    ``dp.lr`` is that model's rate)."""
    for entry in OmegaConf.load(conf_dir / "dp" / "true.yaml").get("defaults", []):
        if isinstance(entry, DictConfig) and "override /model" in entry:
            return str(entry["override /model"])
    raise BloodflError(f"{conf_dir / 'dp' / 'true.yaml'} names no default model (override /model: <name>)")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with a user error raised by the built object's constructor passed on as is
    (Hydra wraps every exception in its own, which would turn a one-line message into a traceback)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, BloodflError):
            raise cause from None
        raise
