"""Seeded, stratified train/val/test assignment: ratio splits (7:2:1, 80:20, 90:10), k-fold and published.

Every function returns one label per sample ("train", "val" or "test"). When ``groups`` is given, every
group (a smear, a source image, a set of identical files) lands in exactly one split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, StratifiedKFold, train_test_split

from bloodfl.errors import BloodflError

SPLITS = ("train", "val", "test")


@dataclass
class SplitSpec:
    """What ``split=`` selects. kind: ratio | kfold | published.

    fractions: train/val/test shares for ``ratio`` (must sum to 1).
    val_from_train: share of the training pool carved out as validation (80:20 and 90:10 have no
        validation part of their own; k-fold and published splits neither).
    """

    kind: str = "ratio"
    fractions: Sequence[float] = (0.7, 0.2, 0.1)
    val_from_train: float = 0.0
    k: int = 5
    fold: int = 0
    group_by: str | None = None
    seed: int = 0
    name: str = ""


def _check_class_sizes(labels: np.ndarray, classes: Sequence[str] | None, need: int, what: str) -> None:
    counts = np.bincount(labels)
    for c, n in enumerate(counts):
        if 0 < n < need:
            cname = classes[c] if classes is not None else str(c)
            raise BloodflError(
                f"class {cname!r} has {n} images, too few for {what} (needs at least {need}); "
                f"remove the class (real data sets: dataset.drop_classes=[{cname}]) or choose another split"
            )


def holdout(labels: np.ndarray, groups: np.ndarray | None, frac: float, seed: int,
            idx: np.ndarray, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held out ~frac), stratified by label and, with groups, group-whole.

    strict=False (a federated client's small shard): where stratification is impossible the hold-out is
    drawn without it, and a shard too small to hold anything out keeps every image for training; groups are
    always kept whole."""
    idx = np.asarray(idx, dtype=np.int64)
    if frac <= 0 or (not strict and int(round(frac * len(idx))) < 1):
        return idx, idx[:0]
    y = labels[idx]
    if not strict:
        return _lenient_holdout(y, None if groups is None else groups[idx], frac, seed, idx)
    if groups is None:
        n_classes = len(np.unique(y))
        if round(frac * len(idx)) < n_classes or len(idx) - round(frac * len(idx)) < n_classes:
            raise BloodflError(
                f"a stratified hold-out of {frac:.0%} from {len(idx)} images cannot hold all {n_classes} classes; "
                "use more images or a larger split fraction"
            )
        rest, held = train_test_split(idx, test_size=frac, stratify=y, random_state=seed)
        return np.sort(rest), np.sort(held)
    g = groups[idx]
    n_groups = len(np.unique(g))
    n_splits = max(2, int(round(1.0 / frac)))
    if n_groups < n_splits:
        raise BloodflError(
            f"only {n_groups} groups for a group-aware hold-out of {frac:.0%}; "
            "set split.group_by=null or use a smaller split"
        )
    # StratifiedGroupKFold balances classes across folds while keeping groups whole; one fold is the hold-out
    # (its share is about 1/n_splits, the closest a group split can get to ``frac``)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_pos, held_pos = next(cv.split(np.zeros(len(idx)), y, g))
    return np.sort(idx[rest_pos]), np.sort(idx[held_pos])


