"""The global model's BatchNorm statistics, averaged or recomputed (``fl.bn_stats``, issue #8), from one run.

A client's training never reads the BatchNorm running statistics it receives (BatchNorm normalises with batch
statistics while training), so ``fl.bn_stats=average`` and ``=recompute`` train the same weights; they differ only
in the statistics the evaluated global model carries. This re-evaluates every round checkpoint of a finished
federated run (e.g. a ``bench_vs_plain.py --variants federate`` work dir) both ways: with the statistics in the
checkpoint, and with statistics recomputed for its weights on ``--images`` random training images
(``bloodfl.fl.batchnorm.measure``, what the clients do, here on the pooled training split). Validation accuracy
and loss and test accuracy per round go to ``<out>/bn_stats.json`` and a plot, with train.py's validation curve
beside them when ``--train-metrics`` names its CSV log. With ``--draws N`` it instead recomputes the last round's
statistics N times for each ``--images`` count: how much the result depends on the draw (``fl.bn_batches``).

    python bench/bench_bn_stats.py /tmp/bench_vs_plain_XXXX/federate_0 --dataset pbc --seed 1 \\
        --train-metrics /tmp/bench_vs_plain_YYYY/train_0/csv/metrics.csv --out docs --name parity_pbc_bn_stats
    python bench/bench_bn_stats.py /tmp/bench_vs_plain_XXXX/federate_0 --dataset pbc --seed 1 \\
        --images 160 320 640 1280 --draws 5 --out docs --name parity_pbc_bn_draws
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
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


def setup(a: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, tuple, tuple]:
    """The run's network (untrained) and its split's train images, (val x, y) and (test x, y) as tensors."""
    cfg = compose(a, [], Path(a.work) / "cfg", "train", Path(a.work) / "cache")
    dm = Root(cfg).datamodule()
    dm.setup("fit")
    dm.setup("test")
    (xtr, _), val, test = split_tensors(dm, "train"), split_tensors(dm, "val"), split_tensors(dm, "test")
    net = build_classifier(a.model, dm.num_classes, a.image_size)
    return net, xtr, val, test


def recompute(net: torch.nn.Module, xtr: torch.Tensor, images: int, gen: torch.Generator, bs: int) -> None:
    """What the clients do (``measure``), here on ``images`` random images of the pooled training split."""
    sub = torch.randperm(len(xtr), generator=gen)[:images]
    measure(net, (xtr[sub[i:i + bs]] for i in range(0, len(sub), bs)))


def scores(net: torch.nn.Module, val: tuple, test: tuple, bs: int) -> tuple[float, float, float]:
    """Validation loss and accuracy, test accuracy."""
    return (*evaluate(net, *val, bs), evaluate(net, *test, bs)[1])


def curves(run: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    net, xtr, val, test = setup(a)
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    for path in sorted((run / "checkpoints").glob("round_*.pt")):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["weights"])
        row: dict[str, Any] = {"round": int(path.stem.split("_")[1])}
        row["val_loss"], row["val_acc"], row["test_acc"] = scores(net, val, test, a.batch_size)
        recompute(net, xtr, a.images, gen, a.batch_size)
        row["val_loss_recomputed"], row["val_acc_recomputed"], row["test_acc_recomputed"] = \
            scores(net, val, test, a.batch_size)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def draws(run: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """The last round's weights with statistics recomputed ``--draws`` times on each ``--images`` count: how much
    the evaluated model depends on which training images the statistics come from (``fl.bn_batches``)."""
    ckpts = {int(p.stem.split("_")[1]): p for p in (run / "checkpoints").glob("round_*.pt")}
    if not ckpts or (a.round and a.round not in ckpts):
        raise SystemExit(f"{run / 'checkpoints'} has no checkpoint of round {a.round or 'any'}; "
                         f"rounds there: {sorted(ckpts) or 'none'}")
    rnd = a.round or max(ckpts)
    net, xtr, val, test = setup(a)  # after the checks: decoding the data set takes a while
    weights = torch.load(ckpts[rnd], map_location="cpu", weights_only=True)["weights"]
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    for images in a.images:
        for d in range(a.draws):
            net.load_state_dict(weights)
            recompute(net, xtr, images, gen, a.batch_size)
            row: dict[str, Any] = {"round": rnd, "images": images, "draw": d}
            row["val_loss"], row["val_acc"], row["test_acc"] = scores(net, val, test, a.batch_size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for images in sorted({r["images"] for r in rows}):
        acc = [r["test_acc"] for r in rows if r["images"] == images]
        val = [r["val_acc"] for r in rows if r["images"] == images]
        out.append({"images": images, "draws": len(acc), "test_acc_mean": statistics.mean(acc),
                    "test_acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "test_acc_min": min(acc), "test_acc_max": max(acc),
                    "val_acc_mean": statistics.mean(val), "val_acc_sd": statistics.stdev(val) if len(val) > 1 else 0.0})
    return out


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
    p.add_argument("--images", type=int, nargs="+", default=[320],
                   help="training images for the recomputed statistics (several only with --draws)")
    p.add_argument("--draws", type=int, default=0,
                   help="instead of the per-round curves: the last round, statistics recomputed this many times "
                        "for each --images count")
    p.add_argument("--round", type=int, default=0, help="with --draws: the round (default: the last)")
    p.add_argument("--train-metrics", type=Path, default=None, help="train.py's csv/metrics.csv, for its curve")
    p.add_argument("--work", default=None, help="config and decoded-image cache folder (default: <run>/..)")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "bench_bn_stats")
    p.add_argument("--name", default="bn_stats")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.data_dir = str(Path(a.data_dir).resolve())
    a.work = a.work or str(a.run.parent)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.draws:
        rows = draws(a.run, a)
        result = {"command": " ".join(sys.argv), "draws": rows, "summary": summary(rows)}
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
        for s in result["summary"]:
            print(json.dumps(s))
        print(f"results in {a.out / a.name}.json")
        return
    if len(a.images) != 1:
        p.error("several --images counts need --draws")
    a.images = a.images[0]
    rows = curves(a.run, a)
    train = train_curve(a.train_metrics) if a.train_metrics else []
    (a.out / f"{a.name}.json").write_text(json.dumps({"command": " ".join(sys.argv), "rounds": rows,
                                                      "train_val_acc": train}, indent=1))
    plot(a.out / f"{a.name}.png", rows, train, a)
    print(f"results in {a.out / a.name}.json and .png")


if __name__ == "__main__":
    main()
