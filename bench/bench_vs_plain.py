"""Does bloodfl train like a plain PyTorch loop (issue #8)? ``train.py`` and ``federate.py`` against a yardstick.

The yardstick is a plain loop written here: the images bloodfl's own DataModule decoded (same split, same
pixels, same normalization constants) converted once into float tensors, the network bloodfl builds
(``bloodfl.models.build_classifier(model, C, size)``), Adam (lr 1e-3), batch 32, shuffled by a generator with
the run's seed, validation after every epoch, the weights with the lowest validation loss evaluated on test.
Against it, in the same process and alternating within every repeat:

- ``train``: ``bloodfl.training.run.train(cfg)`` with the config ``python train.py <overrides>`` would run;
- ``federate``: ``bloodfl.fl.run.federate(cfg)``, ``--clients`` IID clients x ``--rounds`` rounds x 1 local
  epoch, ``fl.val_fraction=0`` so the clients train on exactly the centralized training images;
- ``plain_fed`` (not by default): the yardstick of ``federate``, FedAvg written as a plain loop on the same
  arrays (:func:`plain_fed`), so a gap between federated and centralized can be told apart: FedAvg's own, or
  bloodfl's.

Reported: the validation accuracy after every epoch (round) of each variant side by side (the federated
curve is computed after the timed run from the round checkpoints, on the same validation images), final test
accuracy, and wall (``perf_counter``) and CPU (``process_time``: less sensitive to other load) seconds of each
whole run from the data set on (the decoded-image cache is warm for all; Python start-up and imports are not
included), with the ratios bloodfl / plain per repeat and their medians. Writes ``results.json`` and
``curves.png`` into ``--out`` (default logs/bench_vs_plain/<time>, never committed). Targets (issue #8):
accuracy within 1 point of the plain loop's, federated IID within 1 point of centralized, whole-run time
<= 1.05 x the plain loop's.

    python bench/bench_vs_plain.py --data-dir ../shared/data --epochs 6 --rounds 6 --repeats 2   # docs/parity.md
    python bench/bench_vs_plain.py --data-dir ../shared/data --dataset pbc --epochs 6 --rounds 6
    python bench/bench_vs_plain.py --epochs 2 --rounds 2 --repeats 1 --variants plain train     # a quick look
    python bench/bench_vs_plain.py ... --train-args callbacks.model_checkpoint.save_last=true  # settings of one

Other processes on the machine distort the wall times; the load average before each run is recorded.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodfl.compose import Root  # noqa: E402
from bloodfl.fl.run import federate  # noqa: E402
from bloodfl.models import build_classifier  # noqa: E402
from bloodfl.training.run import train  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def common_overrides(a: argparse.Namespace) -> list[str]:
    return [f"dataset={a.dataset}", f"dataset.image_size={a.image_size}", f"model={a.model}",
            f"loader.batch_size={a.batch_size}", "optim.lr=1e-3", f"seed={a.seed}", "logger=csv",
            f"paths.data_dir={a.data_dir}"]


def compose(a: argparse.Namespace, extra: list[str], out: Path, name: str, cache: Path) -> Any:
    from omegaconf import open_dict

    cfg = compose_cfg([*common_overrides(a), *extra], out, name)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache)  # one warm cache for every variant
    return cfg


# ---- the yardstick -----------------------------------------------------------------------------------------

def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``net`` in eval mode on float tensors ``x``."""
    net.eval()
    loss, right = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = net(x[i:i + batch])
            loss += float(nn.functional.cross_entropy(logits, y[i:i + batch], reduction="sum"))
            right += int((logits.argmax(1) == y[i:i + batch]).sum())
    return loss / len(x), right / len(x)


Split = tuple[torch.Tensor, torch.Tensor]


def yardstick_data(cfg: Any, a: argparse.Namespace) -> tuple[nn.Module, Split, Split, Split]:
    """bloodfl's network and the DataModule's train/val/test arrays as normalized float tensors (decoded once),
    seeded in bloodfl.runner's order: data, then network."""
    pl.seed_everything(a.seed, workers=True, verbose=False)
    dm = Root(cfg).datamodule()
    dm.setup("fit")
    net = build_classifier(a.model, dm.num_classes, a.image_size)
    return net, split_tensors(dm, "train"), split_tensors(dm, "val"), split_tensors(dm, "test")


def split_tensors(dm: Any, split: str) -> Split:
    """``split`` of a set-up DataModule as normalized contiguous NCHW float images and int64 labels."""
    mean, std = dm.register_mean_std
    idx = dm.idx[split]  # NumPy indexing copies out of the read-only decoded cache
    x = torch.from_numpy(dm.images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).contiguous(), torch.as_tensor(dm.labels[idx], dtype=torch.long)


