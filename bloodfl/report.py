"""One study's results, like the papers' tables: every job of a (multi)run directory with its test metrics and
bootstrap 95% CIs, cross-validation folds as mean ± std, the best job by a validation metric (never by test),
and the command that takes its model into federated training.

    python -m bloodfl.report logs/train/multiruns/2026-12-02_10-00-00
    python -m bloodfl.report <dir> --select val/f1_macro --out reports/pbc

Writes ``report.md``, ``report.csv`` and ``report.html`` (with every job's figures) into the directory (or
``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import html
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bloodfl.console import cli_errors
from bloodfl.errors import BloodflError
from bloodfl.evaluation.collect import Job, collect
from bloodfl.evaluation.study import (
    Selection,
    federate_command,
    fold_groups,
    fold_rows,
    job_rows,
    select_best,
    selection_metric,
)

Rows = tuple[list[str], list[list[str]]]


def markdown(title: str, table: Rows) -> str:
    header, rows = table
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(table: Rows) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def best_lines(best: Selection, root: Path) -> list[str]:
    if best.job is None:
        return [f"No job has {best.metric}: no best job chosen (choose a metric with --select)."]
    lines = [f"Best by {best.metric} (validation): {best.job.dir.relative_to(root) if best.job.dir != root else '.'}"
             f" = {best.value:.4f}"]
    if best.job.task == "train":
        lines.append(f"Take this model into federated training: {federate_command(best.job)}")
    return lines


def write_html(path: Path, title: str, jobs: list[Job], tables: list[tuple[str, Rows]], lines: list[str]) -> None:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:32%;margin:4px;border:1px solid #ddd}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in lines]
    for name, table in tables:
        parts.append(f"<h2>{html.escape(name)}</h2>{html_table(table)}")
    parts.append("<h2>Figures</h2>")
    for job in jobs:
        figures = job.figures()
        if figures:
            parts.append(f"<h3>{html.escape(job.dir.name)}: {html.escape(job.model)}, {html.escape(job.dataset)}, "
                         f"{html.escape(job.split)}</h3>")
            parts += [f"<img src='{html.escape(os.path.relpath(f, path.parent))}' alt='{html.escape(f.stem)}'>"
                      for f in figures]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def report(root: str | Path, out: str | Path | None = None, select: str | None = None) -> dict[str, object]:
    """Write the study's report; returns the tables, the selection and the written paths."""
    root = Path(root)
    if not root.is_dir():
        raise BloodflError(f"{root} is not a directory; pass a run or multirun directory (logs/<task>/multiruns/...)")
    jobs = collect(root)
    if not jobs:
        raise BloodflError(f"no finished job (metrics.json) under {root}; pass a run or multirun directory")
    out_dir = Path(out) if out else root
    out_dir.mkdir(parents=True, exist_ok=True)
    best = select_best(jobs, selection_metric(jobs, select))
    tables: list[tuple[str, Rows]] = [("Jobs (test metrics with bootstrap 95% CIs)",
                                       job_rows(jobs, best, len(root.parts)))]
    groups = fold_groups(jobs)
    if groups:
        tables.append(("Cross-validation (mean ± std across folds)", fold_rows(groups)))
    lines = best_lines(best, root)
    title = f"bloodfl report: {root.name}"
    md = [f"# {title}", "", *(f"{line}  " for line in lines), ""] + [markdown(n, t) for n, t in tables]
    (out_dir / "report.md").write_text("\n".join(md))
    with open(out_dir / "report.csv", "w", newline="") as fh:
        header, rows = tables[0]
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    write_html(out_dir / "report.html", title, jobs, tables, lines)
    return {"jobs": jobs, "tables": tables, "best": best, "lines": lines,
            "paths": [out_dir / f"report.{ext}" for ext in ("md", "csv", "html")]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodfl.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument("--out", help="where to write report.md/.csv/.html (default: ROOT)")
    parser.add_argument("--select", help="validation metric that picks the best job (default: the jobs' "
                                         "optimized_metric, e.g. val/acc_best)")
    args = parser.parse_args(argv)
    with cli_errors():
        result = report(args.root, args.out, args.select)
    console = Console(width=200)
    for name, (header, rows) in result["tables"]:  # type: ignore[union-attr]
        table = Table(*header, title=name)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in result["lines"]:  # type: ignore[union-attr]
        print(line)
    print("report: " + ", ".join(str(p) for p in result["paths"]))  # type: ignore[union-attr]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
