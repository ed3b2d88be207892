"""A short federated run on the real all_pbs data set (../shared/data or $BLOODFL_DATA; skipped when absent)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bloodfl.fl.run import federate
from tests.conftest import compose_cfg, shared_data_dir

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(DATA is None, reason="real data sets not found: put them in ../shared/data or set BLOODFL_DATA"),
]


def test_short_federated_run_on_all_pbs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOODFL_DATA", str(DATA))
    cfg = compose_cfg(["dataset=all_pbs", "dataset.image_size=32", "loader.batch_size=16", "logger=csv",
                       "fl.num_clients=3", "fl.rounds=2", "fl.partition=dirichlet", "fl.alpha=1.0",
                       "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                       "trainer.limit_test_batches=4"], tmp_path, "federate")
    metrics = federate(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_clients"] == 3
    with open(tmp_path / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["1", "2"]
    with open(tmp_path / "partition.csv") as fh:
        part = list(csv.DictReader(fh))
    with open(tmp_path / "splits.csv") as fh:
        n_train = sum(r["split"] == "train" for r in csv.DictReader(fh))
    # 3,256 images less 40 duplicates, 70% for training, all of it shared out to the clients
    assert sum(int(r["n"]) for r in part) == n_train == pytest.approx(0.7 * 3216, abs=2)
    assert set(part[0]) == {"client", "n", "Benign", "Early", "Pre", "Pro"}
