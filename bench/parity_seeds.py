"""Issue #8's accuracy targets are means over seeds: summarise ``bench_vs_plain.py`` runs made with different seeds.

Each DIR is a ``bench_vs_plain.py --out DIR --seed S`` results folder (one seed each; run them one after another,
or on several machines). Writes into ``--out``: ``parity_seeds.md`` (per seed and mean: final test accuracy of the
plain loop, train.py and federate.py, the gaps the targets are about, and wall/CPU ratios) and
``parity_seeds.png`` (validation accuracy per epoch/round, the mean over seeds as a line, each seed faint).

    for s in 1 2 3; do python bench/bench_vs_plain.py --data-dir ../shared/data --epochs 10 --rounds 10 \\
        --repeats 1 --seed $s --out logs/parity/all_pbs_s$s; done
    python bench/parity_seeds.py logs/parity/all_pbs_s* --out docs                # docs/parity.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

VARIANTS = {"plain": ("tab:gray", "plain PyTorch loop"), "train": ("tab:blue", "train.py"),
            "federate": ("tab:orange", "federate.py (IID clients, per round)"),
            "plain_fed": ("tab:brown", "plain FedAvg loop (IID clients, per round)")}
# what may differ between folders of one summary: a seed's variants may come from several runs
PER_RUN = ("seed", "out", "repeats", "variants", "threads")


def load(dirs: list[Path]) -> list[dict[str, Any]]:
    """One run per seed; folders of the same seed (e.g. a later ``--variants plain_fed``) are joined. Time ratios
    are only those measured within one folder."""
    by_seed: dict[int, dict[str, Any]] = {}
    for d in dirs:
        if not (d / "results.json").is_file():
            raise SystemExit(f"{d} has no results.json: pass the --out folders of finished bench_vs_plain.py runs")
        res = json.loads((d / "results.json").read_text())
        first = res["repeats"][0]  # the accuracy of a seed is deterministic: every repeat gives the same curve
        run = by_seed.setdefault(res["settings"]["seed"], {"seed": res["settings"]["seed"],
                                                           "settings": res["settings"], "median": {}})
        run["median"].update({k: v for k, v in res["median"].items() if v is not None})
        run.update({k: first[k] for k in VARIANTS if k in first})
        run.setdefault("all_settings", []).append(res["settings"])
    every = [s for r in by_seed.values() for s in r["all_settings"]]
    own = {"train_args": "train", "fed_args": "federate"}  # overrides of one variant: compared where it ran
    sets = {json.dumps({k: v for k, v in s.items() if k not in (*PER_RUN, *own)}, sort_keys=True) for s in every}
    for key, kind in own.items():
        sets |= {f"{key}={json.dumps(s.get(key, []))}" for s in every if kind in s["variants"]}
    if len(sets) > 1 + sum(any(kind in s["variants"] for s in every) for kind in own.values()):
        raise SystemExit("the folders were run with different settings (other than --seed and --variants); "
                         "summarise alike runs")
    return sorted(by_seed.values(), key=lambda r: r["seed"])


def table(runs: list[dict[str, Any]]) -> str:
    kinds = [k for k in VARIANTS if all(k in r for r in runs)]
    head = ["seed", *(f"{k} test acc %" for k in kinds)]
    gaps = []
    if {"plain", "train"} <= set(kinds):
        gaps.append(("train − plain", "train", "plain"))
    if {"plain", "federate"} <= set(kinds):
        gaps.append(("federate − plain", "federate", "plain"))
    if {"train", "federate"} <= set(kinds):
        gaps.append(("federate − train", "federate", "train"))
    if {"plain_fed", "federate"} <= set(kinds):  # bloodfl's FedAvg against FedAvg written plainly
        gaps.append(("federate − plain FedAvg", "federate", "plain_fed"))
    if {"plain_fed", "plain"} <= set(kinds):  # FedAvg's own gap, without bloodfl
        gaps.append(("plain FedAvg − plain", "plain_fed", "plain"))
    ratios = [k for k in ("train/plain wall", "train/plain cpu", "federate/plain wall", "federate/plain cpu",
                          "federate/plain_fed wall", "federate/plain_fed cpu")
              if all(r["median"].get(k) is not None for r in runs)]
    head += [f"{g[0]} (points)" for g in gaps] + ratios
    # a federated run read both ways (bench_vs_plain records each round's test accuracy): its last round too
    last = "federate" in kinds and all("test_acc_per_round" in r["federate"] for r in runs)
    if last:
        head[1 + kinds.index("federate")] += " (tested round)"
        head.insert(2 + kinds.index("federate"), "federate last round test acc %")
        if "train" in kinds:
            head.insert(len(head) - len(ratios), "federate last round − train (points)")
    rows = []
    for r in runs:
        acc = {k: 100 * r[k]["test/acc"] for k in kinds}
        cells = [f"{acc[k]:.2f}" for k in kinds]
        gap_cells = [f"{acc[a] - acc[b]:+.2f}" for _, a, b in gaps]
        if last:
            fed = r["federate"]
            i = kinds.index("federate")
            cells[i] += f" ({fed.get('selected_round', len(fed['test_acc_per_round']))})"
            cells.insert(i + 1, f"{100 * fed['test_acc_per_round'][-1]:.2f}")
            if "train" in kinds:
                gap_cells.append(f"{100 * fed['test_acc_per_round'][-1] - acc['train']:+.2f}")
        rows.append([str(r["seed"]), *cells, *gap_cells, *(f"{r['median'][k]:.2f}" for k in ratios)])
    mean = ["**mean**"]
    for k in kinds:
        mean.append(f"**{statistics.mean(100 * r[k]['test/acc'] for r in runs):.2f}**")
        if last and k == "federate":
            mean.append(f"**{statistics.mean(100 * r[k]['test_acc_per_round'][-1] for r in runs):.2f}**")
    for _, a, b in gaps:
        mean.append(f"**{statistics.mean(100 * (r[a]['test/acc'] - r[b]['test/acc']) for r in runs):+.2f}**")
    if last and "train" in kinds:
        gap = statistics.mean(100 * (r["federate"]["test_acc_per_round"][-1] - r["train"]["test/acc"]) for r in runs)
        mean.append(f"**{gap:+.2f}**")
    mean += [f"**{statistics.median(r['median'][k] for r in runs):.2f}** (median)" for k in ratios]
    rows.append(mean)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend
    from matplotlib.ticker import MaxNLocator

    s = runs[0]["settings"]
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for kind, (color, label) in VARIANTS.items():
        curves = [r[kind]["val_acc"] for r in runs if kind in r]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        for c in curves:
            ax.plot(range(1, n + 1), c[:n], color=color, alpha=0.25, lw=1)
        ax.plot(range(1, n + 1), [statistics.mean(c[i] for c in curves) for i in range(n)], color=color,
                marker="o", ms=3, label=f"{label}, mean of {len(curves)} seeds")
    ax.set(xlabel="epoch / round", ylabel="validation accuracy",
           title=f"{s['dataset']}, {s['model']}, {s['image_size']} px (faint: each seed)")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="bench_vs_plain.py --out folders, one seed each")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="file stem (default parity_<dataset>_seeds)")
    a = p.parse_args()
    runs = load(a.dirs)
    stem = a.name or f"parity_{runs[0]['settings']['dataset']}_seeds"
    a.out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    (a.out / f"{stem}.md").write_text(md + "\n")
    plot(a.out / f"{stem}.png", runs)
    print(md)
    print(f"wrote {a.out / (stem + '.md')} and {a.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
