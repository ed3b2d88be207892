"""Centralized training end to end: every configured model, the run-directory contract, multirun, the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bloodfl.models import model_config
from bloodfl.training.run import train
from tests.conftest import CONF_DIR, FAST, compose_cfg, run_cli

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# models whose fast_dev_run is too slow for the suite on a CPU; each still builds and runs forward in test_configs
SLOW = {"nasnet": "NASNet-A Large: 85M parameters, ~70 s for one fast_dev_run on 2 CPU cores"}


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_every_model(model: str, tmp_path: Path) -> None:
    if model in SLOW:
        pytest.skip(SLOW[model])
    size = max(int(model_config(model).min_size), 32)
    cfg = compose_cfg([*FAST, f"model={model}", f"dataset.image_size={size}", "trainer.fast_dev_run=true",
                       "loader.batch_size=4"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["test/loss"] > 0
    assert (tmp_path / "metrics.json").exists()


def test_run_directory_contract(tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "callbacks=default", "trainer.max_epochs=2", "class_weights=true"], tmp_path)
    metrics = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/acc", "test/f1_macro", "test/precision_macro", "test/recall_macro", "test/loss",
                "test/auroc_macro", "val/acc", "val/loss", "val/acc_best"):
        assert key in saved, key
        assert saved[key] == pytest.approx(metrics[key])
    lines = (tmp_path / "splits.csv").read_text().splitlines()
    assert lines[0] == "path,label,split"
    assert len(lines) == 1 + 8 * 12
    ckpts = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "state_dict" in last and "optimizer_states" not in last  # weights only (issue #8)
    assert Path(saved["best_checkpoint"]).exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()
    per_class = (tmp_path / "test_per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,support,sensitivity,specificity,precision,f1,auroc" and len(per_class) == 9
    assert len((tmp_path / "test_confusion_matrix.csv").read_text().splitlines()) == 9


def test_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    from bloodfl.errors import BloodflError

    with pytest.raises(BloodflError, match="already holds a finished run"):
        train(compose_cfg([*FAST, "trainer.fast_dev_run=true"], tmp_path))
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_multirun_two_models_each_write_metrics(tmp_path: Path) -> None:
    res = run_cli("train.py", ["-m", "model=simple_cnn,resnet18", *FAST, "trainer.fast_dev_run=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(jobs) == 2
    models = set()
    for job in jobs:
        models.add((job.parent / ".hydra" / "overrides.yaml").read_text().split("model=")[1].split()[0].strip("'\""))
        assert "test/acc" in json.loads(job.read_text())
    assert models == {"simple_cnn", "resnet18"}

    from bloodfl.evaluation.collect import main as collect_main

    sweep_dir = jobs[0].parent.parent
    assert collect_main([str(sweep_dir)]) == 0
    summary = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "test/acc" in summary[0]


def test_demo_learns_synthetic(tmp_path: Path) -> None:
    """A few epochs of simple_cnn on synthetic data reach clearly above chance (1/8)."""
    cfg = compose_cfg(["dataset=synthetic", "dataset.image_size=32", "dataset.source.n_per_class=100",
                       "loader.batch_size=16", "trainer.max_epochs=8", "callbacks=default",
                       "callbacks.progress_bar=null", "logger=csv"], tmp_path)
    metrics = train(cfg)
    # measured with this config, seeds 1-4: test/acc 0.64, 0.80, 0.69, 0.70 (80 test images); chance is 0.125
    assert metrics["test/acc"] > 0.45, metrics


def test_wandb_run_closed_even_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def boom(*args: object, **kwargs: object) -> None:
        assert wandb.run is not None  # the logger opened a run
        raise RuntimeError("training crashed")

    monkeypatch.setattr(pl.Trainer, "fit", boom)
    cfg = compose_cfg([*FAST, "logger=wandb", "trainer.fast_dev_run=true"], tmp_path)
    with pytest.raises(RuntimeError, match="training crashed"):
        train(cfg)
    assert wandb.run is None


def test_per_class_report_matches_definitions() -> None:
    import torch

    from bloodfl.evaluation.report import class_report

    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    probs = torch.nn.functional.one_hot(pred, 3).float() * 0.8 + 0.2 / 3
    rep = class_report(probs, target, ["a", "b", "c"])
    assert rep.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class a: TP=1 FN=1 FP=1 TN=3
    assert rep.per_class["sensitivity"][0] == pytest.approx(0.5)
    assert rep.per_class["specificity"][0] == pytest.approx(0.75)
    assert rep.per_class["support"] == [2.0, 2.0, 2.0]
