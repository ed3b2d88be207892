"""The commands as users type them: Hydra's sweep grammar on every group, dp=true as typed, and a sweep that
goes on past a job with a user error and ends by naming it."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from bloodfl.console import bool_group_choices
from tests.conftest import CONF_DIR, FAST, run_cli

QUICK = [*FAST, "trainer.fast_dev_run=true", "loader.batch_size=4"]


def _jobs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/.hydra/overrides.yaml"))


def test_only_boolean_group_choices_are_rewritten() -> None:
    argv = ["train.py", "-m", "dp=true", "dp=true,false", "+dp=false", "model='glob(resnet*)'",
            "model=choice(vgg16,resnet50)", "experiment=null", "dp.max_grad_norm=2", "trainer.deterministic=true",
            "split=7-2-1"]
    bool_group_choices(CONF_DIR, argv)
    assert argv == ["train.py", "-m", "dp='true'", "dp='true','false'", "+dp='false'", "model='glob(resnet*)'",
                    "model=choice(vgg16,resnet50)", "~experiment", "dp.max_grad_norm=2",
                    "trainer.deterministic=true", "split=7-2-1"]


def test_sweep_functions_work_on_groups(tmp_path: Path) -> None:
    # small models: glob over the group's options is what is tested (resnet1* took ~60 s of the suite)
    res = run_cli("train.py", ["-m", "model=glob(paper00*)", *QUICK], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    models = [OmegaConf.load(p)[0] for p in _jobs(tmp_path)]
    assert sorted(models) == ["model=paper002_cnn", "model=paper003_cnn"]
    assert len(list((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))) == 2


def test_choice_null_experiment_and_a_dp_sweep_as_typed(tmp_path: Path) -> None:
    res = run_cli("train.py", ["-m", "model=choice(simple_cnn)", "experiment=null", "dp=true,false", *QUICK,
                               "dataset.image_size=16"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = _jobs(tmp_path)
    assert len(jobs) == 2
    privacy = [(p.parent.parent / "privacy.json").exists() for p in jobs]
    assert sorted(privacy) == [False, True]


def test_a_user_error_fails_its_job_only_and_the_sweep_names_it(tmp_path: Path) -> None:
    res = run_cli("train.py", ["-m", "model=simple_cnn,inception_v3", *QUICK], tmp_path)
    assert res.returncode == 2
    assert "bloodfl: error: model 'inception_v3' needs images of at least 75 px" in res.stderr
    assert "1 job(s) of the sweep" in res.stderr and "model=inception_v3" in res.stderr.split("failed:")[-1]
    assert "Traceback" not in res.stderr
    assert "💡 Tip" not in res.stdout + res.stderr  # Lightning's advertisement, once per Trainer built
    done = list((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(done) == 1 and "test/acc" in json.loads(done[0].read_text())


def test_federate_dp_true_as_typed(tmp_path: Path) -> None:
    res = run_cli("federate.py", [*FAST, "dp=true", "fl.num_clients=2", "fl.rounds=1", "dataset.image_size=16"],
                  tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DP: epsilon=" in res.stdout and "Done: outputs in" in res.stdout
    assert "Secure RNG turned off" not in res.stdout + res.stderr  # a notice handled once, where it arises
