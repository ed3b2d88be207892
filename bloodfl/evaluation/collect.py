"""Read the finished jobs under a run or multirun directory: each job's metrics, composed config and
command-line overrides, and the figures it drew. The report (``python -m bloodfl.report``) builds on this."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Job:
    dir: Path
    metrics: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml, unresolved

    def setting(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def task(self) -> str:
        return str(self.setting("task_name", "train"))

    @property
    def model(self) -> str:
        return str(self.setting("model.name", "?"))

    @property
    def dataset(self) -> str:
        return str(self.setting("dataset.name", "?"))

    @property
    def split(self) -> str:
        name = str(self.setting("split.name", "?"))
        return f"{name} fold {self.setting('split.fold')}" if self.setting("split.kind") == "kfold" else name

    @property
    def is_fold(self) -> bool:
        return self.setting("split.kind") == "kfold"

    @property
    def leaky_options(self) -> list[str]:
        """The options that exist only to measure a paper's flaw, as this job set them (empty for a clean job)."""
        out = []
        copies = self.setting("dataset.copies_before_split") or []
        if copies:  # papers/001: copies split independently, so its test and validation images leak
            out.append(f"dataset.copies_before_split=[{','.join(str(c) for c in copies)}]")
        if self.setting("evaluation.on_training_images"):  # papers/003: train_eval/* measured on training images
            out.append("evaluation.on_training_images=true")
        return out

    @property
    def leaks_validation(self) -> bool:
        """Whether its validation images leaked (copies before the split): such a job cannot be selected."""
        return bool(self.setting("dataset.copies_before_split"))

    def figures(self) -> list[Path]:
        return sorted((self.dir / "figures").glob("*.png"))


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def load_job(job: Path) -> Job:
    """One finished run directory (it holds ``metrics.json``)."""
    overrides = _yaml(job / ".hydra" / "overrides.yaml") or []
    config = _yaml(job / ".hydra" / "config.yaml") or {}
    return Job(job, json.loads((job / "metrics.json").read_text()), list(overrides), config)


def collect(root: str | Path) -> list[Job]:
    """Every job with a ``metrics.json`` under ``root`` (a run directory is a one-job study), in path order."""
    return [load_job(m.parent) for m in sorted(Path(root).rglob("metrics.json"))]
