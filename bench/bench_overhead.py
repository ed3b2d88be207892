"""What costs time outside the training step? ``train.py`` (centralized) and ``federate.py`` (per round), timed.

Centralized (``--mode train``): ``train(cfg)`` with a callback that times every phase of the run from the
outside — sanity check, training epochs (split into the training steps themselves and the rest), validation
passes, checkpoint saves (``ModelCheckpoint`` and Lightning's ``save_checkpoint``), the post-fit validate and
test on the selected checkpoint — for each ``--variant`` (a name and overrides), alternating in every repeat.
``start-up`` is ``python -c 'import bloodfl.training.run'`` plus config composition, measured in a subprocess.

Per step (``--mode steps``): seconds per training step of the same network on the same batches, plain, with
bloodfl's per-step additions but no Lightning, and inside Lightning's loop (``run_steps``).

Evaluation layout (``--mode eval``): the server's test-split evaluation of a global model (``--fl-dataset``,
``--fl-model``) with the network in NCHW and in channels-last layout (what ``GlobalEvaluator`` uses), alternating.

Federated (``--mode fl``): ``federate(cfg)`` for each client count in ``--clients`` (synthetic data, simple_cnn by
default), with rounds.csv's ``seconds``/``fit_seconds``/``bn_seconds``/``eval_seconds`` and timers around each
client's local ``trainer.fit`` (the rest of a client's fit is building its trainer, copying state dicts in and out),
the aggregation, the BatchNorm statistics pass of ``fl.bn_stats=recompute`` (reported apart: it is client
computation the algorithm needs, not bookkeeping) and the round checkpoint (the learning-curve figure is drawn
once, at the end of the run).

    python bench/bench_overhead.py --mode train --data-dir ../shared/data --epochs 3 --repeats 2   # docs/parity.md
    python bench/bench_overhead.py --mode fl --clients 5 20 100 --rounds 3                        # docs/parity.md
    python bench/bench_overhead.py --mode steps --data-dir ../shared/data --steps 20 --repeats 3  # docs/parity.md
    python bench/bench_overhead.py --mode eval --fl-dataset all_pbs --repeats 5                   # docs/parity.md

Results go to ``--out`` (default logs/bench_overhead/<time>/overhead.json, never committed). Other processes
on the machine distort the times; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import compose_cfg  # noqa: E402

BEFORE = ["callbacks.model_checkpoint.save_weights_only=false", "trainer.num_sanity_val_steps=2"]
VARIANTS = {"before": BEFORE, "after": []}


class PhaseTimer(pl.Callback):
    """Wall seconds of each phase of a Lightning run, accumulated by name."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self.steps = 0

    def _begin(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.t[name] += time.perf_counter() - self._start.pop(name)

    def on_sanity_check_start(self, trainer, pl_module):  # noqa: ANN001, D102
        self._begin("sanity_check")

    def on_sanity_check_end(self, trainer, pl_module):  # noqa: ANN001, D102
        self._end("sanity_check")

    def on_train_epoch_start(self, trainer, pl_module):  # noqa: ANN001, D102
        self._begin("train_epoch")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, D102
        self._begin("train_steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, D102
        self._end("train_steps")
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: ANN001, D102
        self._end("train_epoch")

    def on_validation_start(self, trainer, pl_module):  # noqa: ANN001, D102
        if not trainer.sanity_checking:
            self._begin(f"validation ({trainer.state.fn.value})")

    def on_validation_end(self, trainer, pl_module):  # noqa: ANN001, D102
        if not trainer.sanity_checking:
            self._end(f"validation ({trainer.state.fn.value})")

    def on_test_start(self, trainer, pl_module):  # noqa: ANN001, D102
        self._begin("test")

    def on_test_end(self, trainer, pl_module):  # noqa: ANN001, D102
        self._end("test")


def timed_attribute(obj: Any, name: str, key: str, timings: dict[str, float]) -> tuple[Any, str, Any]:
    """Replace ``obj.name`` by a wrapper adding its wall time (and call count) to ``timings[key]``; returns what
    restores it. Measurement only: the benches put the original back when they are done."""
    orig = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            timings[key] += time.perf_counter() - t0
            timings[key + " (count)"] += 1
    setattr(obj, name, timed)
    return obj, name, orig


def time_checkpoint_saves(timings: dict[str, float]) -> Any:
    """Wrap ModelCheckpoint._save_checkpoint (top-k and last saves) and checkpoint loading for validate/test."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import Strategy

    def wrap(obj: Any, name: str, key: str) -> tuple[Any, str, Any]:
        return timed_attribute(obj, name, key, timings)

    return [wrap(ModelCheckpoint, "_save_checkpoint", "checkpoint saves"),
            wrap(Strategy, "load_checkpoint", "checkpoint loads (validate/test)")]


def run_train(a: argparse.Namespace, extra: list[str], out: Path) -> dict[str, Any]:
    from omegaconf import open_dict

    from bloodfl.compose import Root
    from bloodfl.training.run import train

    cfg = compose_cfg([f"dataset={a.dataset}", f"dataset.image_size={a.image_size}", f"model={a.model}",
                       f"paths.data_dir={a.data_dir}", f"trainer.max_epochs={a.epochs}", "logger=csv",
                       "callbacks.progress_bar=null", *a.extra, *extra], out)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(a.cache)
    timer = PhaseTimer()
    saves: dict[str, float] = defaultdict(float)
    patches = time_checkpoint_saves(saves)
    orig_callbacks = Root.callbacks
    Root.callbacks = lambda self: [*orig_callbacks(self), timer]  # type: ignore[method-assign]
    load = os.getloadavg()[0]
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        metrics = train(cfg)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        Root.callbacks = orig_callbacks  # type: ignore[method-assign]
        for cls, name, orig in patches:
            setattr(cls, name, orig)
    t = dict(timer.t)
    # Lightning validates before on_train_epoch_end (inside train_epoch); ModelCheckpoint, always the last
    # callback, saves in its own on_train_epoch_end, after this timer's
    in_epoch_rest = t.get("train_epoch", 0.0) - t.get("train_steps", 0.0) - t.get("validation (fit)", 0.0)
    phases = {"train steps": t.get("train_steps", 0.0), "rest of training epochs": in_epoch_rest,
              "validation (fit)": t.get("validation (fit)", 0.0), "sanity check": t.get("sanity_check", 0.0),
              "post-fit validate": t.get("validation (validate)", 0.0), "test": t.get("test", 0.0), **saves}
    accounted = sum(v for k, v in phases.items() if "(count)" not in k)
    phases["rest (data, set-up, metrics.json, report)"] = wall - accounted
    ckpt_mb = {p.name: round(p.stat().st_size / 1e6, 1) for p in (out / "checkpoints").iterdir() if p.is_file()}
    return {"wall": wall, "cpu": cpu, "load_before": load, "phases": phases, "checkpoints_MB": ckpt_mb,
            "test/acc": metrics.get("test/acc")}


def run_steps(a: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training step of the same network on the same batches, four ways, alternating: a plain step
    on float tensors normalised once (contiguous NCHW); the same on batches converted per step by
    ``ArrayDataModule.to_float`` (channels_last strides); that plus the train/ loss and torchmetrics updates of
    bloodfl's module, without Lightning; and Lightning's loop (``Trainer.fit`` of bloodfl's module, training
    steps only, timed by ``PhaseTimer``)."""
    from omegaconf import open_dict

    from bloodfl.compose import Root
    from bloodfl.models import build_classifier

    cfg = compose_cfg([f"dataset={a.dataset}", f"dataset.image_size={a.image_size}", f"model={a.model}",
                       f"paths.data_dir={a.data_dir}", "logger=none", "callbacks=none"], a.cache.parent / "steps")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(a.cache)
    root = Root(cfg)
    dm = root.datamodule()
    dm.setup("fit")
    n, bs = a.steps, 32
    idx = torch.as_tensor(dm.idx["train"][: n * bs], dtype=torch.long)
    raw, y = torch.from_numpy(dm.images)[idx], torch.as_tensor(dm.labels, dtype=torch.long)[idx]
    mean, std = dm.register_mean_std
    xf = ((raw.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()
    out: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.repeats):
        torch.manual_seed(0)
        net = build_classifier(a.model, dm.num_classes, a.image_size)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for i in range(n):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xf[i * bs:(i + 1) * bs]), y[i * bs:(i + 1) * bs]).backward()
            opt.step()
        out["plain step"].append((time.perf_counter() - t0) / n)

        # the same plain step on the batches as ArrayDataModule.to_float lays them out: permute(0, 3, 1, 2) of
        # NHWC keeps channels_last strides, which then run through the whole network
        torch.manual_seed(0)
        net = build_classifier(a.model, dm.num_classes, a.image_size)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for i in range(n):
            xb = dm.to_float(raw[i * bs:(i + 1) * bs], True)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), y[i * bs:(i + 1) * bs]).backward()
            opt.step()
        out["plain step, to_float's layout (channels_last)"].append((time.perf_counter() - t0) / n)

        torch.manual_seed(0)
        module = root.module(build_classifier(a.model, dm.num_classes, a.image_size), dm.num_classes)
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for i in range(n):
            xb, yb = dm.to_float(raw[i * bs:(i + 1) * bs], True), y[i * bs:(i + 1) * bs]
            opt.zero_grad(set_to_none=True)
            logits = module(xb)
            loss = module.criterion(logits, yb)
            module.train_loss(loss.detach(), weight=len(yb))
            module.train_metrics.update(logits.detach(), yb)
            loss.backward()
            opt.step()
        out["+ conversion and torchmetrics, no Lightning"].append((time.perf_counter() - t0) / n)

        torch.manual_seed(0)
        module = root.module(build_classifier(a.model, dm.num_classes, a.image_size), dm.num_classes)
        timer = PhaseTimer()
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=n, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[timer])
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        out["Lightning fit, whole"].append((time.perf_counter() - t0) / n)
        out["Lightning training step"].append(timer.t["train_steps"] / timer.steps)
        print({k: round(v[-1], 4) for k, v in out.items()}, flush=True)
    return {k: statistics.median(v) for k, v in out.items()} | {"runs": dict(out), "steps": n}


