"""Finished studies -> docs/results/<paper>.csv (one row per run) -> the generated tables of docs/results.md.

    python -m bloodfl.reproduce.results logs/reproduce/000/2026-12-02_10-00-00     # one study
    python -m bloodfl.reproduce.results                 # the newest study of each paper and scale in logs/reproduce
    python -m bloodfl.reproduce.results --page-only     # only regenerate the page from the committed CSVs

A study's rows replace the CSV's rows of the same scale (a cpu study leaves the paper-scale rows alone). The
page is rewritten only between ``<!-- results:<paper> -->`` and ``<!-- /results:<paper> -->``; the prose around
the markers is kept. Every number in those tables is a cell of docs/results/published.csv (the papers' own
numbers, quoted with their table/section) or of docs/results/<paper>.csv, which tests/test_reproduce.py checks.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
from pathlib import Path
from typing import Any

from bloodfl.console import cli_errors
from bloodfl.errors import BloodflError
from bloodfl.evaluation.collect import Job, collect
from bloodfl.reproduce.plan import ROOT
from bloodfl.reproduce.protocols import PAPERS, SCALES, TARGETS, Paper, Target

STUDY_FILE = "study.json"
DOCS = ROOT / "docs"
COLUMNS = ["paper", "scale", "variant", "protocol", "task", "model", "dataset", "split", "image_size", "epochs",
           "target_epsilon", "epsilon", "val_acc", "test_acc", "test_acc_ci95_low", "test_acc_ci95_high",
           "test_f1_macro", "test_f1_macro_ci95_low", "test_f1_macro_ci95_high",
           # the two flaws measured on purpose, never in a test_* column: evaluation.on_training_images (papers/003)
           # gives the selected model's scores on its own training images; dataset.copies_before_split (papers/001)
           # the share of test images with a flipped copy (or their original) in the training split
           "train_eval_acc", "train_eval_acc_ci95_low", "train_eval_acc_ci95_high", "train_eval_f1_macro",
           "train_eval_f1_macro_ci95_low", "train_eval_f1_macro_ci95_high", "leaked_test",
           "sensitivity", "fit_s", "step_wall_s", "study_wall_s", "study_command", "command", "run_id"]
Row = dict[str, str]


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _num(value: Any, digits: int) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def load_study(study: Path) -> tuple[dict[str, Any], list[Job]]:
    if not study.is_dir():
        raise BloodflError(f"{study} is not a directory; pass a study directory (logs/reproduce/<paper>/<time>)")
    path = study / STUDY_FILE
    if not path.exists():
        raise BloodflError(f"{study} has no {STUDY_FILE}: not a study; run python -m bloodfl.reproduce <paper> "
                           "and pass the directory it prints")
    record = json.loads(path.read_text())
    jobs = collect(study)
    if not jobs:
        raise BloodflError(f"no finished run (metrics.json) under {study}; run the study first "
                           f"({record.get('command', 'python -m bloodfl.reproduce <paper>')})")
    return record, jobs


def _split(job: Job) -> str:
    group = job.setting("split.group_by") or job.setting("dataset.group_key")
    return f"{job.split}, {'random' if not group or group == 'none' else 'by ' + str(group)}"


def _image_size(job: Job) -> str:
    path = job.dir / "preprocessing.json"  # the resolved size (the config may hold an interpolation)
    return str(json.loads(path.read_text()).get("image_size", "")) if path.exists() else ""


def _epochs(job: Job) -> str:
    if job.task == "federate":
        return f"{job.setting('fl.rounds')}x{job.setting('fl.local_epochs')}"
    epochs = job.metrics.get("epochs")  # what ran (early stopping may end a fit sooner)
    return str(int(epochs)) if isinstance(epochs, (int, float)) else str(job.setting("trainer.max_epochs", ""))


def job_row(study: Path, record: dict[str, Any], job: Job) -> Row:
    step_name = job.dir.relative_to(study).parts[0]
    step = next((s for s in record.get("steps", []) if s["name"] == step_name), {})
    m = job.metrics
    dp = bool(job.setting("dp.enabled"))
    script = "federate.py" if job.task == "federate" else "train.py"
    sens = "; ".join(f"{k.rsplit('/', 1)[1]}={_pct(v)}" for k, v in m.items() if k.startswith("test/sensitivity/"))
    return {
        "paper": str(record["paper"]), "scale": str(record["scale"]), "variant": step_name,
        "protocol": str(step.get("label", step_name)), "task": job.task, "model": job.model,
        "dataset": job.dataset, "split": _split(job), "image_size": _image_size(job), "epochs": _epochs(job),
        "target_epsilon": _num(job.setting("dp.target_epsilon"), 1) if dp else "",
        "epsilon": _num(m.get("dp/epsilon"), 2) if dp else "",
        "val_acc": _pct(m.get("val/acc")),  # what picks a variant's model for the targets (never test/acc)
        **{f"{split}_{k}{s}": _pct(m.get(f"{split}/{k}{s}")) for split in ("test", "train_eval")
           for k in ("acc", "f1_macro") for s in ("", "_ci95_low", "_ci95_high")},
        "leaked_test": _pct(m.get("data/leaked_test_fraction")),
        "sensitivity": sens, "fit_s": _num(m.get("time/fit_s"), 0), "step_wall_s": _num(step.get("wall_s"), 0),
        "study_wall_s": _num(sum(float(s.get("wall_s") or 0) for s in record.get("steps", [])), 0),
        "study_command": str(record.get("command", "")),
        "command": " ".join(["python", script, *(shlex.quote(o) for o in job.overrides)]),
        "run_id": "/".join([study.name, *job.dir.relative_to(study).parts]),
    }


def study_rows(study: Path) -> tuple[str, list[Row]]:
    record, jobs = load_study(study)
    return str(record["paper"]), [job_row(study, record, j) for j in jobs]


def read_csv(path: Path) -> list[Row]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def merge_rows(old: list[Row], new: list[Row]) -> list[Row]:
    """The new study's rows replace the old rows of the same scale and step: a study of some steps
    (``--steps``) keeps the rows of the others."""
    replaced = {(r["scale"], r["variant"]) for r in new}
    kept = [r for r in old if (r["scale"], r["variant"]) not in replaced]
    return sorted(kept + new, key=row_order)


def row_order(row: Row) -> tuple[int, int, str, int]:
    """Scale, then the paper's step order (models, leakage, federated), then the study and the job number."""
    steps = [s.name for s in PAPERS[row["paper"]].steps] if row["paper"] in PAPERS else []
    study, *rest = row["run_id"].split("/")
    job = rest[-1] if rest else ""
    return (SCALES.index(row["scale"]) if row["scale"] in SCALES else len(SCALES),
            steps.index(row["variant"]) if row["variant"] in steps else len(steps), study,
            int(job) if job.isdigit() else 0)


