"""The command line around a run: the config summary, one-line user errors, sweeps that go on past a failed
job, and ``dp=true`` as users type it."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bloodfl.errors import BloodflError

log = logging.getLogger("bloodfl")

SUMMARY_ORDER = ("dataset", "model", "split", "augment", "optim", "loader", "fl", "dp", "trainer", "logger", "paths")
ERROR_FILE = "error.txt"  # a job's one-line user error, left in its run directory for the sweep's summary


def print_config_tree(cfg: DictConfig) -> None:
    """A tree of the resolved config, most important groups first."""
    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in SUMMARY_ORDER if k in cfg] + [k for k in cfg if k not in SUMMARY_ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(f"[bold]{key}")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_notices() -> None:
    """Library notices that tell a bloodfl user nothing new, silenced once for the whole process:
    Opacus' secure-RNG note (docs/privacy.md says what secure mode protects against), Lightning's hints about
    workers and devices that do not apply to in-memory data, and deprecations inside the libraries."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    logging.getLogger("opacus.data_loader").setLevel(logging.ERROR)
    # Lightning advertises its hosted logger on every Trainer it builds (a federated run builds one per client and
    # round)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
    # a real caveat of the RDP accountant, but the same one for every round and client: say it once
    warnings.filterwarnings("once", message=".*Optimal order is the largest alpha.*")


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """For the ``python -m bloodfl.<tool>`` commands: a user error is one line on stderr and exit status 2."""
    try:
        yield
    except BloodflError as exc:
        print(f"bloodfl: error: {exc}", file=sys.stderr)
        sys.exit(2)


def task_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run one job; a user error (BloodflError) becomes one line ``bloodfl: error: ...`` instead of a traceback.

    A single run then exits with status 2. In a multirun the job fails alone: its line is printed and left in
    its run directory (``error.txt``), the sweep goes on, and :class:`FailedJobsReport` lists the failed jobs
    and exits non-zero when the sweep ends.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_known_notices()  # again here: a launcher such as submitit runs jobs in fresh processes
        try:
            return fn(*args, **kwargs)
        except BloodflError as exc:
            line = f"bloodfl: error: {exc}"
            print(line, file=sys.stderr)
            if not _in_multirun():
                sys.exit(2)
            log.error(line)
            out = Path(args[0].paths.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / ERROR_FILE).write_text(line + "\n")
            return None
        finally:
            if os.environ.get("SUBMITIT_EXECUTOR") and _in_multirun():  # a submitit job: its process ends with it
                skip_exit_collection()

    return wrapper


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra app
        return False


class FailedJobsReport(Callback):
    """Hydra callback (conf/hydra/default.yaml): after a sweep, list the jobs that stopped on a user error and
    exit with status 2, so scripts see that the sweep was not a full success."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted(sweep_dir.rglob(ERROR_FILE))
        if not failed:
            return
        lines = [f"bloodfl: {len(failed)} job(s) of the sweep in {sweep_dir} failed:"]
        for path in failed:
            job = path.parent
            overrides = job / ".hydra" / "overrides.yaml"
            args = " ".join(str(o) for o in OmegaConf.load(overrides)) if overrides.exists() else ""
            lines.append(f"  {job.relative_to(sweep_dir)} ({args}): {path.read_text().strip()}")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)


def bool_group_choices(conf_dir: Path, argv: list[str] | None = None) -> None:
    """Let ``dp=true`` (and ``dp=true,false``) select conf/dp/true.yaml, and ``experiment=null`` select no
    experiment, as typed.

    Hydra's grammar reads ``true`` as a boolean and ``null`` as None, both of which it refuses as a config-group
    choice. Only overrides of a group that has an option named ``true`` or ``false`` whose value Hydra parses as
    a boolean (or a plain comma list of them) are rewritten, to the quoted form Hydra accepts, and ``group=null``
    to Hydra's deletion ``~group``; every other override — sweep functions such as ``glob(...)``,
    ``choice(...)``, ``range(...)`` — is left exactly as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    argv = sys.argv if argv is None else argv
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    bool_groups = {g for g in groups if (conf_dir / g / "true.yaml").exists() or (conf_dir / g / "false.yaml").exists()}
    parser = OverridesParser.create()
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # Hydra reports it
        group = override.key_or_group.split("/")[0]
        key = arg.split("=", 1)[0]
        value = override.value()
        if group in groups and value is None and key == group and override.value_type == ValueType.ELEMENT:
            argv[i] = f"~{group}"
            continue
        if group not in bool_groups:
            continue
        if override.value_type == ValueType.ELEMENT and isinstance(value, bool):
            argv[i] = f"{key}='{str(value).lower()}'"
        elif override.value_type == ValueType.SIMPLE_CHOICE_SWEEP and any(isinstance(v, bool) for v in value.list):
            argv[i] = f"{key}=" + ",".join(f"'{str(v).lower()}'" if isinstance(v, bool) else str(v)
                                           for v in value.list)


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The value a Hydra sweeper optimises: ``optimized_metric`` of the run's metrics (None if absent)."""
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if isinstance(value, (int, float)) else None


def launch(main: Callable[[], Any]) -> None:
    """What an entry point does before Hydra parses the command line."""
    from bloodfl.config import CONF_DIR

    quiet_known_notices()
    bool_group_choices(CONF_DIR)
    try:
        main()
    finally:
        skip_exit_collection()


def skip_exit_collection() -> None:
    """For a process about to exit: the interpreter's last garbage collection over everything torch and Lightning
    loaded takes ~3 s (measured: 3.6 s -> 0.7 s from import to exit); frozen objects are left to the OS.
    Loggers are finalized and W&B closed before this (bloodfl/runner.py)."""
    gc.freeze()
