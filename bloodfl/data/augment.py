"""Batched training augmentation on float images (B, 3, H, W) in [0, 1], before normalisation.

Every module draws its own random parameters per sample (kornia.augmentation, ``same_on_batch=False``)
from torch's global generator, so ``torch.manual_seed`` makes a run reproducible, and works on whatever
device the batch is on. Output has the input's shape, dtype and device, with values in [0, 1].
Modules always augment: the caller applies them to training batches only.

Hydra configs (conf/augment/*.yaml) instantiate these classes; each config carries a ``name`` key, which
the constructors accept and keep as ``self.name``.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

# Keras ImageDataGenerator fill_mode -> grid_sample padding (Keras "nearest" repeats the border pixel).
_FILL_MODES = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augmentation expects a float batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")


class Augment(nn.Module):
    """Base class: validates the batch, runs ``augment``, keeps the result in [0, 1] and the input dtype."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        out = self.augment(x)
        # out of place: kornia may hand back views of the input, which must stay untouched
        return out if out is x else out.clamp(0.0, 1.0).to(x.dtype)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NoAugment(Augment):
    """Identity: returns the batch itself."""

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Flips(Augment):
    """Random horizontal and vertical flips, each with probability ``p`` per sample (papers/001, Alam et al.).

    With both on, a sample stays as is, or is flipped horizontally, vertically or both, each with
    probability 1/4 at p=0.5: the paper's original + three flipped copies, drawn at random per batch.
    """

    def __init__(
        self, horizontal: bool = True, vertical: bool = True, p: float = 0.5, name: str | None = None
    ) -> None:
        super().__init__(name)
        ops: list[nn.Module] = []
        if horizontal:
            ops.append(K.RandomHorizontalFlip(p=p))
        if vertical:
            ops.append(K.RandomVerticalFlip(p=p))
        self.ops = nn.Sequential(*ops)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x) if len(self.ops) else x


class KerasAffine(Augment):
    """Keras ``ImageDataGenerator``-style augmentation (papers/004): random affine, flip, brightness.

    Parameters mean what the Keras arguments of the same role mean:
    - degrees: ``rotation_range``, rotation uniform in [-degrees, degrees].
    - translate: ``width_shift_range`` = ``height_shift_range``, shift uniform in [-t, t] x image size.
    - shear: ``shear_range``, in DEGREES: Keras documents it as the shear angle in degrees and applies
      ``np.deg2rad``, so the paper's ``shear_range=0.2`` is a +-0.2 degree x-shear, practically none.
      kornia's shear is in degrees too, so the number passes through unchanged.
    - zoom: ``zoom_range``, Keras draws zx, zy independently in [1 - z, 1 + z] and maps output to input
      coordinates with them, so the picture is magnified by 1/zx, 1/zy; we draw the magnification
      uniformly in that same range [1/(1 + z), 1/(1 - z)] per axis.
    - brightness: ``brightness_range``, a multiplicative factor (PIL's ImageEnhance.Brightness, as in
      Keras); None disables it.
    - horizontal_flip / vertical_flip: flip with probability 1/2.
    - fill: Keras ``fill_mode`` for pixels coming from outside the image: nearest (Keras default),
      reflect or constant (black).
    Order as in Keras' ``apply_transform``: affine, flips, brightness.
    """

    def __init__(
        self,
        degrees: float = 30.0,
        translate: float = 0.2,
        shear: float = 0.2,
        zoom: float = 0.2,
        brightness: Sequence[float] | None = (0.8, 1.2),
        horizontal_flip: bool = True,
        vertical_flip: bool = False,
        fill: str = "nearest",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if fill not in _FILL_MODES:
            raise ValueError(f"fill must be one of {sorted(_FILL_MODES)}, got {fill!r}")
        if not 0 <= zoom < 1:
            raise ValueError(f"zoom must be in [0, 1), got {zoom}")
        magnify = (1 / (1 + zoom), 1 / (1 - zoom))
        ops: list[nn.Module] = [
            K.RandomAffine(
                degrees=float(degrees),
                translate=(float(translate), float(translate)),
                scale=(*magnify, *magnify),
                shear=float(shear),
                padding_mode=_FILL_MODES[fill],
                p=1.0,
            )
        ]
        if horizontal_flip:
            ops.append(K.RandomHorizontalFlip(p=0.5))
        if vertical_flip:
            ops.append(K.RandomVerticalFlip(p=0.5))
        if brightness is not None:
            low, high = (float(b) for b in brightness)  # also accepts Hydra's ListConfig
            ops.append(K.ColorJitter(brightness=(low, high), p=1.0))
        self.ops = nn.Sequential(*ops)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)
