"""What does DP-SGD cost, and what does bloodfl's integration cost on top of Opacus? Training throughput
(images/s) at 64 px, batch 64, for resnet18 and mobilenetv2 (the papers' head), measured in one process:

* ``bloodfl``       — bloodfl's real training path: ClassifierModule in a Lightning Trainer over an
                      ArrayDataModule of uint8 images (batch gather, float conversion, normalisation), with
                      ``ClassifierModule(privacy=...)`` (dp=true: ghost clipping with bloodfl's convolution
                      norms and an input-only first backward) or without (dp=false);
* ``opacus-ghost`` / ``opacus-hooks`` — a plain loop: the same DP-compatible network (bloodfl.privacy.compat),
                      stock ``PrivacyEngine.make_private`` in that grad_sample_mode, Poisson DPDataLoader over float
                      tensors, Adam, nothing else; ``torch`` — the same plain loop without DP;
* ``opacus-ghost+norms`` — the plain ghost loop with bloodfl's convolution norm rules (Opacus' own two full
                      backward passes): what Lightning, the data pipeline and the first-pass change add or save.

Target (issue 5): bloodfl DP >= 0.87 x the plain Opacus loop's best stock mode. Variants alternate within every
repeat and the best repeat counts, so a busy machine (other jobs) penalises them alike.

    python bench/bench_dp.py                       # the figures in docs/privacy.md
    python bench/bench_dp.py --steps 4 --repeats 1 --models resnet18
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloodfl.data.datamodule import NORMALIZATION, ArrayDataModule  # noqa: E402
from bloodfl.fl.client import quiet_lightning  # noqa: E402
from bloodfl.models.registry import build_classifier  # noqa: E402
from bloodfl.privacy.compat import make_dp_compatible  # noqa: E402
from bloodfl.privacy.engine import ClientPrivacy, DPSettings, prepare_model  # noqa: E402
from bloodfl.privacy.norms import ghost_norm_samplers  # noqa: E402
from bloodfl.training.module import ClassifierModule  # noqa: E402

warnings.filterwarnings("ignore")
CLASSES = 8
LR = 1e-3


class Throughput(pl.Callback):
    """Images per second over the batches after the first ``warmup`` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.t0, self.t1 = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.t1 = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.images / (self.t1 - self.t0)


def bloodfl_run(name: str, size: int, batch: int, steps: int, dp: bool) -> Callable[[], float]:
    """One Lightning epoch of ``steps + 1`` batches through bloodfl's modules; returns images/s."""
    rng = np.random.default_rng(0)
    n = (steps + 1) * batch
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n)
    dm = ArrayDataModule(images, labels, train_idx=np.arange(n), batch_size=batch, classes=list("abcdefgh"))
    net = build_classifier(name, CLASSES, size)
    privacy = None
    if dp:
        net, _, mode = prepare_model(net, (3, size, size), "auto")
        privacy = ClientPrivacy(DPSettings(noise_multiplier=1.0), n, len(dm.train_dataloader()), 10_000, mode)
        dm.use_poisson_sampling(privacy.sample_rate, privacy.steps_per_epoch, privacy.sampling_generator())
    module = ClassifierModule(net, CLASSES, optimizer=functools.partial(torch.optim.Adam, lr=LR), privacy=privacy)

    def measure() -> float:
        meter = Throughput(warmup=1)
        callbacks: list[pl.Callback] = [meter]
        with quiet_lightning():
            trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
            trainer.fit(module, datamodule=dm)
        return meter.rate

    return measure


def plain_run(name: str, size: int, batch: int, steps: int, mode: str | None,
              bloodfl_norms: bool = False) -> Callable[[], float]:
    """A hand-written (Opacus) loop over float tensors; returns images/s after one warm-up step."""
    torch.manual_seed(0)
    net, _ = make_dp_compatible(build_classifier(name, CLASSES, size))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["imagenet"])
    x = (torch.rand((steps + 1) * batch, 3, size, size) - mean) / std
    y = torch.randint(0, CLASSES, (len(x),))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    opt: Any = torch.optim.Adam(net.parameters(), lr=LR)
    criterion: Any = nn.CrossEntropyLoss()
    if mode is not None:
        out = PrivacyEngine(accountant="rdp").make_private(
            module=net, optimizer=opt, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
            max_grad_norm=1.0, grad_sample_mode=mode)
        net, opt, criterion, loader = out if mode == "ghost" else (out[0], out[1], criterion, out[2])
        if bloodfl_norms:
            net.NORM_SAMPLERS = ghost_norm_samplers()

    def measure() -> float:
        images, t0 = 0, 0.0
        for i, (xb, yb) in enumerate(loader):
            if i == 1:
                t0 = time.perf_counter()
            opt.zero_grad()
            criterion(net(xb), yb).backward()
            opt.step()
            images += len(yb) if i >= 1 else 0
        return images / (time.perf_counter() - t0)

    return measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed DP steps per measurement (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-hooks", action="store_true", help="skip the slow opacus-hooks variant")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.image_size} px, batch {a.batch_size}, "
          f"{a.steps} timed steps, best of {a.repeats}", flush=True)
    for name in a.models:
        s, b, k = a.image_size, a.batch_size, a.steps
        variants: dict[str, Callable[[], float]] = {
            "bloodfl dp": bloodfl_run(name, s, b, k, dp=True),
            "opacus-ghost": plain_run(name, s, b, k, "ghost"),
            "opacus-ghost+norms": plain_run(name, s, b, k, "ghost", bloodfl_norms=True),
            "bloodfl no-dp": bloodfl_run(name, s, b, k, dp=False),
            "torch no-dp": plain_run(name, s, b, k, None),
        }
        if not a.no_hooks:
            variants["opacus-hooks"] = plain_run(name, s, b, k, "hooks")
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(a.repeats):
            for v, measure in variants.items():
                rates[v].append(measure())
                print(f"  {name} repeat {rep + 1}: {v:20s} {rates[v][-1]:7.1f} img/s", flush=True)
        best = {v: max(r) for v, r in rates.items()}
        print(f"\n{name} @ {s} px (images/s, best / median of {a.repeats}):")
        for v in variants:
            print(f"  {v:20s} {best[v]:7.1f} / {statistics.median(rates[v]):7.1f}")
        stock = max(best[v] for v in ("opacus-ghost", "opacus-hooks") if v in best)
        print(f"  bloodfl dp / best stock Opacus loop  = {best['bloodfl dp'] / stock:.2f}  (target >= 0.87)")
        print(f"  bloodfl dp / opacus-ghost+norms loop = {best['bloodfl dp'] / best['opacus-ghost+norms']:.2f}")
        print(f"  bloodfl no-dp / plain torch loop     = {best['bloodfl no-dp'] / best['torch no-dp']:.2f}")
        print(f"  DP slowdown (bloodfl no-dp / dp)     = {best['bloodfl no-dp'] / best['bloodfl dp']:.1f}x\n",
              flush=True)


if __name__ == "__main__":
    main()
