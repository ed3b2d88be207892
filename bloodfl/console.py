"""What a run prints: the config summary at start, one-line errors, the closing line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from bloodfl.errors import BloodflError

log = logging.getLogger("bloodfl")

SUMMARY_ORDER = ("dataset", "model", "split", "augment", "optim", "loader", "fl", "dp", "trainer", "logger", "paths")


def print_config_tree(cfg: DictConfig) -> None:
    """A tree of the resolved config, most important groups first."""
    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in SUMMARY_ORDER if k in cfg] + [k for k in cfg if k not in SUMMARY_ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(f"[bold]{key}")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a BloodflError into one line on stderr and exit status 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BloodflError as exc:
            print(f"bloodfl: error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def quote_group_choices(conf_dir: Path, argv: list[str] | None = None) -> None:
    """Quote config-group choices Hydra would parse as non-strings, so ``dp=true`` selects conf/dp/true.yaml.

    Hydra reads ``dp=true`` as a bool and refuses it as a group choice; users should not have to type
    ``dp='true'``. Comma lists (``-m dp=true,false``) are quoted item by item.
    """
    argv = sys.argv if argv is None else argv
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for i, arg in enumerate(argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in groups or not value or value[0] in "'\"[":
            continue
        argv[i] = f"{key}=" + ",".join(v if v[:1] in "'\"" else f"'{v}'" for v in value.split(","))
