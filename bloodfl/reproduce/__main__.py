"""Run one paper's protocol: its models, the leakage comparisons, the federated and private rows, then the report.

    python -m bloodfl.reproduce 000 --dry-run                      # the commands and the scale, nothing runs
    python -m bloodfl.reproduce 000 paths.data_dir=/data           # cpu scale (64 px, 10 epochs, resnet18)
    python -m bloodfl.reproduce alam2025_all --scale paper trainer=gpu
    python -m bloodfl.reproduce 001 --steps federated_dp fl.num_clients=10

Every run of a study goes under one new directory (default ``logs/reproduce/<paper>/<timestamp>``), one folder
per step; ``study.json`` records the commands, their exit status and wall time. Extra ``key=value`` arguments
go to every command (``fl.*`` only to the federated ones). Afterwards: ``python -m bloodfl.reproduce.results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bloodfl.console import cli_errors
from bloodfl.errors import BloodflError
from bloodfl.reproduce.plan import ROOT, Command, check, estimate, plan, resolve_paper
from bloodfl.reproduce.protocols import SCALES, Paper

STUDY_FILE = "study.json"


def default_out(paper: Paper) -> Path:
    logs = Path(os.environ.get("BLOODFL_LOGS", "logs"))
    return logs / "reproduce" / paper.id / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def claim(out: Path) -> Path:
    """The study's own new directory: never one that already holds anything."""
    if out.exists() and any(out.iterdir()):
        raise BloodflError(f"{out} already exists and is not empty; choose another --out (studies never overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def study_command(paper: Paper, scale: str, extra: list[str], steps: list[str] | None) -> str:
    parts = ["python -m bloodfl.reproduce", paper.id, f"--scale {scale}"]
    parts += [f"--steps {','.join(steps)}"] if steps else []
    return " ".join(parts + extra)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def print_plan(paper: Paper, scale: str, commands: list[Command], out: Path) -> None:
    print(f"# papers/{paper.id} ({paper.experiment}), scale {scale}, into {out}")
    if scale == "cpu":
        print(f"# cpu scale: {paper.cpu_note}")
    total = 0
    for c in commands:
        jobs, line = estimate(c)
        total += jobs
        print(f"# {c.step.name}: {c.step.label}; {line}")
        print(c.shell())
    for gap in paper.gaps:
        print(f"# not run ({gap.name}): {gap.label}: {gap.why}")
    print(f"python -m bloodfl.report {out}")
    print(f"# {total} job(s) in {len(commands)} command(s)")


def write_study(out: Path, record: dict[str, Any]) -> None:
    (out / STUDY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_study(paper: Paper, scale: str, commands: list[Command], out: Path, record: dict[str, Any]) -> int:
    """Each command in turn (a failed one is recorded, the rest still run), then the report."""
    from bloodfl.report import report

    failed = []
    for c, entry in zip(commands, record["steps"]):
        print(f"bloodfl.reproduce: {c.step.name}: {c.shell()}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(c.argv()).returncode
        entry.update(returncode=rc, wall_s=round(time.perf_counter() - start, 1),
                     status="done" if rc == 0 else "failed")
        write_study(out, record)  # after every step: an interrupted study still says what ran
        if rc != 0:
            failed.append(c.step.name)
    record["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write_study(out, record)
    try:
        result = report(out)
        print("\n".join(result["lines"]))  # type: ignore[arg-type]
        print("report: " + ", ".join(str(p) for p in result["paths"]))  # type: ignore[union-attr]
    except BloodflError as exc:
        print(f"bloodfl: error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"bloodfl: error: step(s) {', '.join(failed)} of {out} failed; see their logs under {out}",
              file=sys.stderr)
        return 2
    print(f"Next: python -m bloodfl.reproduce.results {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodfl.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("paper", help="000..004, papers/<n>, or the experiment name (e.g. dipto2023_rbc)")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="cpu: small images, few epochs, one or two small models; paper: the paper's protocol")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the scale; run nothing")
    parser.add_argument("--out", help="the study's directory (default: logs/reproduce/<paper>/<timestamp>)")
    parser.add_argument("--steps", help="comma-separated steps to run (default: all of the scale)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every command (fl.*: federated only)")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    with cli_errors():
        paper = resolve_paper(args.paper)
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise BloodflError(f"{bad[0]!r} is not a key=value override; options go before the overrides")
        steps = args.steps.split(",") if args.steps else None
        out = Path(args.out) if args.out else default_out(paper)
        commands = plan(paper, args.scale, out, args.overrides, steps)
        if args.dry_run:
            print_plan(paper, args.scale, commands, out)
            return 0
        check(commands)
        claim(out)
        record = {
            "paper": paper.id, "experiment": paper.experiment, "scale": args.scale,
            "command": study_command(paper, args.scale, args.overrides, steps),
            "overrides": args.overrides, "git_commit": git_commit(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "steps": [{"name": c.step.name, "label": c.step.label, "script": c.script, "command": c.shell(),
                       "status": "pending"} for c in commands],
            "gaps": [{"name": g.name, "label": g.label, "why": g.why} for g in paper.gaps],
        }
        write_study(out, record)
        return run_study(paper, args.scale, commands, out, record)


if __name__ == "__main__":
    raise SystemExit(main())
