"""``train.py dp=true``: DP-SGD in the Lightning Trainer, privacy.json, ε as Opacus computes it independently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from bloodfl.training.run import train
from tests.conftest import FAST, compose_cfg, run_cli

BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_count(out: Path) -> int:
    with open(out / "splits.csv") as fh:
        return sum(row["split"] == "train" for row in csv.DictReader(fh))


def test_dp_training_reports_the_epsilon_opacus_computes(tmp_path: Path) -> None:
    epochs, sigma = 2, 1.3
    cfg = compose_cfg([*FAST, "dp='true'", "dp.target_epsilon=null", f"dp.noise_multiplier={sigma}",
                       f"trainer.max_epochs={epochs}", f"loader.batch_size={BATCH}", "callbacks=default",
                       "dp.expected_batch_size=null",  # Poisson batches of BATCH: the counts below follow
                       "callbacks.progress_bar=null"], tmp_path)
    metrics = train(cfg)
    doc = json.loads((tmp_path / "privacy.json").read_text())
    n = _train_count(tmp_path)
    batches = n // BATCH  # the training loader drops the last partial batch
    delta = min(1e-5, 0.1 / n)
    acc = RDPAccountant()
    acc.history = [(sigma, 1 / batches, epochs * batches)]
    (client,) = doc["clients"]
    assert client["steps"] == epochs * batches
    assert client["delta"] == pytest.approx(delta)
    assert client["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert doc["worst"]["epsilon"] == client["epsilon"] == metrics["dp/epsilon"]
    assert doc["settings"]["noise_multiplier"] == sigma
    assert 0 <= metrics["test/acc"] <= 1
    # DP-SGD steps count as Lightning steps, so the best checkpoint by val/loss exists and is the one tested
    # (they did not: global_step stayed 0 and ModelCheckpoint saved only last.ckpt)
    with open(tmp_path / "history.csv") as fh:
        best = min(csv.DictReader(fh), key=lambda r: float(r["val/loss"]))
    assert Path(metrics["best_checkpoint"]).name == f"best-epoch{int(best['epoch']) - 1:03d}.ckpt"


def test_dp_target_epsilon_is_met(tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "dp='true'", "dp.target_epsilon=3.0", "trainer.max_epochs=3",
                       f"loader.batch_size={BATCH}"], tmp_path)
    train(cfg)
    eps = json.loads((tmp_path / "privacy.json").read_text())["worst"]["epsilon"]
    assert 2.4 <= eps <= 3.0


def test_cli_dp_true(tmp_path: Path) -> None:
    res = run_cli("train.py", [*FAST, "dp=true", "trainer.max_epochs=1", "model=mobilenetv2",
                               f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DP: epsilon=" in res.stdout
    assert (tmp_path / "run" / "privacy.json").exists()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "dp: replaced" in log and "BatchNormAct2d -> GroupNormAct" in log
