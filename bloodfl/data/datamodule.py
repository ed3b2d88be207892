"""LightningDataModules over decoded images held as one uint8 array (in memory or memory-mapped).

Decoding happens once (and is cached on disk for real data sets); batches are gathered by index, and
conversion to float, augmentation (training only) and normalization run per batch after transfer, so an
epoch reads no image files and costs little more than a pass over tensors already in memory.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bloodfl.data.copies import check_kinds, copy_images, leaked_test_rows, option_text, original_ref, with_copies
from bloodfl.data.splits import SPLITS, SplitSpec, assert_disjoint, assign_splits
from bloodfl.data.table import SampleTable
from bloodfl.errors import BloodflError

log = logging.getLogger(__name__)

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "minmax": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # scale to [0, 1] only
}
# dataset.normalize is one of NORMALIZATION's names, {mean: [r, g, b], std: [r, g, b]} (constants, for the
# public data sets measured on their training split), or "train": the per-channel mean/std of this run's
# training split (never of validation or test images). Blood smears are light (all_pbs: mean 0.82/0.85/0.94,
# std 0.14/0.15/0.06): under ImageNet's constants every channel keeps an offset of 1.5-2.4 with a spread of
# 0.25-0.65, which the first convolution turns into a large, fast-moving output mean that BatchNorm's running
# mean cannot follow, and validation accuracy swings from epoch to epoch (issue #8).
TRAIN_STATISTICS = "train"


def channel_stats(images: np.ndarray, index: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of rows ``index`` of a uint8 (N, H, W, 3) array, chunk by chunk."""
    index = np.sort(np.asarray(index, dtype=np.int64))
    if len(index) == 0:
        raise BloodflError("normalize=train needs a non-empty training split")
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(index), chunk):
        b = images[index[i:i + chunk]].reshape(-1, 3).astype(np.float64) / 255.0
        s1, s2, n = s1 + b.sum(0), s2 + (b * b).sum(0), n + len(b)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()  # a constant channel must not divide by 0


def resolve_normalization(normalize: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) of a dataset.normalize setting; None for "train" (known once the training split is)."""
    if isinstance(normalize, str):
        if normalize == TRAIN_STATISTICS:
            return None
        if normalize in NORMALIZATION:
            mean, std = NORMALIZATION[normalize]
            return list(mean), list(std)
    elif hasattr(normalize, "keys") and set(normalize.keys()) == {"mean", "std"}:
        mean, std = [float(v) for v in normalize["mean"]], [float(v) for v in normalize["std"]]
        if len(mean) == 3 and len(std) == 3 and min(std) > 0:
            return mean, std
    raise BloodflError(f"unknown normalization {normalize!r}; valid: {', '.join(NORMALIZATION)}, "
                       f"{TRAIN_STATISTICS}, or {{mean: [r, g, b], std: [r, g, b]}} with std > 0")


class IndexedImages(Dataset):
    """Rows ``index`` of an (N, H, W, 3) uint8 array; ``__getitems__`` gathers a whole batch at once."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.index[i]
        # a copy: the cache is a read-only memory map, which torch would share and warn about
        return torch.from_numpy(np.array(self.images[j])), self.labels[j]

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # int64 even when empty: a Poisson (DP) batch can draw nobody -> (0, H, W, 3) uint8 and 0 labels
        rows = self.index[np.asarray(items, dtype=np.int64)]
        order = np.argsort(rows)  # sorted reads are sequential on a memory-mapped cache
        batch = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        return torch.from_numpy(batch), self.labels[torch.from_numpy(rows)]


