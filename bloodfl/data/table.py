"""The in-memory description of a data set: which images, which labels, which groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A reference to one image: a file path, or "<zip path>::<member>" for a member of a zip archive.
ZIP_SEP = "::"


@dataclass
class SampleTable:
    """One row per image.

    refs: image references (see ZIP_SEP); unique within a table.
    labels: class index per image, into ``classes``.
    classes: class names in the data set's fixed order.
    groups: a natural group key per image (smear id, source image) that a leakage-safe split keeps
        together; None when the data set has none.
    published_split: "train"/"test" per image when the data set publishes its own split, else None.
    images: decoded uint8 images (N, H, W, 3) when the source renders them itself (synthetic data);
        None for sources read from files.
    problems: human-readable notes about files a source skipped (junk files, unreadable images).
    """

    refs: list[str]
    labels: np.ndarray
    classes: list[str]
    name: str = ""
    groups: list[str] | None = None
    published_split: list[str] | None = None
    images: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.refs)
        if len(self.labels) != n:
            raise ValueError(f"{n} refs but {len(self.labels)} labels")
        for attr in ("groups", "published_split", "images"):
            value = getattr(self, attr)
            if value is not None and len(value) != n:
                raise ValueError(f"{n} refs but {len(value)} {attr}")

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def subset(self, index: np.ndarray | list[int]) -> SampleTable:
        """Rows ``index``, in that order (problems are kept: they describe the source)."""
        idx = np.asarray(index, dtype=np.int64)
        return SampleTable(
            refs=[self.refs[i] for i in idx],
            labels=self.labels[idx],
            classes=list(self.classes),
            name=self.name,
            groups=None if self.groups is None else [self.groups[i] for i in idx],
            published_split=None
            if self.published_split is None
            else [self.published_split[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            problems=list(self.problems),
        )
