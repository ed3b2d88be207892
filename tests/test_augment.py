"""Batched training augmentation: the Hydra configs, shapes, ranges, per-sample randomness, seeding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bloodfl.data.augment import Flips, KerasAffine, NoAugment

CONF = Path(__file__).resolve().parents[1] / "conf" / "augment"
CONFIGS = ["none", "flips", "rotate"]


def _from_config(name: str) -> torch.nn.Module:
    return instantiate(OmegaConf.load(CONF / f"{name}.yaml"))


def _asymmetric_batch(batch: int = 8, size: int = 16) -> torch.Tensor:
    """Identical images that no flip maps onto themselves."""
    img = torch.linspace(0, 1, 3 * size * size).reshape(3, size, size) ** 2
    return img.expand(batch, -1, -1, -1).contiguous()


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_instantiates_with_its_name(name: str) -> None:
    aug = _from_config(name)
    assert aug.name == name
    expected = {"none": NoAugment, "flips": Flips, "rotate": KerasAffine}[name]
    assert type(aug) is expected


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", CONFIGS)
def test_shape_dtype_device_and_range_preserved(name: str, device: str) -> None:
    aug = _from_config(name)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(6, 3, 20, 24, dtype=dtype, device=device)
        before = x.clone()
        out = aug(x)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(x, before), "the input batch must not be modified"


def test_no_augment_is_identity() -> None:
    x = torch.rand(4, 3, 8, 8)
    assert NoAugment(name="none")(x) is x


def test_flips_give_exact_flipped_copies_and_all_four_occur() -> None:
    x = _asymmetric_batch(batch=64)
    torch.manual_seed(0)
    out = Flips(horizontal=True, vertical=True, p=0.5)(x)
    variants = {
        "id": x[0],
        "h": torch.flip(x[0], dims=[-1]),
        "v": torch.flip(x[0], dims=[-2]),
        "hv": torch.flip(x[0], dims=[-2, -1]),
    }
    seen = []
    for sample in out:
        match = [k for k, v in variants.items() if torch.equal(sample, v)]
        assert len(match) == 1, "every sample is exactly the image or one of its flips"
        seen.append(match[0])
    assert set(seen) == set(variants)


def test_horizontal_only_never_flips_vertically() -> None:
    x = _asymmetric_batch(batch=32)
    torch.manual_seed(1)
    out = Flips(horizontal=True, vertical=False, p=0.5)(x)
    flipped = torch.flip(x[0], dims=[-1])
    kinds = [torch.equal(s, x[0]) or torch.equal(s, flipped) for s in out]
    assert all(kinds)
    assert any(torch.equal(s, flipped) for s in out) and any(torch.equal(s, x[0]) for s in out)


@pytest.mark.parametrize("name", ["flips", "rotate"])
def test_parameters_differ_within_a_batch(name: str) -> None:
    x = _asymmetric_batch(batch=16)
    torch.manual_seed(0)
    out = _from_config(name)(x)
    distinct = {tuple(s.flatten()[::7].tolist()) for s in out}
    # flips have 4 outcomes (not necessarily all in 16 draws); the affine draws continuous parameters,
    # so every sample differs
    if name == "flips":
        assert len(distinct) >= 2
    else:
        assert len(distinct) == 16


@pytest.mark.parametrize("name", ["flips", "rotate"])
def test_seeding_makes_it_reproducible(name: str) -> None:
    aug = _from_config(name)
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    b = aug(x)
    torch.manual_seed(124)
    c = aug(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_brightness_is_multiplicative_per_sample() -> None:
    aug = KerasAffine(degrees=0, translate=0, shear=0, zoom=0, brightness=(0.8, 1.2), horizontal_flip=False)
    x = torch.full((32, 3, 8, 8), 0.5)
    torch.manual_seed(0)
    factor = aug(x) / x
    per_sample = factor[:, 0, 0, 0]
    assert torch.allclose(factor, per_sample[:, None, None, None].expand_as(factor), atol=1e-5)
    assert per_sample.min() >= 0.8 - 1e-5 and per_sample.max() <= 1.2 + 1e-5
    assert len(torch.unique(per_sample)) == 32


def test_nearest_fill_keeps_border_colour_constant_fill_is_black() -> None:
    x = torch.full((8, 3, 16, 16), 0.7)
    geometric = dict(degrees=45, translate=0.2, shear=0.2, zoom=0.2, brightness=None, horizontal_flip=False)
    torch.manual_seed(0)
    nearest = KerasAffine(fill="nearest", **geometric)(x)
    assert torch.allclose(nearest, x, atol=1e-5), "Keras fill_mode=nearest repeats the edge: no dark corners"
    torch.manual_seed(0)
    constant = KerasAffine(fill="constant", **geometric)(x)
    assert (constant < 0.1).any()


def test_zoom_follows_keras_range() -> None:
    aug = KerasAffine(degrees=0, translate=0, shear=0, zoom=0.2, brightness=None, horizontal_flip=False)
    torch.manual_seed(0)
    aug(torch.rand(256, 3, 8, 8))
    scale = aug.ops[0]._params["scale"]
    assert scale.shape == (256, 2)
    assert scale.min() >= 1 / 1.2 - 1e-6 and scale.max() <= 1 / 0.8 + 1e-6
    assert not torch.allclose(scale[:, 0], scale[:, 1]), "Keras draws zx and zy independently"


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="fill"):
        KerasAffine(fill="wrap-around")
    with pytest.raises(ValueError, match="float batch"):
        Flips()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="float batch"):
        Flips()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
