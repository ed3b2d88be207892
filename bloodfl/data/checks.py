"""Content hashes, exact duplicates, count checks and eq. 1 class weights: what runs before training."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodfl.data.decode import cache_key, safe_name, write_atomic
from bloodfl.data.io import read_bytes
from bloodfl.data.table import ZIP_SEP, SampleTable
from bloodfl.errors import BloodflError

DEFAULT_WORKERS = 2
DUPLICATE_POLICIES = ("drop", "group", "keep")


def _hash_one(ref: str) -> str:
    try:
        return hashlib.sha256(read_bytes(ref)).hexdigest()
    except Exception:  # noqa: BLE001 - missing member, bad zip CRC, I/O error: decoding reports it
        return f"unreadable:{ref}"  # unique, so an unreadable file never counts as a duplicate


def content_hashes(table: SampleTable, num_workers: int = DEFAULT_WORKERS,
                   cache_dir: str | os.PathLike | None = None) -> list[str]:
    """sha256 of each image's file bytes (as in the data sets' MANIFEST.sha256), in table order.

    Files are read in threads: hashlib and file reads release the GIL. A file that cannot be read gets
    the unique key "unreadable:<ref>" (decoding reports it). With ``cache_dir`` the hashes are kept in a
    small JSON file keyed like the image cache (refs, sizes, mtimes), so a later run reads no image file.
    """
    if table.images is not None:  # rendered in memory: hash the pixels
        return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in table.images]
    path = None
    if cache_dir is not None:
        key = cache_key(table.refs, 0, "sha256")
        path = Path(cache_dir) / f"{safe_name(table.name)}-sha256-{key[:20]}.json"
        cached = _read_hashes(path, key, len(table))
        if cached is not None:
            return cached
    if num_workers <= 1:
        hashes = [_hash_one(r) for r in table.refs]
    else:
        with ThreadPoolExecutor(num_workers) as pool:
            hashes = list(pool.map(_hash_one, table.refs, chunksize=256))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda fh: fh.write(json.dumps({"key": key, "hashes": hashes}).encode()))
        except OSError:
            pass  # only a speed-up: the next run hashes again
    return hashes


def _read_hashes(path: Path, key: str, n: int) -> list[str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    hashes = data.get("hashes") if data.get("key") == key else None
    return hashes if isinstance(hashes, list) and len(hashes) == n else None


@dataclass
class Duplicates:
    """Sets of row indices whose files are byte-identical: within one class, or spanning classes."""

    within: list[list[int]] = field(default_factory=list)
    across: list[list[int]] = field(default_factory=list)

    @property
    def extra_copies(self) -> int:
        """How many rows are surplus copies inside a class (each set keeps one)."""
        return sum(len(s) - 1 for s in self.within)


def find_duplicates(table: SampleTable, hashes: Sequence[str]) -> Duplicates:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    dups = Duplicates()
    for rows in by_hash.values():
        if len(rows) < 2:
            continue
        labels = {int(table.labels[i]) for i in rows}
        (dups.within if len(labels) == 1 else dups.across).append(rows)
    return dups


def short_ref(ref: str) -> str:
    """The last two path parts (class folder/file), for readable reports."""
    inner = ref.split(ZIP_SEP)[-1]
    return "/".join(inner.replace("\\", "/").split("/")[-2:])


def describe_duplicates(table: SampleTable, dups: Duplicates) -> list[str]:
    """One line per duplicate set: cross-class conflicts first (they are label noise)."""
    lines = []
    for rows in dups.across:
        members = ", ".join(f"{short_ref(table.refs[i])} ({table.classes[table.labels[i]]})" for i in rows)
        lines.append(f"identical image in different classes: {members}")
    for rows in dups.within:
        members = ", ".join(short_ref(table.refs[i]) for i in rows)
        lines.append(f"identical images within class {table.classes[table.labels[rows[0]]]}: {members}")
    return lines


def _fold_groups(table: SampleTable, sets: list[list[int]]) -> list[str]:
    """Groups merged so that every duplicate set lies inside one group (union-find over group names)."""
    groups = list(table.groups) if table.groups is not None else list(table.refs)
    parent = {g: g for g in groups}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for rows in sets:
        roots = sorted({find(groups[i]) for i in rows})
        for r in roots[1:]:
            parent[r] = roots[0]
    return [find(g) for g in groups]


def dedupe(table: SampleTable, hashes: Sequence[str], policy: str = "drop") -> SampleTable:
    """Handle exact duplicates before splitting, so no image appears in two splits.

    drop: keep the first copy of each within-class set; drop every copy of a cross-class conflict
        (its label is unknowable). group: keep all rows, but fold each duplicate set into one group so a
        group-aware split keeps it together. keep: return the table unchanged.
    What was done is appended to ``problems``.
    """
    if policy not in DUPLICATE_POLICIES:
        raise BloodflError(f"unknown dataset.duplicates={policy!r}; valid: {', '.join(DUPLICATE_POLICIES)}")
    if policy == "keep":
        return table
    dups = find_duplicates(table, hashes)
    notes = describe_duplicates(table, dups)
    if policy == "group":
        out = table.subset(np.arange(len(table)))
        out.groups = _fold_groups(table, dups.within + dups.across)
        out.problems += [f"kept together in one split: {n}" for n in notes]
        return out
    drop = {i for rows in dups.within for i in rows[1:]} | {i for rows in dups.across for i in rows}
    out = table.subset([i for i in range(len(table)) if i not in drop])
    out.problems += [f"dropped duplicates: {n}" for n in notes]
    return out


def check_table(
    table: SampleTable, expected_counts: Mapping[str, int] | None, unreadable: Sequence[str] = ()
) -> list[str]:
    """One line per problem: a class count that differs from the published one, an unreadable file.

    Classes in ``expected_counts`` that the table does not use (dropped by dataset.drop_classes) are ignored.
    """
    problems = []
    if expected_counts:
        for cls, n in table.class_counts().items():
            if cls not in expected_counts:
                problems.append(f"class {cls}: {n} images, but dataset.expected_counts has no entry for it")
            elif n != int(expected_counts[cls]):
                problems.append(f"class {cls}: {n} images, expected {int(expected_counts[cls])}")
    problems += [f"unreadable image: {r}" for r in unreadable]
    return problems


def class_weights(counts: Sequence[int]) -> list[float]:
    """papers/000 eq. 1: w_c = N / (n_c * C); 0 for a class with no images (it contributes no loss)."""
    n = np.asarray(counts, dtype=np.float64)
    total, c = n.sum(), len(n)
    return [float(total / (k * c)) if k > 0 else 0.0 for k in n]
