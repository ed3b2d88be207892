"""Did the network learn anything? A run whose best validation accuracy is no better than always answering the
validation split's largest class says so loudly, instead of passing a chance-level model off as a result (e.g.
vgg16 from scratch at Adam 1e-3, which never leaves chance)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# within this many points of the majority share counts as "no better": a model that always answers one class
# reaches the share exactly; one point above it is still nothing a user would keep
MARGIN = 0.01


def majority_share(counts: Sequence[int] | np.ndarray) -> tuple[int, float]:
    """The largest class of a split and its share of the split's images."""
    counts = np.asarray(counts)
    if counts.sum() == 0:
        raise ValueError("an empty split has no majority class")
    c = int(counts.argmax())
    return c, float(counts[c] / counts.sum())


def no_better_than_majority(val_acc: float, counts: Sequence[int] | np.ndarray, classes: Sequence[str]) -> str | None:
    """One line naming the problem and what to try, or None when ``val_acc`` beats the majority share."""
    c, share = majority_share(counts)
    if val_acc > share + MARGIN:
        return None
    name = classes[c] if c < len(classes) else str(c)
    return (f"the model did not learn: its validation accuracy {val_acc:.4f} is no better than always answering "
            f"{name!r} ({share:.4f} of the validation images); try a lower learning rate (optim.lr=1e-4), "
            "model.pretrained=true where ImageNet weights can be had, or more epochs")
