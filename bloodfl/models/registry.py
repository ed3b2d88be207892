"""Model registry: the names users type (``model=vgg16``), what each builds, and how weights are loaded."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bloodfl.errors import BloodflError
from bloodfl.models.heads import PaperHead
from bloodfl.models.simple_cnn import SimpleCNN


@dataclass(frozen=True)
class ModelSpec:
    name: str
    timm_name: str | None  # None: built by bloodfl itself
    min_image_size: int
    paper: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


for _spec in [
    ModelSpec("simple_cnn", None, 16, "small CNN for tests and the demo"),
    ModelSpec("vgg16", "vgg16", 32, "papers/000, 001, 003"),
    ModelSpec("vgg19", "vgg19", 32, "papers/000, 003, 004"),
    ModelSpec("resnet18", "resnet18", 16),
    ModelSpec("resnet50", "resnet50", 16, "papers/000, 001, 002, 003, 004"),
    ModelSpec("resnet101", "resnet101", 16, "papers/003"),
    ModelSpec("resnet152", "resnet152", 16, "papers/003"),
    ModelSpec("inception_v3", "inception_v3", 75, "papers/000, 001, 002, 003"),
    ModelSpec("densenet121", "densenet121", 32, "papers/001"),
    ModelSpec("densenet201", "densenet201", 32, "papers/003"),
    ModelSpec("efficientnet_b0", "efficientnet_b0", 16, "papers/001"),
    ModelSpec("mobilenetv2", "mobilenetv2_100", 16, "papers/001, 003"),
    ModelSpec("xception", "legacy_xception", 32, "papers/002, 004"),
    ModelSpec("vit_tiny", "vit_tiny_patch16_224", 16, "small ViT"),
    ModelSpec("vit_base", "vit_base_patch16_224", 16, "papers/004"),
]:
    register(_spec)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted (like ``timm.list_models``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise BloodflError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _REGISTRY[name]


class BloodCellClassifier(nn.Module):
    """A backbone's feature extractor followed by the paper head; ``forward`` returns logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.model_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(dim=1)


def _create_backbone(spec: ModelSpec, image_size: int, pretrained: bool) -> nn.Module:
    if spec.timm_name is None:
        return SimpleCNN()
    kwargs: dict[str, Any] = {"num_classes": 0}
    if spec.timm_name.startswith("vit_"):
        kwargs["img_size"] = image_size
    try:
        backbone = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        # huggingface_hub raises LocalEntryNotFoundError (an OSError) when offline and nothing is cached
        raise BloodflError(
            f"could not get ImageNet weights for {spec.name!r} ({spec.timm_name}) from the Hugging Face hub "
            f"({type(exc).__name__}); either run once online so timm caches them, or set "
            "model.weights=/path/to/weights.pth (a local state dict), or model.pretrained=false to train "
            "from scratch"
        ) from exc
    # timm's VGG keeps its fc6/fc7 (as convs, ~120M parameters) in pre_logits, which forward_features never
    # uses: drop them so they are not trained, averaged or sent to clients
    if hasattr(backbone, "pre_logits") and spec.timm_name.startswith("vgg"):
        backbone.pre_logits = nn.Identity()
    return backbone


def _load_weights_file(model: BloodCellClassifier, path: str) -> str:
    """Load a local weights file into the whole classifier or its backbone; returns what was loaded."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise BloodflError(f"model.weights file not found: {file} (give the path of a .pth/.pt/.safetensors)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise BloodflError(f"model.weights file {file} holds no state dict")
    for prefix in ("net.", "model.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    target_module = model if any(k.startswith("backbone.") for k in state) else model.backbone
    target = "classifier" if target_module is model else "backbone"
    wanted = target_module.state_dict()
    loaded = sum(k in wanted for k in state)
    if loaded == 0:
        raise BloodflError(
            f"model.weights file {file} matches no parameter of {model.model_name!r}: "
            f"is it a state dict for this architecture?"
        )
    try:
        _, unexpected = target_module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise BloodflError(f"model.weights file {file} does not fit {model.model_name!r}: {first}") from exc
    return f"loaded {loaded}/{len(wanted)} {target} tensors from {file} ({len(unexpected)} unused)"


def build_classifier(
    name: str,
    num_classes: int,
    image_size: int,
    pretrained: bool = False,
    weights: str | None = None,
    head: dict[str, Any] | None = None,
) -> BloodCellClassifier:
    """Build ``name``'s backbone with the paper head sized for ``image_size`` inputs."""
    spec = get_spec(name)
    if image_size < spec.min_image_size:
        raise BloodflError(
            f"model {name!r} needs images of at least {spec.min_image_size} px, got dataset.image_size="
            f"{image_size}; raise dataset.image_size"
        )
    if pretrained and weights:
        raise BloodflError("set either model.pretrained=true or model.weights=PATH, not both")
    backbone = _create_backbone(spec, image_size, pretrained)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feat_shape = tuple(backbone.forward_features(torch.zeros(1, 3, image_size, image_size)).shape[1:])
    backbone.train(was_training)
    model = BloodCellClassifier(backbone, PaperHead(feat_shape, num_classes, **(head or {})), name)
    if weights:
        model.weights_info = _load_weights_file(model, weights)  # type: ignore[attr-defined]
    return model