# ---- the page ----

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)]


def _with_ci(row: Row, key: str) -> str:
    value, low, high = row[key], row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    return f"{value} ({low}–{high})" if value and low and high else value or "-"


def published_table(rows: list[Row]) -> list[str]:
    keyed: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if not r["metric"].startswith("sensitivity/"):
            keyed.setdefault((r["protocol"], r["model"]), {})[r["metric"]] = r

    def show(r: Row | None) -> str:
        if r is None:
            return "-"
        return f"{r['value']} ± {r['ci95_pm']}" if r["ci95_pm"] else r["value"]

    body = [[protocol, model, show(m.get("acc")), show(m.get("f1_macro")),
             "; ".join(dict.fromkeys(x["source"] for x in m.values()))] for (protocol, model), m in keyed.items()]
    return _table(["protocol (paper)", "model", "accuracy %", "macro F1 %", "where"], body)


def measured_tables(rows: list[Row]) -> list[str]:
    studies = {r["run_id"].split("/")[0]: r for r in rows}
    lines = _table(["scale", "study", "command", "wall s (all steps)"],
                   [[r["scale"], sid, f"`{r['study_command']}`", r["study_wall_s"] or "-"]
                    for sid, r in studies.items()])
    lines.append("")
    # columns of a flaw measured on purpose, only where a study measured one (the other papers' tables keep theirs)
    on_train = any(r.get("train_eval_acc") for r in rows)
    leaked = any(r.get("leaked_test") for r in rows)
    body = [[r["protocol"], r["model"], r["split"], r["scale"], f"{r['image_size']} px, {r['epochs']}",
             f"{r['target_epsilon']} → {r['epsilon']}" if r["target_epsilon"] else "∞" if r["task"] == "federate"
             else "-", _with_ci(r, "test_acc"), _with_ci(r, "test_f1_macro"),
             *[_with_ci(r, "train_eval_acc") if r.get("train_eval_acc") else "-"] * on_train,
             *[r.get("leaked_test") or "-"] * leaked, r["fit_s"] or "-", f"`{r['run_id']}`"]
            for r in rows]
    lines += _table(["variant", "model", "split", "scale", "size, epochs", "ε (target → spent)",
                     "accuracy % (95% CI)", "macro F1 % (95% CI)",
                     *["accuracy % on its own training images (not a test result)"] * on_train,
                     *["test images with a flipped copy in train %"] * leaked, "fit s", "run"], body)
    return lines


