"""Shared fixtures: compose the real Hydra configs, locate the real data sets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import bloodfl  # noqa: F401  (registers the resolvers the configs use)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on two cores: one intra-op thread each, also in the commands they start,
        # or OpenMP threads of the two compete for the cores and small models slow down many times
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    """../shared/data beside the repository, or $BLOODFL_DATA; None when neither holds the data sets."""
    env = os.environ.get("BLOODFL_DATA")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (cand / "README.md").exists() or (cand / "pbc").exists():
            return cand.resolve()
    return None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data sets not found: put them in ../shared/data or set BLOODFL_DATA")
    return d


def compose_cfg(overrides: Sequence[str] = (), tmp_path: Path | None = None, config_name: str = "train") -> DictConfig:
    """The config a command line with ``overrides`` would run, writing into ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path)
            cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


# a fast synthetic setup: tiny images, few per class, a couple of batches
FAST = [
    "dataset=synthetic",
    "dataset.image_size=32",
    "dataset.source.n_per_class=12",
    "loader.batch_size=8",
    "logger=csv",
    "callbacks=none",
]


def run_cli(script: str, args: Sequence[str], tmp_path: Path, env: dict[str, str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, with its outputs under ``tmp_path``."""
    full_env = {**os.environ, "BLOODFL_LOGS": str(tmp_path / "logs"), "BLOODFL_CACHE": str(tmp_path / "cache"),
                **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning makes small models 10-50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