def startup_seconds() -> float:
    code = ("import time; t=time.perf_counter(); import bloodfl.training.run, bloodfl.fl.run; "
            "from tests.conftest import compose_cfg; compose_cfg(['dataset=all_pbs']); print(time.perf_counter()-t)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def run_eval_layouts(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The server's evaluation of a global model on the test split (what ``GlobalEvaluator`` runs after a round),
    with the network in NCHW and in channels-last memory layout, alternating; seconds per evaluation."""
    from omegaconf import open_dict

    from bloodfl.compose import Root
    from bloodfl.fl.client import quiet_lightning

    cfg = compose_cfg([f"dataset={a.fl_dataset}", f"model={a.fl_model}", f"paths.data_dir={a.data_dir}",
                       "logger=none", *a.fl_extra], out, "federate")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(a.cache)
    root = Root(cfg)
    dm = root.datamodule()
    dm.setup("fit")
    held = root.held_out_datamodule(dm)
    module = root.module(root.network(dm.num_classes), dm.num_classes, dm.class_counts("train"))
    make_trainer = root.trainer_factory()
    layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    seconds: dict[str, list[float]] = {k: [] for k in layouts}
    probs: dict[str, torch.Tensor] = {}
    for rep in range(a.repeats + 1):  # the first pass of each warms up
        for name in (layouts if rep % 2 == 0 else list(layouts)[::-1]):
            module.net.to(memory_format=layouts[name])
            t0 = time.perf_counter()
            with quiet_lightning():
                make_trainer(enable_progress_bar=False).test(module, datamodule=held, verbose=False)
            if rep:
                seconds[name].append(time.perf_counter() - t0)
            probs[name] = module.test_probs
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"dataset": a.fl_dataset, "model": a.fl_model, "test_images": len(held.idx["test"]), "seconds": seconds,
            "median_s": med, "nchw/channels_last": med["nchw"] / med["channels_last"],
            "max_prob_difference": float((probs["nchw"] - probs["channels_last"]).abs().max())}


def run_fl(a: argparse.Namespace, clients: int, out: Path) -> dict[str, Any]:
    import bloodfl.fl.loop as loop
    from bloodfl.fl.client import FLClient
    from bloodfl.fl.run import federate

    timings: dict[str, float] = defaultdict(float)

    def wrap(obj: Any, name: str, key: str) -> tuple[Any, str, Any]:
        return timed_attribute(obj, name, key, timings)

    patches = [wrap(pl.Trainer, "fit", "local trainer.fit"), wrap(FLClient, "fit", "client fit (all)"),
               wrap(loop, "save_checkpoint", "round checkpoint"),
               wrap(loop, "write_rounds_csv", "rounds.csv")]
    cfg = compose_cfg([f"dataset={a.fl_dataset}", f"model={a.fl_model}", f"fl.num_clients={clients}",
                       f"fl.rounds={a.rounds}", "fl.local_epochs=1", "fl.partition=iid", "logger=csv",
                       *a.fl_extra], out, "federate")
    load = os.getloadavg()[0]
    try:
        w0 = time.perf_counter()
        federate(cfg)
        wall = time.perf_counter() - w0
    finally:
        for obj, name, orig in patches:
            setattr(obj, name, orig)
    import csv

    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    sec = sum(float(r["seconds"]) for r in rows)
    fit = sum(float(r["fit_seconds"]) for r in rows)
    ev = sum(float(r["eval_seconds"]) for r in rows)
    bn = sum(float(r.get("bn_seconds") or 0) for r in rows)
    after = timings["round checkpoint"] + timings["rounds.csv"]
    local = timings["local trainer.fit"]
    round_total = sec + after
    return {"clients": clients, "rounds": len(rows), "wall": wall, "load_before": load,
            "per_round": {"round (rounds.csv seconds + checkpoint, csv)": round_total / len(rows),
                          "local trainer.fit": local / len(rows),
                          "client overhead (fit_seconds - trainer.fit)": (fit - local) / len(rows),
                          "aggregation (seconds - fit - bn - eval)": (sec - fit - bn - ev) / len(rows),
                          "BatchNorm statistics pass, fl.bn_stats=recompute (bn_seconds)": bn / len(rows),
                          "global evaluation (eval_seconds)": ev / len(rows),
                          "checkpoint + rounds.csv": after / len(rows)},
            "overhead_share": 1 - local / round_total,
            # the BatchNorm pass is client computation that the federated algorithm needs (fl.bn_stats), not
            # bookkeeping: the share without it is the bookkeeping's
            "overhead_share_without_bn_pass": 1 - (local + bn) / round_total,
            "checkpoint_MB": round((out / "checkpoints" / "round_001.pt").stat().st_size / 1e6, 2)
            if (out / "checkpoints" / "round_001.pt").exists() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["train", "fl", "steps", "eval"], default="train")
    p.add_argument("--steps", type=int, default=20, help="--mode steps: training steps per way and repeat")
    p.add_argument("--data-dir", default=os.environ.get("BLOODFL_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--dataset", default="all_pbs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every centralized run")
    p.add_argument("--clients", type=int, nargs="+", default=[5, 20, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fl-dataset", default="synthetic")
    p.add_argument("--fl-model", default="simple_cnn")
    p.add_argument("--fl-extra", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no OpenMP spinning)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.data_dir = str(Path(a.data_dir).resolve())
    out = a.out or ROOT / "logs" / "bench_overhead" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    a.cache = work / "cache"
    summary: dict[str, Any] = {"command": " ".join(sys.argv), "threads": a.threads}
    if a.mode == "train":
        run_train(a, ["trainer.fast_dev_run=true"], work / "warmup")  # warm the decoded-image cache
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
        for rep in range(a.repeats):
            order = a.variants if rep % 2 == 0 else a.variants[::-1]
            for v in order:
                r = run_train(a, VARIANTS[v], work / f"{v}_{rep}")
                runs[v].append(r)
                print(f"repeat {rep} {v}: wall {r['wall']:.1f} s " + json.dumps(
                    {k: round(x, 2) for k, x in r["phases"].items()}) + f" {r['checkpoints_MB']}", flush=True)
        summary["startup_s"] = startup_seconds()
        summary["runs"] = runs
        summary["median_phases"] = {v: {k: statistics.median(r["phases"].get(k, 0.0) for r in rs)
                                         for k in rs[0]["phases"]} for v, rs in runs.items()}
        summary["median_wall"] = {v: statistics.median(r["wall"] for r in rs) for v, rs in runs.items()}
    elif a.mode == "steps":
        summary["steps"] = run_steps(a)
    elif a.mode == "eval":
        summary["eval"] = run_eval_layouts(a, work / "eval")
    else:
        summary["fl"] = []
        for n in a.clients:
            r = run_fl(a, n, work / f"fl_{n}")
            summary["fl"].append(r)
            print(json.dumps(r), flush=True)
    (out / "overhead.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    print(f"results in {out / 'overhead.json'}")


if __name__ == "__main__":
    main()
