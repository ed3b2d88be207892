"""Model registry, the paper head, and weights loading (pretrained offline, local files)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from bloodfl.errors import BloodflError
from bloodfl.models import build_classifier, list_models, model_config
from bloodfl.models.heads import PaperHead
from tests.conftest import run_cli


def test_registry_lists_and_filters() -> None:
    names = list_models()
    for required in ("vgg16", "vgg19", "resnet50", "inception_v3", "densenet121", "efficientnet_b0",
                     "mobilenetv2", "resnet18", "simple_cnn"):
        assert required in names
    assert list_models("resnet*") == [n for n in names if n.startswith("resnet")]


def test_unknown_model_lists_valid_ones() -> None:
    with pytest.raises(BloodflError, match=r"unknown model 'vgg17'; valid models: .*vgg16"):
        build_classifier("vgg17", 4, 32)


def test_paper_head_layers_and_shapes() -> None:
    head = PaperHead((64, 4, 4), num_classes=5)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head.mlp[0].in_features == 64 * 4 * 4 and head.mlp[0].out_features == 1024
    assert head.mlp[2].p == 0.5
    assert head(torch.randn(2, 64, 4, 4)).shape == (2, 5)
    pooled = PaperHead((64, 4, 4), num_classes=5, pool="avg", hidden=0)
    assert [type(m).__name__ for m in pooled.mlp] == ["Linear"] and pooled.mlp[0].in_features == 64


def test_classifier_outputs_logits_and_probabilities() -> None:
    model = build_classifier("simple_cnn", 8, 32).eval()
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 8)
    assert torch.allclose(model.predict_proba(x).sum(1), torch.ones(3), atol=1e-5)


def test_vgg_carries_no_unused_classifier_weights() -> None:
    n = sum(p.numel() for p in build_classifier("vgg16", 8, 32).parameters())
    # 14.7M conv weights + head; timm's unused fc6/fc7 (pre_logits) would add ~120M
    assert n < 20_000_000


def test_image_too_small_for_model() -> None:
    with pytest.raises(BloodflError, match="at least 75 px"):
        build_classifier("inception_v3", 4, 32)


def test_local_weights_file_roundtrip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = build_classifier("resnet18", 4, 32)
    path = tmp_path / "w.pth"
    torch.save(a.backbone.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="bloodfl"):
        b = build_classifier("resnet18", 4, 32, weights=str(path))
    for (k, va), vb in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        assert torch.equal(va, vb), k
    n = len(a.backbone.state_dict())
    assert f"loaded {n}/{n} backbone tensors from {path}" in caplog.text


def test_missing_or_foreign_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BloodflError, match="not found"):
        build_classifier("resnet18", 4, 32, weights=str(tmp_path / "nope.pth"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(BloodflError, match="matches no parameter"):
        build_classifier("resnet18", 4, 32, weights=str(tmp_path / "x.pth"))


def test_pretrained_offline_fails_clearly(tmp_path: Path) -> None:
    """No silent fall-back to random weights: the run stops and names both alternatives."""
    res = run_cli("train.py", ["model=resnet18", "model.pretrained=true", "trainer.fast_dev_run=true",
                               "dataset.source.n_per_class=10"], tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert "ImageNet weights" in err and "model.weights=" in err and "model.pretrained=false" in err
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("name", "size", "channels"), [("squeezenet", 17, 512), ("googlenet", 15, 1024),
                                                         ("shufflenetv2", 16, 1024)])
def test_torchvision_backbones_at_their_minimum_size(name: str, size: int, channels: int) -> None:
    import torchvision

    model = build_classifier(name, 8, size)
    assert model.head.mlp[0].in_features == channels  # 1x1 map at the minimum size
    x = torch.randn(2, 3, size, size)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # torchvision's own module names: its state dicts (less the classifier) load with model.weights=PATH
    arch = {"squeezenet": "squeezenet1_1", "shufflenetv2": "shufflenet_v2_x1_0"}.get(name, name)
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    tv_keys = set(torchvision.models.get_model(arch, weights=None, **extra).state_dict())
    assert set(model.backbone.state_dict()) <= tv_keys
    with pytest.raises(BloodflError, match="at least"):
        build_classifier(name, 8, size - 1)


def test_torchvision_pretrained_offline_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BloodflError, match="torchvision's download server") as info:
        build_classifier("squeezenet", 4, 32, pretrained=True)
    assert "model.weights=" in str(info.value) and "model.pretrained=false" in str(info.value)


def test_small_vit_follows_image_size() -> None:
    model = build_classifier("vit_small", 8, 16)
    assert model.backbone.patch_embed.patch_size == (8, 8) and model.backbone.patch_embed.num_patches == 4
    model(torch.randn(2, 3, 16, 16)).sum().backward()


@pytest.mark.parametrize(("preset", "kinds", "hidden"), [
    ("paper000", ["Linear", "ReLU", "Dropout", "Linear"], 1024),
    ("paper003", ["Linear", "ReLU", "Dropout", "Linear"], 128),
    ("paper004", ["Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"], 1024),
    ("paper004_vit", ["Linear", "ReLU", "Dropout", "Linear"], 128),
])
def test_head_presets(preset: str, kinds: list[str], hidden: int, tmp_path: Path) -> None:
    from bloodfl.compose import Root
    from tests.conftest import compose_cfg

    root = Root(compose_cfg(["model=paper003_cnn", f"+head={preset}", "dataset.image_size=16"], tmp_path))
    assert root.cfg.model.head.pool == "flatten"  # the preset replaces the model's own head settings
    net = root.network(num_classes=4)
    assert [type(m).__name__ for m in net.head.mlp] == kinds
    assert net.head.mlp[0].out_features == hidden and net.head.mlp[0].in_features == 256 * 9 * 9
    net(torch.randn(2, 3, 16, 16)).sum().backward()


def test_torchvision_googlenet_trains_under_dp() -> None:
    """torchvision's BasicConv2d ReLU is in place; the adapter's is not, so Opacus' hooks accept GoogLeNet."""
    from bloodfl.privacy.engine import prepare_model

    _, _, mode = prepare_model(build_classifier("googlenet", 4, 32), (3, 32, 32), "auto")
    assert mode == "ghost"


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_at_its_minimum_size(name: str) -> None:
    """Parametrised over conf/model: a new config is tested automatically. Forward and backward on a tiny batch
    at the model's minimum input size give num_classes logits and a gradient for every trainable parameter."""
    from bloodfl.models import model_config

    size = int(model_config(name).min_size)
    torch.manual_seed(0)
    model = build_classifier(name, 5, size)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name


