"""``dataset.copies_before_split``: flipped copies of every image added to the data set BEFORE it is split.

This exists ONLY to measure the size of a published flaw: papers/001 (Alam et al.) added horizontal, vertical
and horizontal+vertical flips of every image to the data set and then split it 7:2:1, so flipped copies of one
image land in train, validation and test. bloodfl's own augmentation (``augment=flips``) flips training batches
after the split and never leaks. With this option a run's test (and validation) metrics are NOT held-out
results: every copy is split independently, exactly as in the paper. The data module reports the leakage it
creates (how many test images have their original or a copy in the training split) instead of silencing its
leakage checks, logs a warning, and the run records the option in ``splits.csv`` (copy paths end in
``#copy:<kind>``) and ``metrics.json`` (``data/copies_before_split``, ``data/leaked_test_*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from bloodfl.data.table import SampleTable
from bloodfl.errors import BloodflError

# uint8 (N, H, W, 3) -> the flipped images; "horizontal" mirrors left-right, as bloodfl.data.augment.Flips does
COPY_KINDS = {
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1, :],
    "hvflip": lambda a: a[:, ::-1, ::-1],
}
COPY_SEP = "#copy:"  # a copy's ref: "<original ref>#copy:<kind>"
OPTION = "dataset.copies_before_split"


def check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    """The configured copy kinds, validated; () when the option is off (the default)."""
    out = tuple(str(k) for k in kinds or ())
    bad = [k for k in out if k not in COPY_KINDS]
    if bad or len(set(out)) != len(out):
        raise BloodflError(f"{OPTION}={list(out)}: each of {', '.join(COPY_KINDS)} at most once; [] (the default) "
                           "adds no copies")
    return out


def option_text(kinds: Sequence[str]) -> str:
    return f"{OPTION}=[{','.join(kinds)}]"


def original_ref(ref: str) -> str:
    """The ref of the image a row's pixels come from (the row's own ref unless it is a copy)."""
    return ref.split(COPY_SEP, 1)[0]


def with_copies(table: SampleTable, kinds: Sequence[str]) -> tuple[SampleTable, np.ndarray]:
    """The table followed by one block of copies per kind, and each row's original (a row index of ``table``).

    Copies are rows like any other: a split assigns them independently (the flaw being measured). A table that
    renders its own images (synthetic) gets the flipped pixels here; file-based tables are flipped after
    decoding (:func:`copy_images`)."""
    source = np.tile(np.arange(len(table)), len(kinds) + 1)
    out = replace(table, images=None).subset(source)
    out.refs = [*table.refs, *(f"{r}{COPY_SEP}{k}" for k in kinds for r in table.refs)]
    if table.images is not None:
        out.images = copy_images(table.images, kinds)
    return out, source


def copy_images(images: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """The decoded originals followed by one flipped block per kind, in :func:`with_copies`' row order."""
    return np.ascontiguousarray(np.concatenate([np.asarray(images), *(COPY_KINDS[k](images) for k in kinds)]))


def leaked_test_rows(split: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Test rows whose original or one of its copies is in the training split: the test images a model has
    (up to a flip) trained on."""
    in_train = np.zeros(int(source.max()) + 1 if len(source) else 0, dtype=bool)
    in_train[source[split == "train"]] = True
    return np.flatnonzero((split == "test") & in_train[source])
