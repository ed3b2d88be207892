"""The model zoo: every ``conf/model/<name>.yaml`` is a model users can name (``model=vgg16``).

A model config names its architecture (``source``/``arch``), its native and minimum input size and the head;
``create_classifier`` (its ``_target_``) builds the backbone's feature extractor with the papers' head on top.
Architectures written here (not taken from timm) register themselves with ``@register_model``, as timm's do.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bloodfl.config import group_options, instantiate, load_option
from bloodfl.errors import BloodflError
from bloodfl.models.heads import PaperHead

log = logging.getLogger("bloodfl")

_BLOODFL_ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a backbone factory written here under ``arch`` = ``name`` (source: bloodfl)."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BLOODFL_ARCHS[name] = fn
        return fn

    return add


def format_params(count: int) -> str:
    """A parameter count as people read it: ``11.71M`` for backbones, ``388`` for the tiny DP models."""
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count:,}"


def list_models(pattern: str = "*") -> list[str]:
    """Model names (the options of ``conf/model``) matching a shell-style pattern, sorted, like timm's."""
    return [n for n in group_options("model") if fnmatch.fnmatch(n, pattern)]


def model_config(name: str) -> Any:
    """The composed config of ``model=<name>``."""
    if name not in list_models():
        raise BloodflError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return load_option("model", name)


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


def _create_backbone(name: str, source: str, arch: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    if source == "bloodfl":
        if pretrained:
            raise BloodflError(f"model {name!r} is written here and has no pretrained weights; use model.weights=PATH "
                               "or model.pretrained=false")
        if arch not in _BLOODFL_ARCHS:
            raise BloodflError(f"model {name!r}: no architecture {arch!r} is registered in bloodfl.models")
        return _BLOODFL_ARCHS[arch](**kwargs)
    if source == "torchvision":
        return _create_torchvision_backbone(name, arch, kwargs, pretrained)
    if source != "timm":
        raise BloodflError(f"model {name!r}: unknown model.source {source!r}; valid: timm, torchvision, bloodfl")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        # huggingface_hub raises LocalEntryNotFoundError (an OSError) when offline and nothing is cached
        raise _offline_weights_error(name, arch, "the Hugging Face hub", exc) from exc


def _offline_weights_error(name: str, arch: str, where: str, exc: BaseException) -> BloodflError:
    return BloodflError(
        f"could not get ImageNet weights for {name!r} ({arch}) from {where} "
        f"({type(exc).__name__}); either run once online so they are cached, or set "
        "model.weights=/path/to/weights.pth (a local state dict), or model.pretrained=false to train "
        "from scratch"
    )


def _create_torchvision_backbone(name: str, arch: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    from bloodfl.models.torchvision_adapter import FEATURE_MODULES, create_torchvision_backbone

    if arch not in FEATURE_MODULES:
        raise BloodflError(f"model {name!r}: torchvision architecture {arch!r} has no feature adapter; "
                           f"adapted: {', '.join(FEATURE_MODULES)}")
    if kwargs:
        raise BloodflError(f"model {name!r}: torchvision backbones take no size_kwarg")
    try:
        return create_torchvision_backbone(arch, pretrained)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        # urllib's URLError (an OSError) when offline and nothing is in $TORCH_HOME/hub/checkpoints
        raise _offline_weights_error(name, arch, "torchvision's download server", exc) from exc


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


def create_classifier(
    name: str,
    num_classes: int,
    image_size: int,
    source: str = "timm",
    arch: str | None = None,
    native_size: int = 224,
    min_size: int = 32,
    size_kwarg: str | None = None,
    drop: Sequence[str] = (),
    pretrained: bool = False,
    weights: str | None = None,
    head: dict[str, Any] | None = None,
) -> BloodCellClassifier:
    """The ``_target_`` of every model config: backbone ``arch`` from ``source`` with the paper head sized for
    ``image_size`` inputs. ``native_size`` is informational (what pretrained weights expect)."""
    if image_size < min_size:
        raise BloodflError(
            f"model {name!r} needs images of at least {min_size} px, got dataset.image_size={image_size}; "
            f"raise dataset.image_size (or leave it unset: the default fits every model)"
        )
    if pretrained and weights:
        raise BloodflError("set either model.pretrained=true or model.weights=PATH, not both")
    kwargs = {size_kwarg: image_size} if size_kwarg else {}
    backbone = _create_backbone(name, source, arch or name, kwargs, pretrained)
    for unused in drop:
        setattr(backbone, unused, nn.Identity())
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feat_shape = tuple(backbone.forward_features(torch.zeros(1, 3, image_size, image_size)).shape[1:])
    backbone.train(was_training)
    model = BloodCellClassifier(backbone, PaperHead(feat_shape, num_classes, **(head or {})), name)
    if weights:
        log.info(_load_weights_file(model, weights))
    return model


def build_classifier(name: str, num_classes: int, image_size: int, **overrides: Any) -> BloodCellClassifier:
    """``model=<name>`` outside a Hydra app (tests, benchmarks, notebooks); ``overrides`` replace config keys."""
    cfg = model_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg, num_classes=num_classes, image_size=image_size, _convert_="all")
