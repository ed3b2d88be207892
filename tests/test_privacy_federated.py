"""``federate.py dp=true``: each client's cumulative ε per round as Opacus computes it, the target met by every
client, privacy.json, and the real all_pbs command. (Exact resume of DP accountants is checked in
tests/test_fl_dp.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from bloodfl.errors import BloodflError
from bloodfl.fl.run import federate
from tests.conftest import compose_cfg, run_cli, shared_data_dir

BATCH = 8
FL_DP = ["dataset=synthetic", "dataset.image_size=16", "dataset.source.n_per_class=16", f"loader.batch_size={BATCH}",
         "logger=csv", "fl.num_clients=3", "dp='true'",
         "dp.expected_batch_size=null"]  # Poisson batches of loader.batch_size: the counts below follow from BATCH


pytestmark = pytest.mark.usefixtures("one_thread")


def _rounds(out: Path) -> list[dict[str, str]]:
    with open(out / "rounds.csv") as fh:
        return list(csv.DictReader(fh))


def _batches(n: int) -> int:
    return n // BATCH if n > BATCH else 1  # the training loader drops the last partial batch when it can


def test_each_clients_epsilon_per_round_is_what_opacus_computes(tmp_path: Path) -> None:
    sigma, rounds, epochs = 1.2, 3, 2
    cfg = compose_cfg([*FL_DP, "dp.target_epsilon=null", f"dp.noise_multiplier={sigma}", f"fl.rounds={rounds}",
                       f"fl.local_epochs={epochs}", "fl.partition=random_size"], tmp_path, "federate")
    federate(cfg)
    rows = _rounds(tmp_path)
    doc = json.loads((tmp_path / "privacy.json").read_text())
    for c in range(3):
        n = doc["clients"][c]["num_samples"]  # the count stays with the client: rounds.csv does not show it
        batches, delta = _batches(n), min(1e-5, 0.1 / n)
        eps = [float(r[f"client{c}/epsilon"]) for r in rows]
        for k, e in enumerate(eps, start=1):
            acc = RDPAccountant()
            acc.history = [(sigma, 1 / batches, k * epochs * batches)]
            assert e == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
        assert eps == sorted(set(eps))  # strictly growing
        report = doc["clients"][c]
        assert report["epsilon"] == eps[-1] and report["steps"] == rounds * epochs * batches
    assert doc["worst"]["epsilon"] == max(r["epsilon"] for r in doc["clients"])


def test_every_client_meets_the_target(tmp_path: Path) -> None:
    cfg = compose_cfg([*FL_DP, "dp.target_epsilon=2.0", "fl.rounds=2", "fl.partition=random_size"], tmp_path,
                      "federate")
    metrics = federate(cfg)
    doc = json.loads((tmp_path / "privacy.json").read_text())
    sizes = {c["num_samples"] for c in doc["clients"]}
    assert len(sizes) > 1  # unequal clients get their own noise for the same target
    for c in doc["clients"]:
        assert 1.6 <= c["epsilon"] <= 2.0, c
    assert metrics["dp/epsilon"] == doc["worst"]["epsilon"] <= 2.0


def test_resume_cannot_stretch_a_calibrated_budget(tmp_path: Path) -> None:
    federate(compose_cfg([*FL_DP, "dp.target_epsilon=2.0", "fl.rounds=1", "fl.keep_checkpoints=1"],
                         tmp_path, "federate"))
    (tmp_path / "metrics.json").unlink()  # pretend round 1 of 2 was interrupted, then ask for more rounds
    with pytest.raises(BloodflError, match="noise_multiplier.*target_epsilon"):
        federate(compose_cfg([*FL_DP, "dp.target_epsilon=2.0", "fl.rounds=2", "fl.resume=true"], tmp_path,
                             "federate"))


DATA = shared_data_dir()


@pytest.mark.realdata
@pytest.mark.skipif(DATA is None, reason="real data sets not found: put them in ../shared/data or set BLOODFL_DATA")
def test_federate_all_pbs_dp_true_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli("federate.py", ["dataset=all_pbs", "dp=true", "dataset.image_size=32", "fl.rounds=2",
                                  "fl.num_clients=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=4",
                                  f"hydra.run.dir={out}"], tmp_path,
                  env={"BLOODFL_DATA": str(DATA), "OMP_NUM_THREADS": "1"}, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DP: epsilon=" in res.stdout and "worst client" in res.stdout
    doc = json.loads((out / "privacy.json").read_text())
    assert len(doc["clients"]) == 3
    for c in doc["clients"]:  # dp=true's default budget, all planned steps taken
        assert 0.8 * 8.0 <= c["epsilon"] <= 8.0 and c["steps"] == c["planned_steps"]
        assert c["delta"] < 1 / c["num_samples"]
    rows = _rounds(out)
    assert all(float(rows[0][f"client{c}/epsilon"]) < float(rows[1][f"client{c}/epsilon"]) for c in range(3))


# every DP-SGD recipe at once: a logical batch of 25 (k = 100 // 25) in chunks of 7, 2 views per image, an EMA,
# automatic clipping
RECIPE_SETTINGS = {"expected_batch_size": 25, "physical_batch_size": 7, "augmult": 2, "ema": 0.9,
                   "clipping": "automatic"}
RECIPES = [*(f"dp.{k}={v}" for k, v in RECIPE_SETTINGS.items()), "augment=flips"]


@pytest.mark.parametrize(("task", "k", "recipes"), [("federate", 93, []), ("train", 12, []), ("train", 4, RECIPES)])
def test_privacy_json_alone_reproduces_epsilon(task: str, k: int, recipes: list[str], tmp_path: Path) -> None:
    """k = 93 batches per epoch is one of the counts where Opacus' own loader would take k - 1 steps: what was
    accounted (sample rate, steps) is what privacy.json records, and ε recomputed from the record alone with a
    fresh Opacus accountant equals the reported one, within the target; with the recipes on too."""
    from bloodfl.training.run import train

    if task == "federate":  # 94 training images, 1 held out locally: 93 batches of 1
        args = ["dataset=synthetic", "dataset.image_size=16", "dataset.source.n_per_class=17", "loader.batch_size=1",
                "fl.num_clients=1", "fl.val_fraction=0.01", "fl.rounds=2", "fl.local_epochs=1", "logger=csv"]
        run = lambda cfg: federate(cfg)  # noqa: E731
    else:  # 100 training images in batches of 8: 12 batches
        args = ["dataset=synthetic", "dataset.image_size=16", "dataset.source.n_per_class=18", "loader.batch_size=8",
                "trainer.max_epochs=2", "logger=csv", "callbacks=none", *recipes]
        run = train
    batch = [] if recipes else ["dp.expected_batch_size=null"]  # k above counts loader batches
    run(compose_cfg([*args, "model=simple_cnn", "dp='true'", "dp.target_epsilon=3.0", *batch], tmp_path, task))
    doc = json.loads((tmp_path / "privacy.json").read_text())
    for client in doc["clients"]:
        assert client["steps_per_epoch"] == k and client["sample_rate"] == pytest.approx(1 / k, rel=1e-12)
        assert client["steps"] == client["planned_steps"] == 2 * k
        acc = RDPAccountant()
        acc.history = [(client["noise_multiplier"], client["sample_rate"], client["steps"])]
        assert acc.get_epsilon(client["delta"]) == pytest.approx(client["epsilon"], rel=1e-9)
        assert client["epsilon"] <= 3.0
        if recipes:  # each recipe's setting is recorded with what the client spent, and in the run's settings
            assert {k: client[f"dp.{k}"] for k in RECIPE_SETTINGS} == RECIPE_SETTINGS
            assert {k: doc["settings"][k] for k in RECIPE_SETTINGS} == RECIPE_SETTINGS
