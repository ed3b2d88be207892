"""Grad-CAM overlays (the ``grad-cam`` library): where in the image the evidence for the predicted class lies.

Target layer: the backbone's feature map — the output of ``forward_features``, i.e. the last spatial activation
the head sees. That is the layer Grad-CAM was defined on ("the last convolutional layer", the choice of the
library's examples: ``layer4[-1]`` of a ResNet, ``features[-1]`` of a VGG/DenseNet), found the same way for
every model of the zoo (timm, the torchvision adapters, the CNNs written here), since all of them expose
``forward_features``. Simply taking the last ``nn.Conv2d`` in module order would often be wrong: in a ResNet it
comes before the residual addition and final ReLU, in DenseNets, Inception and Xception it is one branch of a
concatenation, and a ShuffleNet's channel shuffle follows it. Vision transformers return tokens (B, N, C): their
patch tokens are laid back on the patch grid (class/register tokens dropped), the usual way to apply Grad-CAM
to a ViT. A model whose features are neither is refused with a one-line error.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bloodfl.data.decode import _fit_size, to_rgb
from bloodfl.data.io import read_bytes
from bloodfl.errors import BloodflError

MIN_DISPLAY = 256  # overlays of small crops (rbc cells are 21-112 px wide) are scaled up to be readable


class _Features(nn.Module):
    """``backbone.forward_features`` as a module of its own, so Grad-CAM's hooks can watch its output."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class CamModel(nn.Module):
    """The classifier as ``head(features(x))``: the same computation, with the feature map as a hookable module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not (hasattr(model, "backbone") and hasattr(model.backbone, "forward_features") and hasattr(model, "head")):
            raise BloodflError(f"--cam needs a bloodfl classifier (backbone + head), got {type(model).__name__}")
        self.features = _Features(model.backbone)
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def token_grid(backbone: nn.Module, tokens: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For (B, N, C) transformer features: a reshape to (B, C, h, w) over the patch tokens, or None if the tokens
    do not form a square grid."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 1 if getattr(backbone, "cls_token", None) is not None else 0))
    side = math.isqrt(max(tokens - prefix, 0))
    if side == 0 or side * side != tokens - prefix:
        return None

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


class CamMaker:
    """Grad-CAM maps for a batch of preprocessed inputs and the classes to explain; use as a context manager."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model = CamModel(model)
        device = next(model.parameters()).device
        with torch.enable_grad():
            probe = self.model.features(torch.zeros(1, 3, image_size, image_size, device=device,
                                                    requires_grad=True))
        name = getattr(model, "model_name", type(model).__name__)
        if not probe.requires_grad:  # Grad-CAM weighs the map by the class score's gradient at it
            raise BloodflError(f"--cam: model {name!r} computes its features without gradients (fixed features, "
                               "e.g. color_hist): Grad-CAM has no gradient to weigh them by; run without --cam")
        probe = probe.detach()
        reshape = None
        if probe.dim() == 3:
            reshape = token_grid(model.backbone, probe.shape[1])
        if probe.dim() != 4 and reshape is None:
            raise BloodflError(f"--cam: model {name!r} has no spatial "
                               f"feature map (features of shape {tuple(probe.shape[1:])}); run without --cam")
        # the map's true resolution (e.g. 2x2 for a ResNet at 64 px): the overlay can be no finer than this
        self.grid = tuple((reshape(probe) if reshape is not None else probe).shape[-2:])
        self.cam = GradCAM(model=self.model, target_layers=[self.model.features], reshape_transform=reshape)

    def __enter__(self) -> CamMaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cam.activations_and_grads.release()

    def maps(self, x: torch.Tensor, classes: list[int]) -> np.ndarray:
        """(B, S, S) maps in [0, 1] at the model's input size, each for its class in ``classes``."""
        with torch.enable_grad():
            return self.cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


def _resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))


def overlay(ref: str, cam: np.ndarray, resize: str) -> Image.Image:
    """The original image (left) and the map laid over it (right), at the image's own resolution (small crops
    scaled up). The map is taken back through the run's resize: for ``pad`` only the part over the image counts."""
    img = to_rgb(Image.open(io.BytesIO(read_bytes(ref))))
    w, h = img.size
    size = cam.shape[0]
    if resize == "pad":  # the image sat centred in the square input, its longer side = size
        tw, th = _fit_size(w, h, size)
        x0, y0 = (size - tw) // 2, (size - th) // 2
        cam = cam[y0:y0 + th, x0:x0 + tw]
    scale = max(1.0, MIN_DISPLAY / max(w, h))
    display = (max(1, round(w * scale)), max(1, round(h * scale)))
    if display != (w, h):
        img = img.resize(display, Image.Resampling.BICUBIC)
    mask = np.clip(_resize_map(cam, display), 0.0, 1.0)
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    heat = show_cam_on_image(rgb, mask, use_rgb=True, image_weight=0.5)
    return Image.fromarray(np.concatenate([np.asarray(img, dtype=np.uint8), heat], axis=1))


def cam_file_names(names: list[str]) -> list[str]:
    """``<name>_cam.png`` per input (folders joined by ``__``), unique even for ``a.jpg`` beside ``a.png``."""
    used: set[str] = set()
    out = []
    for name in names:
        p = Path(name)
        stem = "__".join([*p.parent.parts, p.stem]) if p.parent.parts else p.stem
        candidate, n = f"{stem}_cam.png", 1
        if candidate in used:
            candidate = f"{stem}_{p.suffix.lstrip('.')}_cam.png"
        while candidate in used:
            n += 1
            candidate = f"{stem}_{n}_cam.png"
        used.add(candidate)
        out.append(candidate)
    return out
