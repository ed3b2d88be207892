"""What does differential privacy cost in accuracy (issue #12)? Test accuracy, with its 95% CI, against the privacy
budget ε ∈ {1, 3, 8, ∞} for centralized training, federated with 5 IID clients and federated with random-size
shards (papers/000), on all_pbs and pbc at 64 px. ε = ∞ is the run without DP (dp=false).

Every point is a run of ``train.py`` / ``federate.py`` as a user runs it (a subprocess with Hydra overrides, its
own output folder); the numbers come from the runs' ``metrics.json`` (``test/acc``, ``test/acc_ci95_low/high``)
and ``privacy.json`` (the ε spent, worst client). Written into OUT: ``dp_utility.csv`` (one row per run),
``dp_utility.md`` (medians over repeats), ``dp_utility.png`` (accuracy against ε, one line per setting) and
``dp_utility.json`` (the command and settings). A run that fails is a row with its error, not the end of the grid.

DP-SGD recipes (docs/privacy.md) pass through to the DP runs with ``--extra``; other overrides go to every run:

    python bench/bench_dp_utility.py docs/bench/dp_utility                     # the full grid (hours on a GPU)
    python bench/bench_dp_utility.py /tmp/dpu --extra dp.ema=0.999 dp.augmult=4 augment=flips
    python bench/bench_dp_utility.py /tmp/dpu --quick                           # tiny scale: proves the pipeline
    python bench/bench_dp_utility.py /tmp/dpu8 --epsilons 8 --with /tmp/dpu     # one more point, table of all
    python bench/bench_dp_utility.py docs/dpu --report --with /tmp/dpu /tmp/dpu8   # one table and plot of both

``--quick``: 2 epochs / 2 rounds of 1 local epoch, 5 training batches per epoch, 2 validation and 5 test batches
(a subset of each split): numbers that mean nothing, in minutes on a CPU. The noise is still calibrated for full
epochs, so the DP runs stop early and spend less than the target ε (the table shows what each spent).
``dp.ema`` is refused by federate.py (docs/privacy.md): with ``--extra dp.ema=...`` the federated DP points are
rows with that error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bloodfl.config import dp_default_model  # noqa: E402

SETTINGS = {  # name -> (script, overrides)
    "centralized": ("train.py", []),
    "federated_iid": ("federate.py", ["fl.partition=iid"]),
    "federated_random_size": ("federate.py", ["fl.partition=random_size"]),
}
QUICK = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=5"]


def overrides(dataset: str, setting: str, epsilon: float, a: argparse.Namespace, seed: int) -> list[str]:
    """The Hydra overrides of one grid point."""
    _, extra = SETTINGS[setting]
    args = [f"dataset={dataset}", f"dataset.image_size={a.image_size}", f"model={a.model}",
            f"loader.batch_size={a.batch_size}", f"seed={seed}", "logger=csv", *extra]
    if setting == "centralized":
        args.append(f"trainer.max_epochs={a.epochs}")
    else:  # local epochs: dp=true's recipe (3) under DP, 1 without, unless --local-epochs
        args += [f"fl.num_clients={a.clients}", f"fl.rounds={a.rounds}"]
        if a.local_epochs is not None:
            args.append(f"fl.local_epochs={a.local_epochs}")
    if a.quick:
        args += QUICK
    if math.isinf(epsilon):
        return [*args, "dp=false", *(e for e in a.extra if not e.startswith("dp."))]
    return [*args, "dp=true", f"dp.target_epsilon={epsilon:g}", "dp.noise_multiplier=null", *a.extra]


def run_one(script: str, args: list[str], env: dict[str, str], out: Path) -> dict[str, Any]:
    """One run; its wall time, test accuracy with CI, and ε spent (None without DP), or its error."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / script), *args, f"hydra.run.dir={out}"], env=env,
                         capture_output=True, text=True)
    row: dict[str, Any] = {"wall_s": time.perf_counter() - t0, "out": str(out)}
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        return {**row, "error": lines[-1] if lines else f"exit code {res.returncode}"}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc", "test/acc_ci95_low", "test/acc_ci95_high", "test/f1_macro"):
        row[key] = metrics.get(key)
    privacy = out / "privacy.json"
    row["epsilon_spent"] = json.loads(privacy.read_text())["worst"]["epsilon"] if privacy.exists() else None
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows an earlier run of this benchmark wrote (numbers back from text; empty cells as None)."""
    numeric = ("epsilon", "epsilon_spent", "test/acc", "test/acc_ci95_low", "test/acc_ci95_high", "test/f1_macro",
               "wall_s")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (float(v) if k in numeric and v not in ("", None) else (v or None)) for k, v in r.items()}
            for r in rows]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the repeats of each (dataset, setting, ε)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["setting"], r["epsilon"]), []).append(r)
    out = []
    for (dataset, setting, eps), runs in groups.items():
        ok = [r for r in runs if not r.get("error")]

        def med(key: str, runs: list[dict[str, Any]] = ok) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        out.append({"dataset": dataset, "setting": setting, "epsilon": eps, "runs": len(runs),
                    "failed": len(runs) - len(ok), "epsilon_spent": med("epsilon_spent"), "test/acc": med("test/acc"),
                    "test/acc_ci95_low": med("test/acc_ci95_low"), "test/acc_ci95_high": med("test/acc_ci95_high"),
                    "wall_s": med("wall_s", runs), "error": next((r["error"] for r in runs if r.get("error")), "")})
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def write_markdown(path: Path, summary: Sequence[dict[str, Any]], command: str) -> None:
    lines = [f"`{command}`", "", "| data set | setting | ε target | ε spent | test acc | 95% CI | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ci = f"{_fmt(s['test/acc_ci95_low'], '.3f')}–{_fmt(s['test/acc_ci95_high'], '.3f')}"
        eps = "∞" if math.isinf(s["epsilon"]) else f"{s['epsilon']:g}"
        note = f"{s['failed']}/{s['runs']} failed: {s['error']}" if s["failed"] else ""
        lines.append(f"| {s['dataset']} | {s['setting']} | {eps} | {_fmt(s['epsilon_spent'], '.2f')} | "
                     f"{_fmt(s['test/acc'], '.4f')} | {ci} | {_fmt(s['wall_s'], '.0f')} | {note} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, summary: Sequence[dict[str, Any]]) -> None:
    """Test accuracy with its 95% CI against ε (∞ drawn at the right end), one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({s["dataset"] for s in summary})
    finite = sorted({s["epsilon"] for s in summary if not math.isinf(s["epsilon"])}) or [1.0]
    at_inf = max(finite) * 3  # where ε = ∞ is drawn
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for setting in SETTINGS:
            pts = sorted((at_inf if math.isinf(s["epsilon"]) else s["epsilon"], s) for s in summary
                         if s["dataset"] == dataset and s["setting"] == setting and s["test/acc"] is not None)
            if not pts:
                continue
            x = [p for p, _ in pts]
            y = [s["test/acc"] for _, s in pts]
            low = [s["test/acc"] - (s["test/acc_ci95_low"] if s["test/acc_ci95_low"] is not None else s["test/acc"])
                   for _, s in pts]
            high = [(s["test/acc_ci95_high"] if s["test/acc_ci95_high"] is not None else s["test/acc"]) - s["test/acc"]
                    for _, s in pts]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=setting)
        ax.set_xscale("log")
        ticks = [*finite, at_inf]
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
        ax.minorticks_off()
        ax.set(title=dataset, xlabel="ε (δ per client: min(1e-5, 0.1/n))", ylabel="test accuracy (95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the table, plot and runs")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: OUT/cache)")
    p.add_argument("--datasets", nargs="+", default=["all_pbs", "pbc"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf], help="inf: no DP")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default=dp_default_model(),
                   help="one model for every ε, so the curve compares like with like (default: dp=true's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="centralized epochs")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=None, help="default: what each run's config gives")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="seeds per point (medians reported)")
    p.add_argument("--quick", action="store_true", help="tiny scale: few epochs/rounds, a subset of each split")
    p.add_argument("--with", dest="earlier", nargs="*", type=Path, default=[],
                   help="output folders of earlier runs of this benchmark: their rows join the table and plot")
    p.add_argument("--extra", nargs="*", default=[], help="overrides: dp.* for the DP runs, others for every run")
    p.add_argument("--report", action="store_true", help="run nothing: one table and plot of the --with folders")
    a = p.parse_args()
    if a.report and not a.earlier:
        p.error("--report merges earlier runs: name their folders with --with DIR [DIR ...]")
    if a.quick:
        a.epochs, a.rounds, a.local_epochs = min(a.epochs, 2), min(a.rounds, 2), 1

    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BLOODFL_DATA": str(Path(a.data_dir).resolve()),
           "BLOODFL_CACHE": str((a.cache_dir or a.out / "cache").resolve()), "BLOODFL_LOGS": str(a.out / "logs")}
    command = " ".join(["python bench/bench_dp_utility.py", *sys.argv[1:]])
    rows: list[dict[str, Any]] = []
    columns = ["dataset", "setting", "epsilon", "seed", "epsilon_spent", "test/acc", "test/acc_ci95_low",
               "test/acc_ci95_high", "test/f1_macro", "wall_s", "error", "out", "overrides"]
    for rep in range(0 if a.report else a.repeats):
        seed = 42 + rep
        for dataset in a.datasets:
            for setting in a.settings:
                for eps in a.epsilons:
                    script, _ = SETTINGS[setting]
                    args = overrides(dataset, setting, eps, a, seed)
                    name = f"{dataset}_{setting}_eps{'inf' if math.isinf(eps) else f'{eps:g}'}_seed{seed}"
                    row = {"dataset": dataset, "setting": setting, "epsilon": eps, "seed": seed,
                           **run_one(script, args, env, a.out / "runs" / name), "overrides": " ".join(args)}
                    rows.append(row)
                    status = row.get("error") or (f"test/acc {_fmt(row['test/acc'], '.4f')} "
                                                  f"ε spent {_fmt(row['epsilon_spent'], '.2f')}")
                    print(f"{name}: {status} ({row['wall_s']:.0f} s)", flush=True)
                    with open(a.out / "dp_utility.csv", "w", newline="") as fh:  # rewritten as runs finish
                        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                        w.writeheader()
                        w.writerows(rows)
    summary = summarize([*rows, *(r for d in a.earlier for r in read_rows(d / "dp_utility.csv"))])
    write_markdown(a.out / "dp_utility.md", summary, command)
    plot(a.out / "dp_utility.png", summary)
    plain = [{**s, "epsilon": "inf" if math.isinf(s["epsilon"]) else s["epsilon"]} for s in summary]  # valid JSON
    (a.out / "dp_utility.json").write_text(json.dumps({"command": command, "extra": a.extra, "quick": a.quick,
                                                        "summary": plain}, indent=2))
    print((a.out / "dp_utility.md").read_text())
    print(f"table, plot and runs in {a.out}")


if __name__ == "__main__":
    main()