def sensitivity_table(published: list[Row], rows: list[Row]) -> list[str]:
    pub = {r["metric"].split("/", 1)[1]: r for r in published if r["metric"].startswith("sensitivity/")}
    runs = [r for r in rows if r["sensitivity"]]
    if not pub and not runs:
        return []
    measured = [dict(kv.split("=", 1) for kv in r["sensitivity"].split("; ")) for r in runs]
    classes = list(dict.fromkeys([*pub, *(c for m in measured for c in m)]))
    header = ["class"]
    if pub:
        first = next(iter(pub.values()))
        header.append(f"paper: {first['model']}, {first['protocol']}")
    header += [f"`{r['run_id']}`" for r in runs]
    body = [[c, *([pub[c]["value"] if c in pub else "-"] if pub else []), *(m.get(c, "-") for m in measured)]
            for c in classes]
    return _table(header, body)


def render(paper: Paper, published: list[Row], rows: list[Row]) -> str:
    """The generated part of a paper's section: its numbers, bloodfl's, and per-class sensitivity."""
    lines = [f"**Published** (papers/{paper.id}):", "", *published_table(published), "",
             f"**Measured** with bloodfl (`docs/results/{paper.id}.csv`):", ""]
    if rows:
        lines += measured_tables(rows)
    else:
        lines.append(f"not run yet: `python -m bloodfl.reproduce {paper.id}` "
                     f"(then `python -m bloodfl.reproduce.results`)")
    sens = sensitivity_table(published, rows)
    if sens:
        lines += ["", "**Per-class sensitivity %** (test recall):", "", *sens]
    return "\n".join(lines)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _chosen(rows: list[Row], variant: str, model: str | None = None) -> Row | None:
    """The cpu-scale row of ``variant`` with the best validation accuracy (of ``model`` only, if given)."""
    cands = [r for r in rows if r["scale"] == "cpu" and r["variant"] == variant and _float(r["test_acc"]) is not None
             and (model is None or r["model"] == model)]
    return max(cands, key=lambda r: _float(r.get("val_acc")) or -1.0) if cands else None