def plain(cfg: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The plain loop on the DataModule's arrays; the weights with the lowest val loss are tested."""
    net, (xtr, ytr), (xva, yva), (xte, yte) = yardstick_data(cfg, a)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(a.seed)
    n, bs = len(xtr), a.batch_size
    best_loss, best_state, curve = float("inf"), None, []
    for _ in range(a.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1 if n > bs else n, bs):  # drop_last, as bloodfl's loader
            b = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
            opt.step()
        vloss, vacc = evaluate(net, xva, yva, bs)
        curve.append(vacc)
        if vloss < best_loss:
            best_loss, best_state = vloss, copy.deepcopy(net.state_dict())
    assert best_state is not None
    net.load_state_dict(best_state)
    _, test_acc = evaluate(net, xte, yte, bs)
    return {"val_acc": curve, "test/acc": test_acc}


def plain_fed(cfg: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The yardstick of ``federate.py``: FedAvg written plainly on the same arrays. ``--clients`` IID shards of the
    training images (a seeded permutation cut into equal parts), every round each client loads the global
    weights, trains one epoch with a fresh Adam (lr 1e-3, batch 32, drop_last), and the server averages all
    weights and buffers by shard size; the last round's model is tested, as ``federate.py`` does. With
    ``--plain-fed-bn recompute`` (the default, as ``fl.bn_stats``) the averaged model's BatchNorm statistics are then
    recomputed by ``torch.optim.swa_utils.update_bn`` over ``--plain-fed-bn-batches`` random batches of every shard;
    ``average`` keeps the averaged buffers (what this yardstick did before session 14)."""
    net, (xtr, ytr), (xva, yva), (xte, yte) = yardstick_data(cfg, a)
    gen = torch.Generator().manual_seed(a.seed)
    shards = torch.randperm(len(xtr), generator=gen).tensor_split(a.clients)
    global_state = copy.deepcopy(net.state_dict())
    bs, curve = a.batch_size, []
    for _ in range(a.rounds):
        states, sizes = [], []
        for shard in shards:
            net.load_state_dict(global_state)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            net.train()
            perm = shard[torch.randperm(len(shard), generator=gen)]
            n = len(perm)
            for i in range(0, n - bs + 1 if n > bs else n, bs):
                b = perm[i:i + bs]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
                opt.step()
            states.append(copy.deepcopy(net.state_dict()))
            sizes.append(n)
        total = sum(sizes)
        global_state = {k: (sum(s[k].double() * (m / total) for s, m in zip(states, sizes))).to(v.dtype)
                        for k, v in states[0].items()}
        net.load_state_dict(global_state)
        if a.plain_fed_bn == "recompute":
            picks = [shard[torch.randperm(len(shard), generator=gen)[:a.plain_fed_bn_batches * bs]] for shard in shards]
            update_bn((xtr[b] for pick in picks for b in pick.split(bs)), net)
            global_state = copy.deepcopy(net.state_dict())  # the next round starts from them, as in federate.py
        curve.append(evaluate(net, xva, yva, bs)[1])
    _, test_acc = evaluate(net, xte, yte, bs)
    return {"val_acc": curve, "test/acc": test_acc}


# ---- the bloodfl variants ----------------------------------------------------------------------------------

def train_curve(out: Path, epochs: int) -> list[float]:
    """val/acc per fitted epoch from the CSV logger (rows after the fitted epochs, if any, are not epochs)."""
    with open(out / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/acc")]
    return [float(r["val/acc"]) for r in rows[:epochs]]


def round_curves(cfg: Any, out: Path, a: argparse.Namespace) -> dict[str, list[float]]:
    """The global model after every round, from the round checkpoints (not timed): validation loss and accuracy,
    and test accuracy, so that a run can be read both ways, testing its last round or its best-validation one."""
    dm = Root(cfg).datamodule()
    dm.setup("fit")
    dm.setup("test")
    val, test = split_tensors(dm, "val"), split_tensors(dm, "test")
    net = build_classifier(a.model, dm.num_classes, a.image_size)
    curves: dict[str, list[float]] = {"val_loss": [], "val_acc": [], "test_acc_per_round": []}
    for path in sorted((out / "checkpoints").glob("round_*.pt")):
        weights = torch.load(path, map_location="cpu", weights_only=True)["weights"]
        net.load_state_dict(weights)
        loss, acc = evaluate(net, *val, a.batch_size)
        curves["val_loss"].append(loss)
        curves["val_acc"].append(acc)
        curves["test_acc_per_round"].append(evaluate(net, *test, a.batch_size)[1])
    return curves


def timed(fn: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    load = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn(*args)
    return res, {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "load_before": load}


def run_variant(kind: str, a: argparse.Namespace, work: Path, rep: int) -> dict[str, Any]:
    out = work / f"{kind}_{rep}"
    cache = work / "cache"
    if kind in ("plain", "plain_fed"):
        cfg = compose(a, [], out, "train", cache)
        res, t = timed(plain if kind == "plain" else plain_fed, cfg, a)
        return {**res, **t}
    if kind == "train":
        cfg = compose(a, [f"trainer.max_epochs={a.epochs}", "callbacks.progress_bar=null", *a.train_args],
                      out, "train", cache)
        metrics, t = timed(train, cfg)
        return {"val_acc": train_curve(out, a.epochs), "test/acc": metrics["test/acc"],
                "epochs_run": metrics.get("epochs"), **t}
    cfg = compose(a, [f"fl.num_clients={a.clients}", f"fl.rounds={a.rounds}", "fl.local_epochs=1",
                      "fl.partition=iid", "fl.val_fraction=0", *a.fed_args], out, "federate", cache)
    metrics, t = timed(federate, cfg)
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    split = {k: sum(float(r[k]) for r in rows) for k in ("seconds", "fit_seconds", "eval_seconds")}
    return {**round_curves(cfg, out, a), "test/acc": metrics["test/acc"], "rounds_csv": split,
            "selected_round": metrics["selected_round"], **t}


def plot(path: Path, results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    styles = {"plain": ("tab:gray", "plain PyTorch loop"), "train": ("tab:blue", "train.py"),
              "plain_fed": ("tab:brown", f"plain FedAvg loop ({a.clients} IID clients, per round)"),
              "federate": ("tab:orange", f"federate.py ({a.clients} IID clients, per round)")}
    for rep, pair in enumerate(results):
        for kind, (color, label) in styles.items():
            if kind in pair:
                curve = pair[kind]["val_acc"]
                ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, color=color,
                        ls="-" if rep == 0 else "--", label=label if rep == 0 else None, alpha=1 if rep == 0 else 0.6)
    ax.set(xlabel="epoch / round", ylabel="validation accuracy",
           title=f"{a.dataset}, {a.model}, {a.image_size} px, seed {a.seed} (dashed: repeat 2+)")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("BLOODFL_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--dataset", default="all_pbs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["plain", "train", "federate"],
                   choices=["plain", "train", "federate", "plain_fed"],
                   help="plain_fed: a plain FedAvg loop, the yardstick of federate.py")
    p.add_argument("--train-args", nargs="*", default=[], help="overrides for train.py only")
    p.add_argument("--fed-args", nargs="*", default=[], help="overrides for federate.py only")
    p.add_argument("--plain-fed-bn", choices=["recompute", "average"], default="recompute",
                   help="plain_fed's BatchNorm statistics after averaging, as federate.py's fl.bn_stats")
    p.add_argument("--plain-fed-bn-batches", type=int, default=2, help="as fl.bn_batches")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for every variant (1: on a shared 2-core machine 2 threads spin "
                        "and run resnet18 ~10x slower)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default logs/bench_vs_plain/<time>)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.data_dir = str(Path(a.data_dir).resolve())

    out = a.out or ROOT / "logs" / "bench_vs_plain" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_plain_"))
    # warm the decoded-image cache so no variant pays for decoding
    Root(compose(a, [], work / "warmup", "train", work / "cache")).datamodule().setup("fit")

    results: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        order = a.variants[rep % len(a.variants):] + a.variants[:rep % len(a.variants)]  # rotate the order
        pair: dict[str, Any] = {"order": order}
        for kind in order:
            pair[kind] = r = run_variant(kind, a, work, rep)
            print(f"repeat {rep} {kind}: wall {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, test/acc {r['test/acc']:.4f}, "
                  f"val/acc {' '.join(f'{v:.3f}' for v in r['val_acc'])} (load before {r['load_before']:.1f})"
                  + (f", tested round {r['selected_round']}" if "selected_round" in r else ""),
                  flush=True)
        for kind, base in (("train", "plain"), ("federate", "plain"), ("federate", "plain_fed")):
            if kind in pair and base in pair:
                pair[f"{kind}/{base} wall"] = pair[kind]["wall"] / pair[base]["wall"]
                pair[f"{kind}/{base} cpu"] = pair[kind]["cpu"] / pair[base]["cpu"]
        results.append(pair)

    def med(key: str, sub: str | None = None) -> float | None:
        vals = [r[key][sub] if sub else r[key] for r in results if key in r]
        return statistics.median(vals) if vals else None

    summary = {
        "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "lightning": pl.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "median": {k: med(k) for k in ("train/plain wall", "train/plain cpu", "federate/plain wall",
                                       "federate/plain cpu", "federate/plain_fed wall", "federate/plain_fed cpu")},
        "median_test_acc": {k: med(k, "test/acc") for k in a.variants},
        "median_wall": {k: med(k, "wall") for k in a.variants},
        "median_cpu": {k: med(k, "cpu") for k in a.variants},
        "repeats": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(out / "curves.png", results, a)
    print(json.dumps({k: v for k, v in summary.items() if k != "repeats"}, indent=2))
    print(f"results in {out}; work dir {work}")


if __name__ == "__main__":
    main()
