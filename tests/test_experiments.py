"""Every experiment config composes and runs a fast_dev_run on its real data set (lightning-hydra-template's
sweep test); the protocol values each one claims are the ones the papers state."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloodfl.training.run import train
from tests.conftest import CONF_DIR, compose_cfg, shared_data_dir

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment: str, tmp_path: Path, data_dir: Path) -> None:
    cfg = compose_cfg([f"experiment={experiment}", f"paths.data_dir={data_dir}"], tmp_path)
    size = 75 if cfg.model.name == "inception_v3" else 32
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
    """Composing (not running) works on a clone without ../shared."""
    assert shared_data_dir() is None or EXPERIMENTS
    for exp in EXPERIMENTS:
        cfg = compose_cfg([f"experiment={exp}"])
        assert cfg.dataset.name != "synthetic", exp
