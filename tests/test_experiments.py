"""Every experiment config composes and runs a fast_dev_run on its real data set (lightning-hydra-template's
sweep test); the protocol values each one claims are the ones the papers state."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloodfl.training.run import train
from tests.conftest import CONF_DIR, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment: str, tmp_path: Path, data_dir: Path) -> None:
    cfg = compose_cfg([f"experiment={experiment}", f"paths.data_dir={data_dir}"], tmp_path)
    size = max(32, int(cfg.model.min_size))
    cfg = compose_cfg([f"experiment={experiment}", f"paths.data_dir={data_dir}", "trainer.fast_dev_run=true",
                       "loader.batch_size=4", f"dataset.image_size={size}", "callbacks=none"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (tmp_path / "splits.csv").exists()


def test_dipto2023_protocol_values() -> None:
    cfg = compose_cfg(["experiment=dipto2023_rbc"])
    assert (cfg.model.name, cfg.dataset.image_size, list(cfg.split.fractions)) == ("vgg16", 128, [0.7, 0.2, 0.1])
    assert cfg.optim.lr == 1e-5 and cfg.loader.batch_size == 32 and cfg.trainer.max_epochs == 50
    assert cfg.class_weights is True
    assert cfg.model.head.hidden == 1024 and cfg.model.head.dropout == 0.5 and cfg.model.head.pool == "flatten"


def test_experiments_need_no_data_to_compose() -> None:
    """Composing (not running) works on a clone without ../shared: every experiment names its paper's real data
    set and a model, and resolves every value (image size included) without touching the data."""
    from omegaconf import OmegaConf

    assert len(EXPERIMENTS) == 5
    for exp in EXPERIMENTS:
        cfg = compose_cfg([f"experiment={exp}", "paths.data_dir=/nonexistent"])
        assert cfg.dataset.name in ("rbc", "all_pbs", "wbc4", "pbc", "wbc5"), exp
        assert cfg.dataset.image_size >= cfg.model.min_size, exp  # resolved: an explicit size or the default
        OmegaConf.to_container(cfg.dataset, resolve=True)  # every data set value resolves without the data
