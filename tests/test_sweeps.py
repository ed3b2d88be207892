"""Ready sweeps and the launchers that take them beyond one machine: every paper's sweep (conf/sweep) and its W&B
twin (sweeps/wandb) name real config keys and options and agree; an Optuna search on submitit_local runs as one
two-job sweep (jobs in their own processes) and reports the best trial; SLURM gets the batch script a user asked
for. One subprocess trains (the two jobs); the rest composes configs."""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from bloodfl.config import group_options
from tests.conftest import CONF_DIR, FAST, ROOT, run_cli

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
WANDB_DIR = ROOT / "sweeps" / "wandb"
WANDB_COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _jobs(params: dict[str, Any], args: Sequence[str] = ()) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for ``hydra.sweeper.params`` and command-line ``args``."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(args))
    return BasicSweeper.split_arguments(overrides, None)[0]


def _job_value(job: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == key)


def _job_config(cfg: DictConfig) -> dict[str, Any]:
    """A job's config as it trains, less Hydra's own node and the loggers."""
    out = OmegaConf.to_container(cfg, resolve=False)
    for key in ("hydra", "logger"):
        out.pop(key)
    return out


def _wandb_args(params: dict[str, Any]) -> list[str]:
    """``${args_no_hyphens}`` as the W&B agent renders it for one point of the sweep."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_paper_sweep_and_its_wandb_twin(sweep: str) -> None:
    """The Hydra sweep runs as a multirun by itself, each swept value is an option of its group, and the W&B
    sweep's first job (its args as the agent renders them) composes to the same config as the Hydra sweep's."""
    wandb_cfg = yaml.safe_load((WANDB_DIR / f"{sweep}.yaml").read_text())
    swept = {k: v["values"] for k, v in wandb_cfg["parameters"].items() if "values" in v}
    fixed = {k: v["value"] for k, v in wandb_cfg["parameters"].items() if "value" in v}
    first = {k: v[0] for k, v in swept.items()}

    hydra_cfg = _compose([f"sweep={sweep}", *(f"{k}={v}" for k, v in first.items())])
    assert hydra_cfg.hydra.mode.name == "MULTIRUN"
    params = dict(hydra_cfg.hydra.sweeper.params)
    jobs = _jobs(params)
    assert set(params) == set(swept)
    assert len(jobs) == len(list(itertools.product(*swept.values())))
    for key, values in swept.items():  # the same grid in both, value for value
        assert sorted({_job_value(job, key) for job in jobs}) == sorted(str(v) for v in values), key
        if (CONF_DIR / key).is_dir():
            assert set(values) <= set(group_options(key)), key

    wandb_run = _compose(_wandb_args({**fixed, **first}))
    assert wandb_run.logger.wandb.offline is False
    assert _job_config(wandb_run) == _job_config(hydra_cfg)
    assert wandb_cfg["metric"] == {"name": "val/acc_best", "goal": "maximize"}


def test_wandb_sweeps_are_valid_wandb_configs() -> None:
    """W&B's own sweep-config schema (the ``sweeps`` package its local controller uses) accepts every file, and
    each one calls train.py with Hydra's key=value overrides."""
    with warnings.catch_warnings():  # the package's pydantic-1 config keys, renamed in pydantic 2
        warnings.simplefilter("ignore", UserWarning)
        from sweeps.config.schema import fill_validate_schema

    files = sorted(WANDB_DIR.glob("*.yaml"))
    assert {p.stem for p in files} == {*SWEEPS, "lr_batch"}
    for path in files:
        cfg = yaml.safe_load(path.read_text())
        fill_validate_schema(cfg)
        assert (cfg["program"], cfg["command"]) == ("train.py", WANDB_COMMAND), path.name
        assert cfg["parameters"]["logger"] == {"value": "wandb"}, path.name


def test_wandb_bayes_search_is_the_optuna_search() -> None:
    """sweeps/wandb/lr_batch.yaml searches what hparams_search=optuna searches, and its keys compose."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    wandb_cfg = yaml.safe_load((WANDB_DIR / "lr_batch.yaml").read_text())
    params = wandb_cfg["parameters"]
    cfg = _compose(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert (sweeper.direction, wandb_cfg["method"]) == ("maximize", "bayes")
    assert cfg.test is False and params["test"] == {"value": False}
    parser = OverridesParser.create()
    optuna = {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
              for k, v in sweeper.params.items()}
    assert set(optuna) == {"optim.lr", "loader.batch_size"}
    lr = optuna["optim.lr"]
    assert type(lr).__name__ == "LogUniformDistribution"
    assert (lr.low, lr.high) == (params["optim.lr"]["min"], params["optim.lr"]["max"])
    assert params["optim.lr"]["distribution"] == "log_uniform_values"
    assert list(optuna["loader.batch_size"].choices) == params["loader.batch_size"]["values"]

    point = {k: v.get("value", v.get("min", (v.get("values") or [None])[0])) for k, v in params.items()}
    run = _compose(_wandb_args(point))
    assert run.optim.lr == params["optim.lr"]["min"] and run.loader.batch_size == 16


def test_sweep_values_from_the_command_line() -> None:
    """A command-line value replaces the sweep's (one job), and the k-fold sweep follows split.k."""
    params = dict(_compose(["sweep=dipto2023_rbc"]).hydra.sweeper.params)
    assert _jobs(params, ["model=resnet50"]) == [["model=resnet50"]]
    kfold = _compose(["sweep=alam2025_all_kfold", "split.k=3"])
    assert (kfold.split.kind, kfold.dataset.name, kfold.model.name) == ("kfold", "all_pbs", "inception_v3")
    assert _jobs(dict(kfold.hydra.sweeper.params)) == [[f"split.fold={i}"] for i in range(3)]


