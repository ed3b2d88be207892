"""The global model's BatchNorm statistics, averaged or recomputed (``fl.bn_stats``, issue #8), from one run.

A client's training never reads the BatchNorm running statistics it receives (BatchNorm normalises with batch
statistics while training), so ``fl.bn_stats=average`` and ``=recompute`` train the same weights; they differ only
in the statistics the evaluated global model carries. This re-evaluates every round checkpoint of a finished
federated run (e.g. a ``bench_vs_plain.py --variants federate`` work dir) both ways: with the statistics in the
checkpoint, and with statistics recomputed for its weights on ``--images`` random training images
(``bloodfl.fl.batchnorm.measure``, what the clients do, here on the pooled training split). Validation accuracy
and loss and test accuracy per round go to ``<out>/bn_stats.json`` and a plot, with train.py's validation curve
beside them when ``--train-metrics`` names its CSV log.

    python bench/bench_bn_stats.py /tmp/bench_vs_plain_XXXX/federate_0 --dataset pbc --seed 1 \\
        --train-metrics /tmp/bench_vs_plain_YYYY/train_0/csv/metrics.csv --out docs --name parity_pbc_bn_stats
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vs_plain import compose, evaluate, split_tensors  # noqa: E402

from bloodfl.compose import Root  # noqa: E402
from bloodfl.fl.batchnorm import measure  # noqa: E402
from bloodfl.models import build_classifier  # noqa: E402


def curves(run: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = compose(a, [], Path(a.work) / "cfg", "train", Path(a.work) / "cache")
    dm = Root(cfg).datamodule()
    dm.setup("fit")
    dm.setup("test")
    (xtr, _), val, test = split_tensors(dm, "train"), split_tensors(dm, "val"), split_tensors(dm, "test")
    net = build_classifier(a.model, dm.num_classes, a.image_size)
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    for path in sorted((run / "checkpoints").glob("round_*.pt")):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["weights"])
        row: dict[str, Any] = {"round": int(path.stem.split("_")[1])}
        row["val_loss"], row["val_acc"] = evaluate(net, *val, a.batch_size)
        row["test_acc"] = evaluate(net, *test, a.batch_size)[1]
        sub = torch.randperm(len(xtr), generator=gen)[: a.images]
        measure(net, (xtr[sub[i:i + a.batch_size]] for i in range(0, len(sub), a.batch_size)))
        row["val_loss_recomputed"], row["val_acc_recomputed"] = evaluate(net, *val, a.batch_size)
        row["test_acc_recomputed"] = evaluate(net, *test, a.batch_size)[1]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def train_curve(path: Path) -> list[float]:
    with open(path) as fh:
        return [float(r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]


def plot(path: Path, rows: list[dict[str, Any]], train: list[float], a: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    r = [row["round"] for row in rows]
    ax.plot(r, [row["val_acc"] for row in rows], "o-", ms=3, color="tab:red",
            label="federated, averaged BatchNorm statistics (fl.bn_stats=average)")
    ax.plot(r, [row["val_acc_recomputed"] for row in rows], "o-", ms=3, color="tab:orange",
            label="federated, recomputed (fl.bn_stats=recompute)")
    if train:
        ax.plot(range(1, len(train) + 1), train, "o-", ms=3, color="tab:blue", label="train.py, per epoch")
    ax.set(xlabel="round / epoch", ylabel="validation accuracy",
           title=f"{a.dataset}, {a.model}, {a.image_size} px, seed {a.seed}, 5 IID clients x 1 local epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished federated run directory (with checkpoints/)")
    p.add_argument("--data-dir", default=os.environ.get("BLOODFL_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--dataset", default="pbc")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1, help="the run's seed (its split)")
    p.add_argument("--images", type=int, default=320, help="training images for the recomputed statistics")
    p.add_argument("--train-metrics", type=Path, default=None, help="train.py's csv/metrics.csv, for its curve")
    p.add_argument("--work", default=None, help="config and decoded-image cache folder (default: <run>/..)")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_bn_stats")
    p.add_argument("--name", default="bn_stats")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.data_dir = str(Path(a.data_dir).resolve())
    a.work = a.work or str(a.run.parent)
    rows = curves(a.run, a)
    train = train_curve(a.train_metrics) if a.train_metrics else []
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps({"command": " ".join(sys.argv), "rounds": rows,
                                                      "train_val_acc": train}, indent=1))
    plot(a.out / f"{a.name}.png", rows, train, a)
    print(f"results in {a.out / a.name}.json and .png")


if __name__ == "__main__":
    main()
