"""A study's commands: the paper's sweep config, the scale, the step's own overrides and the user's, in that
order (a later override of the same key wins, as on a Hydra command line), each writing under ``<study>/<step>``.
Also the jobs each command's multirun launches, as Hydra's basic sweeper expands them, for the dry run's
estimate and for the tests that compose every job."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bloodfl.config import CONF_DIR
from bloodfl.errors import BloodflError
from bloodfl.reproduce.protocols import PAPERS, SCALES, Gap, Paper, Step, aliases

ROOT = CONF_DIR.parent
# keys only federate.py knows: a user's fl.* override goes to the federated steps alone
FEDERATED_ONLY = ("fl.", "fl=")


@dataclass
class Command:
    step: Step
    args: list[str]     # Hydra overrides, hydra.sweep.dir last
    out: Path           # the step's sweep directory

    @property
    def script(self) -> str:
        return self.step.script

    def argv(self) -> list[str]:
        """What runs: this interpreter and the entry point of this checkout."""
        return [sys.executable, str(ROOT / self.script), *self.args]

    def shell(self) -> str:
        """The command as a user types it from the repository root (the script's path otherwise)."""
        script = Path(self.script) if Path.cwd().resolve() == ROOT else ROOT / self.script
        return " ".join(["python", shlex.quote(str(script)), *(shlex.quote(a) for a in self.args)])


def resolve_paper(name: str) -> Paper:
    table = aliases()
    if name not in table:
        valid = ", ".join(f"{p.id} ({p.experiment})" for p in PAPERS.values())
        raise BloodflError(f"unknown paper {name!r}; valid: {valid}")
    return PAPERS[table[name]]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(*groups: tuple[str, ...] | list[str]) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key (at the later's place)."""
    out: list[str] = []
    for group in groups:
        for o in group:
            out = [x for x in out if _key(x) != _key(o)]
            out.append(o)
    return out


def step_args(paper: Paper, step: Step, scale: str, extra: list[str]) -> list[str]:
    if scale not in SCALES:
        raise BloodflError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    mine = [o for o in extra if step.script == "federate.py" or not o.startswith(FEDERATED_ONLY)]
    scaled = (*paper.cpu, *step.cpu) if scale == "cpu" else step.paper
    if step.script == "federate.py":  # rounds x local epochs set its length; trainer.max_epochs is not read
        scaled = tuple(o for o in scaled if _key(o) != "trainer.max_epochs")
    return merge([f"sweep={step.sweep or paper.experiment}"], step.overrides, scaled, mine)


def plan(paper: Paper, scale: str, out: Path, extra: list[str] = (), steps: list[str] | None = None) -> list[Command]:
    """The study's commands, in the order they run (the paper's models, leakage comparisons, federated rows)."""
    known = [s.name for s in paper.steps]
    for name in steps or []:
        if name not in known:
            raise BloodflError(f"unknown step {name!r} of papers/{paper.id}; valid: {', '.join(known)}")
    chosen = [s for s in paper.steps if scale in s.scales and (not steps or s.name in steps)]
    if not chosen:
        raise BloodflError(f"no step of papers/{paper.id} runs at scale {scale!r} with --steps {','.join(steps or [])}")
    return [Command(s, [*step_args(paper, s, scale, list(extra)), f"hydra.sweep.dir={out / s.name}"], out / s.name)
            for s in chosen]


def gaps(paper: Paper) -> tuple[Gap, ...]:
    return paper.gaps


def expand_jobs(command: Command) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands the sweep config's ``hydra.sweeper.params`` and
    the command line (command-line values of a swept key replace the config's)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bloodfl.console import bool_group_choices

    argv = ["prog", *(a for a in command.args if not a.startswith("hydra."))]
    bool_group_choices(CONF_DIR, argv)  # dp=true as the entry points read it
    args = argv[1:]
    parser = OverridesParser.create()
    plain = [a for a, o in zip(args, parser.parse_overrides(args)) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=Path(command.script).stem, overrides=plain, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    return BasicSweeper.split_arguments(parser.parse_overrides(params + args), None)[0]


def compose_job(script: str, job: list[str]):  # noqa: ANN201  (a DictConfig; omegaconf imported lazily)
    """The config one job of a command runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=Path(script).stem, overrides=job)
    finally:
        GlobalHydra.instance().clear()


def estimate(command: Command) -> tuple[int, str]:
    """One line: how many jobs, which models, image size and epochs (rounds x local epochs when federated)."""
    jobs = expand_jobs(command)
    models, sizes, epochs = [], set(), set()
    for job in jobs:
        cfg = compose_job(command.script, job)
        if cfg.model.name not in models:
            models.append(cfg.model.name)
        sizes.add(int(cfg.dataset.image_size))
        if command.script == "federate.py":
            epochs.add(f"{cfg.fl.rounds} rounds x {cfg.fl.local_epochs} local epochs, {cfg.fl.num_clients} clients")
        else:
            epochs.add(f"{cfg.trainer.max_epochs} epochs")
    return len(jobs), (f"{len(jobs)} job(s): {', '.join(models)}; {'/'.join(str(s) for s in sorted(sizes))} px; "
            f"{'; '.join(sorted(epochs))}")


def check(commands: list[Command]) -> None:
    """Compose every job of every command before anything runs: a bad override stops the study at once, in one
    line, instead of failing one step an hour in."""
    for command in commands:
        try:
            for job in expand_jobs(command):
                compose_job(command.script, job)
        except Exception as exc:  # Hydra's composition errors have no common base class
            first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            raise BloodflError(f"step {command.step.name} ({command.script}) does not compose: {first}; fix the "
                               f"override, or leave the step out with --steps") from None
