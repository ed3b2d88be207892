"""Gather the metrics.json of every job under a (multi)run directory into one table.

    python -m bloodfl.evaluation.collect logs/train/multiruns/2026-11-22_10-00-00_000000
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

DEFAULT_COLUMNS = ("val/acc", "test/acc", "test/f1_macro", "test/precision_macro", "test/recall_macro", "test/loss")


def collect(root: str | Path) -> list[dict[str, object]]:
    """One row per job: its directory, its command-line overrides, and its metrics."""
    rows = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        rows.append({"job": str(job), "overrides": " ".join(overrides or []), **json.loads(metrics_file.read_text())})
    return rows


def write_csv(rows: list[dict[str, object]], path: str | Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument("--out", help="summary CSV (default: ROOT/summary.csv)")
    args = parser.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        print(f"no metrics.json under {args.root}")
        return 1
    out = Path(args.out or Path(args.root) / "summary.csv")
    write_csv(rows, out)
    table = Table("overrides", *DEFAULT_COLUMNS)
    for row in rows:
        table.add_row(str(row["overrides"]), *(f"{row[c]:.4f}" if c in row else "-" for c in DEFAULT_COLUMNS))
    Console().print(table)
    print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
