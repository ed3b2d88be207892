"""How fast is the data pipeline, and does the decoded-image cache make real data as cheap as tensors in memory?

Four ways to feed the same training split of a real data set (default: pbc at 64 px):
  random     random uint8 tensors already in memory (the floor: no data cost at all)
  in_memory  the real decoded images, already in memory (separates "real pixels" from "cache" effects)
  cached     the real path: BloodDataModule over the memory-mapped decoded-image cache
  uncached   decode every JPEG from its file in every epoch (a plain file Dataset, as without the cache)
For each it measures images/s of the pipeline alone (a pass over the train loader, including conversion to
normalized float) and of a full training epoch of a model (default resnet18), as Lightning runs it.
The variants alternate within every repeat (in an order rotated from repeat to repeat), so the ratios
compare runs made under similar machine load; the report gives medians over the repeats.
Target: cached epoch <= 1.1 x random epoch.

    python bench/bench_data_pipeline.py --data-dir ../shared/data            # the figures in docs/data.md
    python bench/bench_data_pipeline.py --repeats 1 --limit-batches 20       # a quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodfl.data.datamodule import ArrayDataModule, BloodDataModule  # noqa: E402
from bloodfl.data.decode import decode_image  # noqa: E402
from bloodfl.data.io import read_bytes  # noqa: E402
from bloodfl.models import build_classifier  # noqa: E402
from bloodfl.training.module import ClassifierModule  # noqa: E402

VARIANTS = ("random", "in_memory", "cached", "uncached")


class FileImages(Dataset):
    """Decode each image from its file on every access: the pipeline without the cache."""

    def __init__(self, refs: list[str], labels: np.ndarray, index: np.ndarray, size: int, resize: str) -> None:
        self.refs, self.labels, self.index, self.size, self.resize = refs, labels, index, size, resize

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.index[i])
        return torch.from_numpy(decode_image(read_bytes(self.refs[j]), self.size, self.resize)), int(self.labels[j])


class FileDataModule(ArrayDataModule):
    """ArrayDataModule's batches and float conversion, with images decoded from files each epoch."""

    def __init__(self, refs: list[str], size: int, resize: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refs, self.size, self.resize = refs, size, resize

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = FileImages(self.refs, self.labels, self.idx[split], self.size, self.resize)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, drop_last=train,
                          generator=self.generator if train else None)


