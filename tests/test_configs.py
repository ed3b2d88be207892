"""Every option of every config group composes from the command line AND builds what it describes through the
composition root (lightning-hydra-template's "instantiate every config" test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from bloodfl.compose import Root
from bloodfl.config import dp_default_model, group_options
from tests.conftest import CONF_DIR, compose_cfg

TRAIN_GROUPS = ["dataset", "model", "split", "augment", "trainer", "logger", "callbacks", "finetune", "dp"]
OPTIONS = [(g, o) for g in TRAIN_GROUPS for o in group_options(g)]


def _cfg(group: str, option: str, tmp_path: Path, config: str = "train") -> Root:
    overrides = [f"{group}='{option}'"]
    if (group, option) == ("dataset", "imagefolder"):
        overrides.append(f"dataset.root={tmp_path}")
    return Root(compose_cfg(overrides, tmp_path, config))


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_instantiates(group: str, option: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = _cfg(group, option, tmp_path)
    cfg = root.cfg
    if group in ("dataset", "model", "split"):
        assert cfg[group].name == option
    if group == "dataset":
        dm = root.datamodule()  # builds the DataModule; reading the images is test_real_data's job
        assert dm.dataset_cfg.name == option and dm.batch_size == cfg.loader.batch_size
        assert root.image_size >= int(cfg.model.min_size)
    elif group == "model":
        size = max(int(cfg.model.min_size), 32)
        monkeypatch.setattr(root.cfg.dataset, "image_size", size)
        net = root.network(num_classes=3)
        assert net.eval()(torch.zeros(1, 3, size, size)).shape == (1, 3)
        assert int(cfg.model.min_size) <= int(cfg.model.native_size)
    elif group == "split":
        from bloodfl.data.splits import assign_splits

        spec = root.datamodule().split_spec
        labels = np.repeat(np.arange(3), 40)
        published = np.where(np.arange(120) % 5 == 0, "test", "train")
        split = assign_splits(labels, spec, published=published if spec.kind == "published" else None)
        assert {"train", "val", "test"} == set(split)
    elif group == "augment":
        x = torch.rand(4, 3, 16, 16)
        aug = root.augmentation()
        assert aug is not None and aug(x).shape == x.shape
    elif group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            with pytest.raises(Exception, match="(?i)gpu|cuda|not available"):
                root.trainer([], [])
        else:
            assert isinstance(root.trainer([], []), pl.Trainer)
    elif group == "logger":
        monkeypatch.setenv("WANDB_MODE", "offline")
        loggers = root.loggers()
        assert len(loggers) == {"none": 0, "many": 3}.get(option, 1)
    elif group == "callbacks":
        assert all(isinstance(c, pl.Callback) for c in root.callbacks())
    elif group == "finetune":
        from bloodfl.training.finetune import BackboneFinetune

        assert sum(isinstance(c, BackboneFinetune) for c in root.callbacks()) == (option != "full")
    elif group == "dp":
        settings = root.dp_settings()
        assert (settings is None) == (option == "false")


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_every_strategy_builds(strategy: str, tmp_path: Path) -> None:
    root = Root(compose_cfg([f"fl.strategy={strategy}"], tmp_path, "federate"))
    assert root.strategy().name == strategy
    assert root.round_settings().rounds == root.cfg.fl.rounds


@pytest.mark.parametrize("name", ["cosine", "plateau"])
def test_every_scheduler_builds(name: str, tmp_path: Path) -> None:
    root = Root(compose_cfg([f"optim.scheduler={name}"], tmp_path))
    opt = root.optimizer()([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == root.cfg.optim.lr
    settings = root.scheduler()
    assert settings is not None and settings["interval"] == "epoch"
    assert isinstance(settings["scheduler"](opt), torch.optim.lr_scheduler.LRScheduler
                      | torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_unknown_option_lists_the_valid_ones() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_cfg(["model=vgg17"])
    assert "vgg16" in str(info.value.options)


def test_every_model_config_inherits_the_one_base() -> None:
    for path in (CONF_DIR / "model").glob("*.yaml"):
        assert "/model_base/default@_here_" in path.read_text(), path.name


@pytest.mark.parametrize(("overrides", "warned"), [
    ([], False),                                     # dp=true's own model at its own rate
    (["model=dp_cnn", "optim.lr=1e-2"], False),      # another model, its rate given
    (["model=dp_cnn"], True),                        # another model at the default model's rate: say so
])
def test_dp_true_says_when_another_model_runs_at_the_default_models_rate(
        overrides: list[str], warned: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = Root(compose_cfg(["dp='true'", "dataset=synthetic", "dataset.image_size=16", *overrides], tmp_path))
    with caplog.at_level("INFO", logger="bloodfl"):
        root.network(num_classes=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) == warned, warnings
    if warned:
        assert warnings == [f"dp: optim.lr=0.1 is dp=true's rate for {dp_default_model()}; dp_cnn needs its own "
                            "(dp_cnn: 1e-2, docs/privacy.md): give optim.lr=<rate>"]
    else:
        assert root.cfg.model.name != dp_default_model() or any(
            "is dp=true's default" in r.getMessage() for r in caplog.records)
