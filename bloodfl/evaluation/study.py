"""A study's tables, like the papers': one row per job (model, data set, split, test metrics with bootstrap 95%
CIs, parameters, speed, time), cross-validation folds folded into mean ± std, and the best job chosen by a
validation metric — never by a test metric."""

from __future__ import annotations

import math
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass

from bloodfl.errors import BloodflError
from bloodfl.evaluation.collect import Job

# (metrics.json key, column title, has bootstrap CI)
METRICS = (
    ("test/acc", "accuracy", True),
    ("test/precision_macro", "precision (macro)", False),
    ("test/recall_macro", "recall (macro)", False),
    ("test/f1_macro", "F1 (macro)", True),
    ("test/auroc_macro", "AUC (macro)", True),
)
# evaluation.on_training_images (papers/003's flaw): the selected model's accuracy on its own training images
TRAIN_EVAL_ACC = "train_eval/acc"
TRAIN_EVAL_TITLE = "accuracy on its training images (not a test result)"
LEAKY_TITLE = "leaky protocol, on purpose"
# overrides that only make sense for centralized training; the rest of a job's command line carries over
NOT_FEDERATED = ("trainer.max_epochs", "callbacks", "optimized_metric", "hydra.", "split.fold",
                 "evaluation.on_training_images")


@dataclass
class Selection:
    metric: str
    job: Job | None
    value: float | None


def selection_metric(jobs: list[Job], metric: str | None = None) -> str:
    """The validation metric the best job is chosen by: ``metric``, or the jobs' ``optimized_metric``."""
    chosen = metric or next((str(j.setting("optimized_metric")) for j in jobs if j.setting("optimized_metric")),
                            "val/acc")
    if chosen.startswith("test/"):
        raise BloodflError(f"select={chosen}: the best model is chosen by a validation metric (e.g. val/acc), "
                           "never by a test metric")
    return chosen


def select_best(jobs: list[Job], metric: str) -> Selection:
    """The job with the best ``metric`` (lower is better for losses); ties go to the first job in path order."""
    # a job whose validation images leaked on purpose (dataset.copies_before_split) would win by its leak
    scored = [(j, float(j.metrics[metric])) for j in jobs if not j.leaks_validation
              and isinstance(j.metrics.get(metric), (int, float)) and not math.isnan(float(j.metrics[metric]))]
    if not scored:
        return Selection(metric, None, None)
    sign = -1.0 if "loss" in metric else 1.0
    job, value = max(scored, key=lambda jv: sign * jv[1])
    return Selection(metric, job, value)


def _fmt(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def cell(job: Job, key: str, with_ci: bool) -> str:
    text = _fmt(job.metrics.get(key))
    low, high = job.metrics.get(f"{key}_ci95_low"), job.metrics.get(f"{key}_ci95_high")
    if with_ci and low is not None and high is not None:
        text += f" ({low:.3f}–{high:.3f})"
    return text


def job_name(job: Job, root_depth: int) -> str:
    return "/".join(job.dir.parts[root_depth:]) or job.dir.name


def job_rows(jobs: list[Job], best: Selection, root_depth: int) -> tuple[list[str], list[list[str]]]:
    header = ["job", "task", "model", "data set", "split", *(t for _, t, _ in METRICS), best.metric, "parameters",
              "images/s", "fit time (s)", "ε"]
    # columns only where a job measured a paper's flaw on purpose, so it is never read as a held-out result
    train_eval = any(TRAIN_EVAL_ACC in j.metrics for j in jobs)
    leaky = any(j.leaky_options for j in jobs)
    header += [TRAIN_EVAL_TITLE] * train_eval + [LEAKY_TITLE] * leaky
    rows = []
    for job in jobs:
        params = job.metrics.get("model/params")
        mark = " ★" if job is best.job else ""
        rows.append([job_name(job, root_depth) + mark, job.task, job.model, job.dataset, job.split,
                     *(cell(job, key, ci) for key, _, ci in METRICS), _fmt(job.metrics.get(best.metric)),
                     f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else "-",
                     _fmt(job.metrics.get("time/images_per_s"), 1), _fmt(job.metrics.get("time/fit_s"), 1),
                     _fmt(job.metrics.get("dp/epsilon"), 2),
                     *[cell(job, TRAIN_EVAL_ACC, True)] * train_eval,
                     *["; ".join(job.leaky_options) or "-"] * leaky])
    return header, rows


def fold_groups(jobs: list[Job]) -> dict[str, list[Job]]:
    """k-fold jobs grouped by everything but the fold: each group is one cross-validated configuration."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        if job.is_fold:
            key = " ".join(o for o in job.overrides if not o.startswith("split.fold=")) or "(defaults)"
            groups[key].append(job)
    return {k: sorted(v, key=lambda j: int(j.setting("split.fold", 0))) for k, v in groups.items()}


def fold_rows(groups: dict[str, list[Job]]) -> tuple[list[str], list[list[str]]]:
    """Mean ± sample standard deviation (n - 1) across folds, one row per configuration."""
    header = ["configuration", "model", "data set", "folds", *(t for _, t, _ in METRICS), "val/acc"]
    rows = []
    for key, members in groups.items():
        cells = []
        for metric in [*(k for k, _, _ in METRICS), "val/acc"]:
            values = [float(j.metrics[metric]) for j in members if isinstance(j.metrics.get(metric), (int, float))]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        folds = ",".join(str(j.setting("split.fold")) for j in members)
        rows.append([key, members[0].model, members[0].dataset, f"{len(members)} ({folds})", *cells])
    return header, rows


def federate_command(job: Job) -> str:
    """The command that takes a centralized job's model and settings into federated training."""
    keep = [o for o in job.overrides if not o.lstrip("+~").startswith(NOT_FEDERATED)]
    for key in ("dataset", "model"):  # named even when the job ran the defaults, so the command says what it runs
        if not any(o.startswith(f"{key}=") for o in keep):
            keep.insert(0, f"{key}={job.setting(f'{key}.name')}")
    return "python federate.py " + " ".join(shlex.quote(o) for o in keep)