class EpochTimer(pl.Callback):
    """Wall time and this process's CPU time (all threads) of the training epoch.

    CPU time is the steadier figure on a shared machine: other processes' load stretches wall time, not the
    work this process does (though contended caches and cores still cost a little).
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def compose_train_config(args: argparse.Namespace) -> Any:
    """conf/train.yaml as ``python train.py dataset=<dataset> dataset.image_size=<size>`` composes it."""
    from hydra import compose, initialize_config_dir

    overrides = [f"dataset={args.dataset}", f"dataset.image_size={args.image_size}"]
    if args.data_dir:
        overrides.append(f"paths.data_dir={args.data_dir}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_modules(args: argparse.Namespace, cache_dir: str) -> tuple[dict[str, ArrayDataModule], dict[str, float]]:
    """The three data modules over the same split, and the one-off costs (first load, cached start-up)."""
    cfg = compose_train_config(args)
    common = dict(batch_size=args.batch_size, seed=0)
    once: dict[str, float] = {}
    t0 = time.perf_counter()
    first = BloodDataModule(cfg.dataset, cfg.split, cache_dir=cache_dir, **common)
    first.setup("fit")  # list, hash, dedupe, split, decode everything, write the cache
    once["first_setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = BloodDataModule(cfg.dataset, cfg.split, cache_dir=cache_dir, **common)
    cached.setup("fit")  # the same, with the decoded images read from the cache
    once["cached_setup_s"] = time.perf_counter() - t0
    assert isinstance(cached.images, np.memmap), "the second set-up should memory-map the cache"
    once["n_images"] = len(cached.images)
    once["n_train"] = len(cached.idx["train"])
    rng = np.random.default_rng(0)
    idx = dict(train_idx=cached.idx["train"], val_idx=cached.idx["val"], test_idx=cached.idx["test"])
    random = ArrayDataModule(images=rng.integers(0, 256, cached.images.shape, dtype=np.uint8),
                             labels=cached.labels, classes=cached.classes, **idx, **common)
    in_memory = ArrayDataModule(images=np.array(cached.images), labels=cached.labels, classes=cached.classes,
                                **idx, **common)
    uncached = FileDataModule(cached.table.refs, args.image_size, cfg.dataset.resize, labels=cached.labels,
                              classes=cached.classes, **idx, **common)
    return {"random": random, "in_memory": in_memory, "cached": cached, "uncached": uncached}, once


def pipeline_pass(dm: ArrayDataModule, limit: int | None) -> float:
    """Images/s of one pass over the train loader, converted to normalized float (no model)."""
    n, t0 = 0, time.perf_counter()
    for b, (x, _) in enumerate(dm.train_dataloader()):
        if limit is not None and b >= limit:
            break
        dm.to_float(x, train=True)
        n += len(x)
    return n / (time.perf_counter() - t0)


def training_epoch(dm: ArrayDataModule, args: argparse.Namespace) -> tuple[float, float]:
    """Images per wall second and per CPU second of one Lightning training epoch (no validation) of a
    fresh, identically seeded model."""
    torch.manual_seed(0)
    net = build_classifier(args.model, num_classes=dm.num_classes, image_size=args.image_size)
    module = ClassifierModule(net, num_classes=dm.num_classes, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, limit_train_batches=args.limit_batches or 1.0,
                         callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    n_images = trainer.num_training_batches * args.batch_size
    return n_images / timer.seconds, n_images / timer.cpu_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder of the data sets (default: paths.data_dir)")
    p.add_argument("--dataset", default="pbc")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (default: the full epoch)")
    p.add_argument("--skip-training", action="store_true", help="measure the pipeline alone")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("bloodfl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory(prefix="bloodfl-bench-cache-") as cache_dir:
        modules, once = build_modules(args, cache_dir)
        runs: dict[str, dict[str, list[float]]] = {v: {"pipeline": [], "epoch": [], "epoch_cpu": []}
                                                     for v in VARIANTS}
        if not args.skip_training:  # untimed: the first fit of a process pays one-off kernel/allocator set-up
            training_epoch(modules["random"], argparse.Namespace(**{**vars(args), "limit_batches": 3}))
        once["loadavg_1min_start"] = os.getloadavg()[0]
        for r in range(args.repeats):
            # alternate, so every repeat compares the variants under similar load; rotate, so none always
            # runs right after another
            for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                runs[v]["pipeline"].append(pipeline_pass(modules[v], args.limit_batches))
                line = f"repeat {r + 1}/{args.repeats} {v:8s} pipeline {runs[v]['pipeline'][-1]:8.0f} img/s"
                if not args.skip_training:
                    wall, cpu = training_epoch(modules[v], args)
                    runs[v]["epoch"].append(wall)
                    runs[v]["epoch_cpu"].append(cpu)
                    line += f"   epoch {wall:6.1f} img/s ({cpu:6.1f} per CPU s)   load {os.getloadavg()[0]:.1f}"
                print(line, flush=True)
        once["loadavg_1min_end"] = os.getloadavg()[0]

    report = summarize(runs, once, args)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


def summarize(runs: dict[str, dict[str, list[float]]], once: dict[str, float], args: argparse.Namespace) -> dict:
    med = {v: {k: statistics.median(x) if x else None for k, x in runs[v].items()} for v in VARIANTS}
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "setup": {k: round(v, 2) for k, v in once.items()},
        "median_images_per_s": {v: {k: round(x, 1) if x else None for k, x in m.items()} for v, m in med.items()},
        "torch_threads": torch.get_num_threads(),
    }
    for kind in ("epoch", "epoch_cpu"):
        if not runs["random"][kind]:
            continue
        # time ratio = inverse throughput ratio, per repeat (similar load), then the median
        ratios = {v: [rnd / x for rnd, x in zip(runs["random"][kind], runs[v][kind])] for v in VARIANTS[1:]}
        report[f"{kind}_time_vs_random_median"] = {v: round(statistics.median(x), 3) for v, x in ratios.items()}
        report[f"{kind}_time_vs_random_runs"] = {v: [round(r, 3) for r in x] for v, x in ratios.items()}
    if runs["random"]["epoch"]:
        # load-robust estimate from the same figures: extra data time per image (pipeline alone, vs random)
        # relative to the random epoch's time per image. Pipeline passes are short, so the median is steady.
        pipe, epoch = med, med["random"]["epoch"]
        report["estimated_epoch_time_vs_random"] = {
            v: round(1 + (1 / pipe[v]["pipeline"] - 1 / pipe["random"]["pipeline"]) * epoch, 3) for v in VARIANTS[1:]}
        report["target_cached_le_1.1x_random"] = report["epoch_time_vs_random_median"]["cached"] <= 1.1
    return report


if __name__ == "__main__":
    main()