@pytest.mark.parametrize("name", [n for n in list_models() if n != "nasnet" and model_config(n).source == "timm"])
def test_library_backbones_have_the_librarys_parameter_count(name: str) -> None:
    """A timm backbone is timm's own model (less its classifier and the modules the config drops); torchvision's
    keep torchvision's names (test above), bloodfl's own are checked against the papers (test_paper_models)."""
    import timm

    cfg = model_config(name)
    size = max(int(cfg.min_size), 32)
    kwargs = {cfg.size_kwarg: size} if cfg.size_kwarg else {}
    ref = timm.create_model(cfg.arch, pretrained=False, num_classes=0, **kwargs)
    dropped = sum(p.numel() for d in cfg.drop for p in getattr(ref, d).parameters())
    ours = build_classifier(name, 5, size).backbone
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) - dropped


def test_scatternet_is_kymatios_scattering_with_its_filters_out_of_the_state_dict() -> None:
    """The scattering stage computes what kymatio's Scattering2D computes; its fixed filters move with the model
    but are never in the state dict (so never averaged, sent or checkpointed)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    model = build_classifier("scatternet", 4, 32)
    assert not [k for k in model.state_dict() if "scattering" in k]
    assert len(list(model.backbone.scattering.buffers())) > 0
    x = torch.rand(2, 3, 32, 32)
    ref = ScatteringTorch2D(J=2, shape=(32, 32), L=8)
    assert torch.allclose(model.backbone.scattering(x), ref(x))
    assert model.double().backbone.scattering(x.double()).dtype == torch.float64  # buffers follow .to/.double
    assert model.backbone.scatter_norm.num_channels == 3 * 81
    assert build_classifier("scatternet", 4, 34)(torch.rand(1, 3, 34, 34)).shape == (1, 4)  # any size kymatio pads


def test_color_hist_counts_each_channels_pixels_in_its_bins_with_nothing_in_the_state_dict() -> None:
    """Pixels on bin centres land in their bin (a hard histogram), a pixel between two centres splits linearly, one
    beyond the range counts in the outer bin; features are sqrt(bins * fraction) per channel, and only the linear
    head is trained, saved and sent (388 parameters for 4 classes)."""
    model = build_classifier("color_hist", 4, 16)
    hist = model.backbone
    bins = hist.centers.numel()
    assert list(model.state_dict()) == ["head.mlp.0.weight", "head.mlp.0.bias"]
    assert sum(p.numel() for p in model.parameters()) == 3 * bins * 4 + 4
    torch.manual_seed(0)
    idx = torch.randint(0, bins, (2, 3, 16, 16))
    feats = hist.forward_features(hist.centers[idx]).flatten(1).view(2, 3, bins)
    fractions = torch.stack([torch.stack([torch.bincount(idx[b, c].flatten(), minlength=bins) for c in range(3)])
                             for b in range(2)]) / 256
    torch.testing.assert_close(feats, (bins * fractions).sqrt())
    between = (hist.centers[3] + hist.centers[4]) / 2
    x = torch.full((1, 3, 16, 16), float(between))
    x[0, 1] = 100.0  # beyond the range: the last bin
    h = hist.forward_features(x).flatten(1).view(3, bins).square() / bins
    torch.testing.assert_close(h[0, 3:5], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(h[1, -1], torch.tensor(1.0))
    torch.testing.assert_close(h.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="bins >= 2 and low < high"):
        type(hist)(bins=1)


def test_color_hist_joint_counts_whole_colours_that_per_channel_histograms_confuse() -> None:
    """Two images with the same per-channel histograms but different colours (half red + half blue against half
    magenta + half black) get the same color_hist features and different joint features, each pixel's colour
    landing in its (r, g, b) bin; only the head is in the state dict."""
    joint, per_channel = build_classifier("color_hist_joint", 8, 16), build_classifier("color_hist", 8, 16)
    c = joint.backbone.centers
    lo, hi = c[0], c[-1]
    a = torch.empty(1, 3, 16, 16)
    a[0, :, :8] = torch.stack([hi, lo, lo])[:, None, None]   # red
    a[0, :, 8:] = torch.stack([lo, lo, hi])[:, None, None]   # blue
    b = torch.empty(1, 3, 16, 16)
    b[0, :, :8] = torch.stack([hi, lo, hi])[:, None, None]   # magenta
    b[0, :, 8:] = torch.stack([lo, lo, lo])[:, None, None]   # black
    torch.testing.assert_close(per_channel.backbone.forward_features(a), per_channel.backbone.forward_features(b))
    bins = c.numel()
    ha = joint.backbone.forward_features(a).flatten().square().view(bins, bins, bins) / bins**3
    hb = joint.backbone.forward_features(b).flatten().square().view(bins, bins, bins) / bins**3
    n = bins - 1
    expected_a, expected_b = torch.zeros(bins, bins, bins), torch.zeros(bins, bins, bins)
    expected_a[n, 0, 0] = expected_a[0, 0, n] = 0.5
    expected_b[n, 0, n] = expected_b[0, 0, 0] = 0.5
    torch.testing.assert_close(ha, expected_a)
    torch.testing.assert_close(hb, expected_b)
    assert list(joint.state_dict()) == ["head.mlp.0.weight", "head.mlp.0.bias"]
    assert sum(p.numel() for p in joint.parameters()) == bins**3 * 8 + 8