def _as_batch(batch: Any) -> Any:
    return batch  # IndexedImages.__getitems__ already returns a collated batch


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test loaders over index sets of one image array. Used as is by federated clients."""

    def __init__(
        self,
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        train_idx: np.ndarray | None = None,
        val_idx: np.ndarray | None = None,
        test_idx: np.ndarray | None = None,
        batch_size: int = 32,
        augment: nn.Module | None = None,
        normalize: Any = "imagenet",
        seed: int = 0,
        num_workers: int = 0,
        classes: list[str] | None = None,
        augmult: int = 0,
    ) -> None:
        super().__init__()
        mean_std = resolve_normalization(normalize)
        self.images, self.labels = images, labels
        self.idx = {"train": train_idx, "val": val_idx, "test": test_idx}
        self.predict_split = "test"
        self.batch_size = batch_size
        self.augment = augment
        self.augmult = augmult  # K > 1: K augmented views of each training image, (B, K, C, H, W) (dp.augmult)
        self.poisson: tuple[float, int, torch.Generator | None] | None = None  # see use_poisson_sampling
        self.register_mean_std: tuple[torch.Tensor, torch.Tensor] | None = None
        if mean_std is not None:
            self._set_mean_std(*mean_std)
        elif images is not None and train_idx is not None:
            self.normalize_from_training_split()
        self.num_workers = num_workers
        self.classes = classes
        self.generator = torch.Generator().manual_seed(seed)

    def use_poisson_sampling(self, sample_rate: float, steps: int, generator: torch.Generator | None) -> None:
        """DP-SGD's sampling for the training loader: each image joins each batch independently with probability
        ``sample_rate``, ``steps`` batches per epoch, drawn from ``generator`` — the client's own secret one, so
        nobody else can predict the batches. Validation and test loaders are unchanged."""
        self.poisson = (sample_rate, steps, generator)

    def _set_mean_std(self, mean: list[float], std: list[float]) -> None:
        self.register_mean_std = (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                                  torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize_from_training_split(self) -> None:
        """normalize=train: the per-channel mean/std of the training split's images."""
        assert self.images is not None and self.idx["train"] is not None
        self._set_mean_std(*channel_stats(self.images, self.idx["train"]))

    @property
    def normalization(self) -> dict[str, list[float]]:
        """The mean/std in use, as a dataset.normalize value (e.g. for federated clients' data modules)."""
        if self.register_mean_std is None:
            raise BloodflError("normalize=train: the statistics are known only after setup()")
        mean, std = self.register_mean_std
        return {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}

    def reseed(self, seed: int) -> None:
        """Restart the shuffling order from ``seed`` (federated rounds reseed for exact resume)."""
        self.generator.manual_seed(seed)

    @property
    def num_classes(self) -> int:
        assert self.classes is not None
        return len(self.classes)

    def class_counts(self, split: str = "train") -> np.ndarray:
        assert self.labels is not None and self.idx[split] is not None
        return np.bincount(self.labels[self.idx[split]], minlength=self.num_classes)

    def _loader(self, split: str, train: bool) -> DataLoader:
        index = self.idx[split]
        if index is None or len(index) == 0:
            raise BloodflError(f"the {split} split is empty; check the split settings")
        ds = IndexedImages(self.images, self.labels, index)
        if train and self.poisson is not None:
            from bloodfl.privacy.sampling import PoissonLoader

            sample_rate, steps, generator = self.poisson
            return PoissonLoader(ds, sample_rate=sample_rate, steps=steps, generator=generator, collate_fn=_as_batch,
                                 num_workers=self.num_workers, public_generator=self.generator)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train,
            # a last batch of one image breaks BatchNorm in training
            drop_last=train and len(ds) > self.batch_size,
            generator=self.generator if train else None,
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """``predict_split`` in order, never augmented (evaluation.on_training_images predicts "train")."""
        return self._loader(self.predict_split, False)

    def to_float(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 NHWC batch -> normalized float NCHW; augmentation only when ``train``. With ``augmult`` K > 1 a
        training batch becomes (B, K, C, H, W): K independently augmented views of each image."""
        # contiguous NCHW: a permuted view keeps channels-last strides, which made the CPU step ~10-25% slower
        # (bench/bench_overhead.py --mode steps, docs/parity.md)
        x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        views = self.augmult if train and self.augmult > 1 else 0
        if views:
            x = x.repeat_interleave(views, 0)  # image i's views are rows i*K .. i*K+K-1
        if train and self.augment is not None:
            x = self.augment(x)
        if self.register_mean_std is None:
            raise BloodflError("normalize=train: the statistics are known only after setup()")
        mean, std = self.register_mean_std
        x = (x - mean.to(x.device)) / std.to(x.device)
        return x.view(-1, views, *x.shape[1:]) if views else x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if x.dtype != torch.uint8:  # already converted (e.g. by a wrapper)
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.to_float(x, training), y


class BloodDataModule(ArrayDataModule):
    """A configured data set: source -> checks -> de-duplication -> split -> decoded (cached) images."""

    def __init__(
        self,
        dataset: DictConfig,
        split: DictConfig,
        augment: nn.Module | None = None,
        batch_size: int = 32,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        augmult: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, augment=augment, normalize=dataset.get("normalize", "imagenet"),
                         seed=seed, num_workers=num_workers, augmult=augmult)
        self.dataset_cfg = dataset
        self.split_spec = SplitSpec(**{k: v for k, v in split.items() if k in SplitSpec.__dataclass_fields__})
        if self.split_spec.seed is None:
            self.split_spec.seed = seed
        self.cache_dir = cache_dir
        self.table: SampleTable | None = None
        self.split: np.ndarray | None = None
        self.report: list[str] = []
        self.split_groups: list[str] | None = None  # the group of each image the split kept whole, if any
        self.leakage: dict[str, Any] = {}  # what dataset.copies_before_split leaked (empty without it)

    def setup(self, stage: str | None = None) -> None:
        if self.table is None:
            self.load()

    def _content_keys(self, table: SampleTable) -> list[str]:
        from bloodfl.data.checks import content_hashes

        return content_hashes(table, cache_dir=self.cache_dir)

    def load(self) -> None:
        cfg = self.dataset_cfg
        from bloodfl.data.sources import build_table

        table = build_table(cfg)
        if len(table) == 0:
            raise BloodflError(f"data set {cfg.name!r} has no images")
        self._verify(table)
        hashes = self._content_keys(table)
        policy = cfg.get("duplicates", "drop")
        if policy != "keep":
            from bloodfl.data.checks import dedupe

            before = len(table)
            by_ref = dict(zip(table.refs, hashes))
            table = dedupe(table, hashes, policy=policy)
            hashes = [by_ref[r] for r in table.refs]
            if len(table) != before:
                table.problems.append(f"duplicates ({policy}): {before - len(table)} images removed")
        originals, kinds = table, self.copy_kinds
        if kinds:  # papers/001's flaw, on purpose: copies join the table before the split (bloodfl/data/copies.py)
            self._refuse_kept_copies(kinds)
            table, source = with_copies(originals, kinds)
            # a copy's pixels are not its file's bytes: its content key is the file's hash and the flip
            hashes = [hashes[i] + ref[len(originals.refs[i]):] for i, ref in zip(source, table.refs)]
        groups = self._split_groups(table)
        split = assign_splits(table.labels, self.split_spec, groups=groups,
                              published=table.published_split, classes=table.classes)
        if policy != "keep":
            assert_disjoint(split, hashes, "an identical image (content hash)")
        if groups is not None:
            assert_disjoint(split, groups, "group")
        if kinds:  # the check runs and reports the leak the option creates; the option is its acknowledgement
            table.problems[:0] = assert_disjoint(split, [original_ref(r) for r in table.refs],
                                              "images (with their flipped copies)", acknowledged_by=option_text(kinds))
        images = table.images
        if images is None:
            from bloodfl.data.decode import load_images

            images, unreadable = load_images(originals, int(cfg.image_size), resize=cfg.get("resize", "stretch"),
                                             cache_dir=self.cache_dir)
            if kinds:
                images = copy_images(images, kinds)
            if unreadable:
                table.problems += [f"unreadable, left out: {r}" for r in unreadable]
                bad = set(unreadable)
                keep_rows = np.array([original_ref(r) not in bad for r in table.refs])  # a copy goes with its file
                table, images, split = table.subset(np.flatnonzero(keep_rows)), images[keep_rows], split[keep_rows]
        elif images.shape[1] != int(cfg.image_size):
            raise BloodflError(f"source rendered {images.shape[1]} px images, expected dataset.image_size")
        groups = self._split_groups(table)  # of the images kept (unreadable ones were left out above)
        if kinds:
            self.leakage = self._copy_leakage(table, split, kinds)
        self.table, self.split, self.images, self.labels = table, split, images, table.labels
        self.split_groups = None if groups is None else list(groups)
        self.classes = list(table.classes)
        for s in SPLITS:
            self.idx[s] = np.flatnonzero(split == s)
        if resolve_normalization(cfg.get("normalize", "imagenet")) is None:
            self.normalize_from_training_split()
            log.info("normalize=train: per-channel mean/std of the training split: %s", self.normalization)
        self.report = list(table.problems)
        shown = 3  # the whole list is one command away; a run's log should stay readable
        for line in self.report[:shown]:
            log.warning(line)
        if len(self.report) > shown:
            log.warning("... and %d more data findings; `python -m bloodfl.data verify %s` lists them all",
                        len(self.report) - shown, cfg.name)

    @property
    def copy_kinds(self) -> tuple[str, ...]:
        """``dataset.copies_before_split`` (default []: no copies)."""
        return check_kinds(self.dataset_cfg.get("copies_before_split"))

    def _refuse_kept_copies(self, kinds: tuple[str, ...]) -> None:
        """Copies split independently are the flaw being measured; a split that keeps them with their original
        (by group, or by the published folders) would measure nothing while claiming the leaky protocol."""
        group_by = self.split_spec.group_by or self.dataset_cfg.get("group_key")
        keeps = (f"split.group_by={group_by}" if group_by and group_by != "none"
                 else "dataset.duplicates=group" if self.dataset_cfg.get("duplicates", "drop") == "group"
                 else "split=published" if self.split_spec.kind == "published" else None)
        if keeps:
            raise BloodflError(f"{option_text(kinds)} splits every copy independently (papers/001's flaw), but "
                               f"{keeps} keeps copies with their original; use a random ratio or k-fold split "
                               "(split.group_by=none) or drop the option")

    def _copy_leakage(self, table: SampleTable, split: np.ndarray, kinds: tuple[str, ...]) -> dict[str, Any]:
        """What the leaky protocol did, for the run's metrics.json, and a loud warning in its log."""
        ids: dict[str, int] = {}
        source = np.array([ids.setdefault(original_ref(r), len(ids)) for r in table.refs], dtype=np.int64)
        leaked = leaked_test_rows(split, source)
        n_test = int((split == "test").sum())
        log.warning("%s: THIS RUN LEAKS ON PURPOSE. Flipped copies were added before the split (papers/001's "
                    "flaw, for measuring its size only): %d of %d test images have their original or a copy in "
                    "the training split; its test and validation metrics are NOT held-out results.",
                    option_text(kinds), len(leaked), n_test)
        return {"data/copies_before_split": ",".join(kinds), "data/leaked_test_images": len(leaked),
                "data/leaked_test_fraction": len(leaked) / max(n_test, 1)}

    def _split_groups(self, table: SampleTable) -> list[str] | None:
        group_by = self.split_spec.group_by or self.dataset_cfg.get("group_key")
        if self.dataset_cfg.get("duplicates", "drop") == "group":
            group_by = group_by or "duplicates"  # dedupe folded identical files into table.groups
        if not group_by or group_by == "none":
            return None
        if table.groups is None:
            raise BloodflError(
                f"split.group_by={group_by!r} but data set {table.name!r} has no group key; set split.group_by=null"
            )
        return table.groups

    def _verify(self, table: SampleTable) -> None:
        expected = self.dataset_cfg.get("expected_counts")
        if not expected or not self.dataset_cfg.get("verify", True):
            return
        from bloodfl.data.checks import check_table

        problems = check_table(table, dict(expected))
        if problems:
            raise BloodflError(
                f"data set {table.name!r} failed its checks: {'; '.join(problems)} "
                "(run `python -m bloodfl.data verify " + str(self.dataset_cfg.name)
                + "` for details, or set dataset.verify=false to train anyway)"
            )

    def refs(self, split: str) -> list[str]:
        """The references (paths) of a split's images, in the order its loader yields them."""
        assert self.table is not None
        return [self.table.refs[i] for i in self.idx[split]]

    def save_splits(self, path: str | Path) -> None:
        """Write (path, label, split) for every image, so any run's split can be audited and reused."""
        assert self.table is not None and self.split is not None
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split"])
            for ref, y, s in zip(self.table.refs, self.table.labels, self.split):
                w.writerow([ref, self.table.classes[y], s])