def target_row(target: Target, rows: list[Row]) -> list[str]:
    """[target, bound, measured, met?, runs] of one target from its paper's rows."""
    bound = f"≥ {target.at_least:+g}" if target.against else f"≥ {target.at_least:g}"
    row = _chosen(rows, target.variant)
    base = _chosen(rows, target.against, row["model"]) if row is not None and target.against else None
    if row is None or (target.against and base is None):
        return [f"papers/{target.paper}: {target.label}", bound, "not run yet", "-", "-"]
    acc = float(row["test_acc"])
    if base is None:
        value, shown = acc, _with_ci(row, "test_acc")
        runs = f"`{row['run_id']}`"
    else:
        value = acc - float(base["test_acc"])
        shown = f"{value:+.2f} ({row['test_acc']} − {base['test_acc']}, {row['model']})"
        runs = f"`{row['run_id']}` − `{base['run_id']}`"
    met = "met" if value >= target.at_least - 1e-9 else f"missed by {target.at_least - value:.2f}"
    return [f"papers/{target.paper}: {target.label}", bound, shown, met, runs]


def targets_table(docs: Path) -> str:
    by_paper = {p: read_csv(docs / "results" / f"{p}.csv") for p in PAPERS}
    return "\n".join(_table(["target (cpu scale)", "bound", "measured % (95% CI)", "met?", "runs"],
                            [target_row(t, by_paper[t.paper]) for t in TARGETS]))


def markers(paper_id: str) -> tuple[str, str]:
    return f"<!-- results:{paper_id} -->", f"<!-- /results:{paper_id} -->"


def update_page(page: Path, paper_id: str, text: str) -> None:
    start, end = markers(paper_id)
    doc = page.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise BloodflError(f"{page} has no {start} ... {end} pair; add the two marker lines where the table goes")
    page.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc, count=1))


def regenerate_page(docs: Path) -> None:
    published = read_csv(docs / "results" / "published.csv")
    update_page(docs / "results.md", "targets", targets_table(docs))
    for paper in PAPERS.values():
        rows = read_csv(docs / "results" / f"{paper.id}.csv")
        update_page(docs / "results.md", paper.id, render(paper, [r for r in published if r["paper"] == paper.id],
                                                          rows))


def newest_studies(logs: Path) -> list[Path]:
    """The newest study with a finished run, per paper and scale."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(logs.glob(f"*/*/{STUDY_FILE}")):
        study = path.parent
        record = json.loads(path.read_text())
        if any(study.rglob("metrics.json")):
            found[(str(record.get("paper")), str(record.get("scale")))] = study  # sorted: the last is the newest
    return list(found.values())


def results(studies: list[Path], docs: Path = DOCS) -> list[Path]:
    """Write the studies' rows into docs/results/<paper>.csv and regenerate the page; returns the CSVs written."""
    by_paper: dict[str, list[Row]] = {}
    for study in studies:
        paper_id, rows = study_rows(study)
        by_paper.setdefault(paper_id, []).extend(rows)
    written = []
    for paper_id, rows in by_paper.items():
        path = docs / "results" / f"{paper_id}.csv"
        write_rows(path, merge_rows(read_csv(path), rows))
        written.append(path)
    regenerate_page(docs)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodfl.reproduce.results", description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", help="study directories (default: the newest of each paper and scale "
                                                   "under --logs)")
    parser.add_argument("--logs", default="logs/reproduce", help="where studies are found (default: %(default)s)")
    parser.add_argument("--docs", default=str(DOCS), help="the docs folder holding results.md and results/")
    parser.add_argument("--page-only", action="store_true", help="only regenerate results.md from the CSVs")
    args = parser.parse_args(argv)
    with cli_errors():
        docs = Path(args.docs)
        if not (docs / "results.md").exists():
            raise BloodflError(f"{docs / 'results.md'} not found; pass --docs <the repository's docs folder>")
        studies = [] if args.page_only else [Path(s) for s in args.studies] or newest_studies(Path(args.logs))
        if not studies and not args.page_only:
            print(f"no finished study under {args.logs}; regenerating {docs / 'results.md'} from the CSVs only")
        written = results(studies, docs)
    for path in written:
        print(f"wrote {path}")
    print(f"regenerated {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