def _lenient_holdout(y: np.ndarray, g: np.ndarray | None, frac: float, seed: int,
                     idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_held = int(round(frac * len(idx)))
    if g is None:
        _, counts = np.unique(y, return_counts=True)
        stratify = y if counts.min() >= 2 and n_held >= len(counts) and len(idx) - n_held >= len(counts) else None
        rest, held = train_test_split(idx, test_size=n_held, stratify=stratify, random_state=seed)
        return np.sort(rest), np.sort(held)
    if len(np.unique(g)) < 2:  # one group cannot be split without leaking it
        return idx, idx[:0]
    cv = GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
    rest_pos, held_pos = next(cv.split(np.zeros(len(idx)), y, g))
    return np.sort(idx[rest_pos]), np.sort(idx[held_pos])


def assign_splits(
    labels: np.ndarray,
    spec: SplitSpec,
    groups: Sequence[str] | None = None,
    published: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """One of "train"/"val"/"test" per sample, deterministic for the same inputs and ``spec.seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    g = None if groups is None else np.asarray(groups, dtype=object)
    out = np.full(n, "train", dtype=object)
    all_idx = np.arange(n)
    if not 0.0 <= spec.val_from_train < 1.0:
        raise BloodflError(f"split.val_from_train must be in [0, 1), got {spec.val_from_train}")

    if spec.kind == "ratio":
        fr = [float(f) for f in spec.fractions]
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise BloodflError(
                f"split.fractions must be three non-negative numbers (train, val, test) that sum to 1, "
                f"got {list(spec.fractions)} (sum {sum(fr):g})"
            )
        train_f, val_f, test_f = fr
        if train_f == 0:
            raise BloodflError("split.fractions gives the training set a share of 0")
        _check_class_sizes(labels, classes, sum(f > 0 for f in fr) + (spec.val_from_train > 0),
                           f"split {spec.name or fr}")
        pool, test = holdout(labels, g, test_f, spec.seed, all_idx)
        pool, val = holdout(labels, g, val_f / (train_f + val_f) if val_f else 0.0, spec.seed + 1, pool)
        out[test] = "test"
        out[val] = "val"
        train = pool
    elif spec.kind == "kfold":
        if not 2 <= spec.k <= n:
            raise BloodflError(f"split.k must be between 2 and the number of images, got {spec.k}")
        if not 0 <= spec.fold < spec.k:
            raise BloodflError(f"split.fold must be in 0..{spec.k - 1}, got {spec.fold}")
        _check_class_sizes(labels, classes, spec.k, f"{spec.k}-fold cross-validation")
        cv = (StratifiedKFold(spec.k, shuffle=True, random_state=spec.seed) if g is None
              else StratifiedGroupKFold(spec.k, shuffle=True, random_state=spec.seed))
        train, test = list(cv.split(np.zeros(n), labels, g))[spec.fold]
        out[test] = "test"
    elif spec.kind == "published":
        if published is None:
            raise BloodflError(
                "split=published needs a data set that publishes its own train/test split (e.g. wbc4); "
                "choose split=7-2-1, 80-20, 90-10 or kfold"
            )
        pub = np.asarray(published, dtype=object)
        out[pub == "test"] = "test"
        train = all_idx[pub != "test"]
    else:
        raise BloodflError(f"unknown split.kind {spec.kind!r}; valid: ratio, kfold, published")

    if spec.val_from_train > 0:
        train, val = holdout(labels, g, spec.val_from_train, spec.seed + 2, np.asarray(train))
        out[val] = "val"
    if not (out == "val").any():
        raise BloodflError(
            f"split {spec.name or spec.kind} leaves no validation images (model selection needs them); "
            "set split.val_from_train, e.g. 0.1"
        )
    return out


def shared_across_splits(split: np.ndarray, keys: Sequence[str]) -> dict[str, list[str]]:
    """Each key (a content hash, a group id) that occurs in more than one split, with those splits."""
    seen: dict[str, list[str]] = {}
    for s, k in zip(split, keys):
        splits = seen.setdefault(k, [])
        if str(s) not in splits:
            splits.append(str(s))
    return {k: v for k, v in seen.items() if len(v) > 1}


def assert_disjoint(split: np.ndarray, keys: Sequence[str], what: str, acknowledged_by: str | None = None) -> list[str]:
    """Fail when one key (a content hash or a group id) occurs in two splits: that is leakage.

    ``acknowledged_by`` names an option that creates this leakage on purpose (to measure a paper's flaw): then
    the check still runs, but reports what it found (one line, returned) instead of refusing the run."""
    shared = shared_across_splits(split, keys)
    if not shared:
        return []
    k, splits = next(iter(shared.items()))
    if acknowledged_by is None:
        raise BloodflError(f"leakage: {what} {k!r} is in both {splits[0]!r} and {splits[1]!r} splits")
    return [f"LEAKAGE ON PURPOSE ({acknowledged_by}): {what} in more than one split: {len(shared)} "
            f"(e.g. {k!r} in {' and '.join(splits)})"]
