"""A run's input pipeline at inference: the same decoding, size, channels and normalization it was trained with.

Every run records it in ``preprocessing.json`` (written by ``bloodfl.runner`` beside ``splits.csv``): the image
size and resize mode, the mean/std actually used — for ``normalize=train`` the statistics of that run's training
split, which its config alone cannot give back — and the class names in label order. :class:`Preprocess` turns
image bytes into exactly the tensors the run's evaluation saw, by calling the training code itself
(``decode_image`` and ``ArrayDataModule.to_float``), never a copy of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.data.decode import RESIZE_MODES, decode_image
from bloodfl.data.io import read_bytes
from bloodfl.errors import BloodflError

PREPROCESSING_FILE = "preprocessing.json"
RECORD_VERSION = 1


@dataclass
class Preprocess:
    """Image bytes -> the normalized float tensor a run's model was evaluated on."""

    image_size: int
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _data: ArrayDataModule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise BloodflError(f"unknown resize mode {self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        # the evaluation path's own normalization (eval mode: no augmentation), not a re-implementation of it
        self._data = ArrayDataModule(normalize=self.normalize)

    @property
    def normalize(self) -> dict[str, list[float]]:
        """As a ``dataset.normalize`` value."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def decode(self, ref: str) -> np.ndarray:
        """A file path (or ``<zip>::<member>``) -> uint8 (S, S, 3) RGB, as the run's data module decoded it.
        Raises OSError (or any decoder error) for a file that is no readable image."""
        return decode_image(read_bytes(ref), self.image_size, self.resize)

    def to_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> normalized float (N, 3, S, S)."""
        batch = torch.as_tensor(np.asarray(images, dtype=np.uint8))
        return self._data.to_float(batch, train=False)


def record(image_size: int, resize: str, normalization: dict[str, list[float]], classes: list[str]) -> dict[str, Any]:
    """What ``preprocessing.json`` holds."""
    return {"version": RECORD_VERSION, "image_size": int(image_size), "resize": str(resize), "channels": "RGB",
            "normalize": {"mean": [float(v) for v in normalization["mean"]],
                          "std": [float(v) for v in normalization["std"]]},
            "classes": [str(c) for c in classes]}


def save_preprocessing(path: Path, dm: ArrayDataModule, image_size: int, resize: str) -> None:
    """Record a run's input pipeline once its data module is set up (normalize=train statistics are known)."""
    path.write_text(json.dumps(record(image_size, resize, dm.normalization, list(dm.classes or [])), indent=2) + "\n")


def load_preprocessing(path: Path) -> tuple[Preprocess, list[str]]:
    """(Preprocess, class names) from a run's ``preprocessing.json``."""
    try:
        doc = json.loads(path.read_text())
        norm = doc["normalize"]
        pre = Preprocess(int(doc["image_size"]), str(doc["resize"]), tuple(float(v) for v in norm["mean"]),
                         tuple(float(v) for v in norm["std"]))
        classes = [str(c) for c in doc["classes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BloodflError(f"{path} is unreadable ({type(exc).__name__}: {exc}); restore it from the run's "
                           "backup or retrain") from None
    return pre, classes