@pytest.fixture(scope="module")
def optuna_on_submitit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """Optuna's two trials launched together (n_jobs=2) on submitit_local: each in its own process."""
    tmp = tmp_path_factory.mktemp("optuna_submitit")
    sweep_dir = tmp / "sweep"
    # a fixed loader.batch_size would take the key out of Optuna's search space: FAST's is left out
    fast = [o for o in FAST if not o.startswith("loader.batch_size=")]
    res = run_cli("train.py", ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                               "hydra/launcher=submitit_local", *fast, "trainer.fast_dev_run=true",
                               "loader.batch_size=choice(4,8)", f"hydra.sweep.dir={sweep_dir}"],
                  tmp, env={"OMP_NUM_THREADS": "1"})
    return res, tmp, sweep_dir


def _metrics(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))}


def test_submitit_local_runs_a_two_job_sweep(optuna_on_submitit: tuple[Any, Path, Path]) -> None:
    res, tmp, sweep_dir = optuna_on_submitit
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in res.stdout + res.stderr
    assert set(_metrics(sweep_dir)) == {"0", "1"}
    # submitit's own folder (pickles, per-job logs) lies inside the sweep, one folder per job process
    job_folders = [p for p in (sweep_dir / ".submitit").iterdir() if list(p.glob("*_result.pkl"))]
    assert len(job_folders) == 2
    assert not (tmp / ".submitit").exists()
    for folder in job_folders:
        assert "Starting with JobEnvironment" in next(folder.glob("*_log.out")).read_text()
        assert "LeafSpec" not in next(folder.glob("*_log.err")).read_text()  # notices quieted in the job too
    # the metric the W&B sweeps optimise is what the loggers receive (the same call feeds W&B and CSV)
    metric = yaml.safe_load((WANDB_DIR / "lr_batch.yaml").read_text())["metric"]["name"]
    header = (sweep_dir / "0" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert metric in header


def test_optuna_sweep_of_two_trials_reports_the_best(optuna_on_submitit: tuple[Any, Path, Path]) -> None:
    res, _, sweep_dir = optuna_on_submitit
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = _metrics(sweep_dir)
    assert len(metrics) == 2 and all("test/acc" not in m for m in metrics.values())  # tuning never tests
    trials = {}
    for job, m in metrics.items():
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(sweep_dir / job / ".hydra" / "overrides.yaml"))
        lr, batch = float(overrides["optim.lr"]), int(overrides["loader.batch_size"])
        assert 1e-5 <= lr <= 1e-2 and batch in (4, 8)
        trials[job] = ({"optim.lr": lr, "loader.batch_size": batch}, m["val/acc_best"])
    assert len({p["optim.lr"] for p, _ in trials.values()}) == 2  # two sampled trials, not one twice
    result = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    best = max(v for _, v in trials.values())
    assert result["best_value"] == pytest.approx(best)
    assert result["best_params"] in [p for p, v in trials.values() if v == pytest.approx(best)]


def test_slurm_launcher_writes_the_batch_script_asked_for(tmp_path: Path) -> None:
    """hydra/launcher=slurm without a cluster: a stand-in sbatch keeps the script submitit hands it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "sbatch: no cluster" >&2\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script, sweep_dir = tmp_path / "job.sbatch", tmp_path / "sweep"
    res = run_cli("train.py", ["sweep=dipto2023_rbc", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                               "+hydra.launcher.additional_parameters.mail-type=END", "trainer=gpu",
                               f"hydra.sweep.dir={sweep_dir}"], tmp_path,
                  env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)})
    assert res.returncode != 0 and "sbatch: no cluster" in res.stderr
    text = script.read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--time=720",
                 "--array=0-2%3", "--mail-type=END", f"--output={sweep_dir}/.submitit/"):
        assert f"#SBATCH {line}" in text, line
    assert len(list((sweep_dir / ".submitit").glob("*.pkl"))) == 3  # one pickled job per model
