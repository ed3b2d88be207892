"""Central vs federated: the same model, data, split and seed, trained both ways; a side-by-side table.

    python -m bloodfl.fl.compare dataset=all_pbs dataset.image_size=64 fl.rounds=10 fl.local_epochs=1
    python -m bloodfl.fl.compare --out logs/compare/rbc experiment=dipto2023_rbc fl=dipto2023

Every override goes to both runs except ``fl.*``/``fl=`` (federated only); the centralized run gets
``trainer.max_epochs = fl.rounds * fl.local_epochs``, the same number of passes over the training images.
Both start from the same initial weights (the same seed, set before the model is built). The centralized run
reports its best-validation-loss checkpoint on the test set, the federated run what ``federate.py`` tests: its
final global model, or with ``fl.select=best`` its best-validation round (for FedAvg on all_pbs that selection
tested worse than the last round: docs/parity.md, "Session 10").
Outputs: ``<out>/central/``, ``<out>/federated/`` (each a normal run directory), ``<out>/compare.csv`` and
``<out>/compare.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from bloodfl.config import CONF_DIR
from bloodfl.console import bool_group_choices, quiet_known_notices, task_wrapper
from bloodfl.errors import BloodflError

ROWS = ("test/acc", "test/f1_macro", "test/precision_macro", "test/recall_macro", "test/loss")


def _compose(config_name: str, overrides: Sequence[str], out: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:  # a mistyped override: one line, as from train.py
        raise BloodflError(f"{config_name}: {str(exc).splitlines()[0]}") from exc
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides for the centralized run, overrides for the federated run)."""
    fl_only = [o for o in overrides if o.lstrip("+~").startswith(("fl.", "fl="))]
    return [o for o in overrides if o not in fl_only], list(overrides)


def write_table(out: Path, central: dict[str, Any], federated: dict[str, Any]) -> list[list[str]]:
    rows = [["metric", "central", "federated", "federated - central"]]
    for key in (*ROWS, "epochs", "seconds"):
        c, f = central.get(key), federated.get(key)
        diff = f"{f - c:+.4f}" if isinstance(c, (int, float)) and isinstance(f, (int, float)) else ""
        rows.append([key, _fmt(c), _fmt(f), diff])
    with open(out / "compare.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def compare(overrides: Sequence[str], out: Path) -> list[list[str]]:
    from bloodfl.fl.run import federate
    from bloodfl.training.run import train

    central_args, fed_args = split_overrides(overrides)
    fed_cfg = _compose("federate", fed_args, out / "federated")
    epochs = int(fed_cfg.fl.rounds) * int(fed_cfg.fl.local_epochs)
    central_cfg = _compose("train", [*central_args, f"trainer.max_epochs={epochs}"], out / "central")

    t0 = time.perf_counter()
    central = train(central_cfg)
    central["seconds"] = round(time.perf_counter() - t0, 1)
    central["epochs"] = epochs
    t0 = time.perf_counter()
    federated = federate(fed_cfg)
    federated["seconds"] = round(time.perf_counter() - t0, 1)
    federated["epochs"] = epochs
    rows = write_table(out, central, federated)
    _print(rows, out)
    return rows


def _print(rows: list[list[str]], out: Path) -> None:
    import rich
    from rich.table import Table

    table = Table(title="central vs federated (test set)")
    for name in rows[0]:
        table.add_column(name, justify="right")
    for r in rows[1:]:
        table.add_row(*r)
    rich.print(table)
    print(f"Done: {out / 'compare.md'}")


@task_wrapper
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default logs/compare/<time>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=all_pbs fl.rounds=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    out = args.out or Path(os.environ.get("BLOODFL_LOGS", "logs")) / "compare" / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S_%f")
    out.mkdir(parents=True, exist_ok=True)
    argv = ["compare", *args.overrides]
    quiet_known_notices()
    bool_group_choices(CONF_DIR, argv)  # dp=true as typed, as train.py/federate.py do
    compare(argv[1:], out)


if __name__ == "__main__":
    main(sys.argv[1:])
