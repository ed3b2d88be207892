"""Stratified, seeded, leakage-free splits and the split-related bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodfl.compose import Root
from bloodfl.data.copies import leaked_test_rows, original_ref
from bloodfl.data.datamodule import BloodDataModule
from bloodfl.data.splits import SplitSpec, assert_disjoint, assign_splits
from bloodfl.errors import BloodflError
from bloodfl.training.run import train
from tests.conftest import FAST, compose_cfg

LABELS = np.repeat(np.arange(4), [200, 100, 60, 40])


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.1), (0.8, 0.0, 0.2), (0.9, 0.0, 0.1)])
def test_ratio_split_is_stratified_disjoint_covering(fractions: tuple[float, float, float]) -> None:
    spec = SplitSpec(fractions=fractions, val_from_train=0.0 if fractions[1] else 0.1, seed=3)
    split = assign_splits(LABELS, spec)
    assert set(split) == {"train", "val", "test"} and len(split) == len(LABELS)  # covers, one split each
    overall = np.bincount(LABELS) / len(LABELS)
    for s in ("train", "val", "test"):
        share = np.bincount(LABELS[split == s], minlength=4) / (split == s).sum()
        assert np.abs(share - overall).max() < 0.03, (s, share)
    assert abs((split == "test").mean() - fractions[2]) < 0.01


def test_same_seed_same_split_other_seed_differs() -> None:
    a = assign_splits(LABELS, SplitSpec(seed=7))
    assert (a == assign_splits(LABELS, SplitSpec(seed=7))).all()
    assert (a != assign_splits(LABELS, SplitSpec(seed=8))).any()


def test_group_split_keeps_groups_whole() -> None:
    groups = [f"smear{i // 4}" for i in range(len(LABELS))]
    split = assign_splits(LABELS, SplitSpec(seed=1), groups=groups)
    assert_disjoint(split, groups, "group")  # raises on a group in two splits
    assert {"train", "val", "test"} <= set(split)


def test_kfold_test_folds_partition_the_data() -> None:
    seen = np.zeros(len(LABELS), dtype=int)
    for fold in range(5):
        split = assign_splits(LABELS, SplitSpec(kind="kfold", k=5, fold=fold, val_from_train=0.1))
        seen += split == "test"
        assert (split == "val").any()
    assert (seen == 1).all()


def test_published_split_keeps_test_and_carves_val_from_train() -> None:
    pub = np.where(np.arange(len(LABELS)) % 5 == 0, "test", "train")
    split = assign_splits(LABELS, SplitSpec(kind="published", val_from_train=0.1), published=pub)
    assert ((split == "test") == (pub == "test")).all()
    assert 0.05 < (split == "val").sum() / (pub == "train").sum() < 0.15


def test_leakage_check_detects_shared_hash() -> None:
    with pytest.raises(BloodflError, match="leakage"):
        assert_disjoint(np.array(["train", "test"]), ["abc", "abc"], "content hash")


def test_fractions_must_sum_to_one() -> None:
    with pytest.raises(BloodflError, match="sum to 1"):
        assign_splits(LABELS, SplitSpec(fractions=(0.5, 0.2, 0.1)))


def test_class_too_small_for_split_names_the_class() -> None:
    labels = np.array([0] * 50 + [1] * 2)
    with pytest.raises(BloodflError, match="class 'pencil' has 2 images"):
        assign_splits(labels, SplitSpec(), classes=["normal", "pencil"])


def test_split_without_validation_is_refused() -> None:
    with pytest.raises(BloodflError, match="no validation"):
        assign_splits(LABELS, SplitSpec(fractions=(0.8, 0.0, 0.2), val_from_train=0.0))


def test_too_few_images_for_stratified_holdout() -> None:
    labels = np.repeat(np.arange(8), 4)
    with pytest.raises(BloodflError, match="cannot hold all 8 classes"):
        assign_splits(labels, SplitSpec())


def test_client_holdout_keeps_groups_whole_and_tolerates_small_shards() -> None:
    """A federated client's local validation share (Root.client_split) uses this hold-out: with groups (wbc4's
    source images, rbc's smears) no group is on both sides; a tiny shard keeps everything for training."""
    from bloodfl.data.splits import holdout

    labels = np.repeat(np.arange(4), 30)
    groups = np.array([f"g{i // 3}" for i in range(120)], dtype=object)  # 40 groups of 3 copies
    shard = np.arange(0, 120, 2)
    rest, held = holdout(labels, groups, 0.2, seed=1, idx=shard, strict=False)
    assert len(held) > 0 and not set(groups[rest]) & set(groups[held])
    assert sorted([*rest, *held]) == sorted(shard)
    rest, held = holdout(labels, None, 0.1, seed=1, idx=np.arange(4), strict=False)
    assert len(held) == 0 and len(rest) == 4  # 10% of 4 images rounds to none


# ---- dataset.copies_before_split: papers/001's augment-before-split flaw, on purpose and reported ----------

COPIES = "dataset.copies_before_split=[hflip,vflip,hvflip]"


def _datamodule(overrides: list[str], tmp_path: Path) -> BloodDataModule:
    dm = Root(compose_cfg([*FAST, *overrides], tmp_path)).datamodule()
    dm.setup("fit")
    return dm


def _splits_by_original(dm: BloodDataModule) -> dict[str, set[str]]:
    assert dm.table is not None and dm.split is not None
    out: dict[str, set[str]] = {}
    for ref, s in zip(dm.table.refs, dm.split):
        out.setdefault(original_ref(ref), set()).add(s)
    return out


def test_copies_before_split_land_in_train_and_test_and_are_reported(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dm = _datamodule([COPIES], tmp_path)
    assert dm.table is not None and dm.split is not None
    n = 8 * 12
    assert len(dm.table) == 4 * n and sum("#copy:hvflip" in r for r in dm.table.refs) == n
    # each copy holds its original's pixels, flipped
    row = {r: i for i, r in enumerate(dm.table.refs)}
    first = dm.table.refs[0]
    np.testing.assert_array_equal(dm.images[row[f"{first}#copy:hflip"]], dm.images[row[first]][:, ::-1])
    np.testing.assert_array_equal(dm.images[row[f"{first}#copy:vflip"]], dm.images[row[first]][::-1])
    # split independently: copies of one image are in train and in test (the flaw), and the run says how many
    spanning = [o for o, s in _splits_by_original(dm).items() if {"train", "test"} <= s]
    assert spanning
    source = np.array([sorted(_splits_by_original(dm)).index(original_ref(r)) for r in dm.table.refs])
    leaked = leaked_test_rows(dm.split, source)
    assert 0 < len(leaked) <= (dm.split == "test").sum()
    assert dm.leakage == {"data/copies_before_split": "hflip,vflip,hvflip", "data/leaked_test_images": len(leaked),
                          "data/leaked_test_fraction": len(leaked) / (dm.split == "test").sum()}
    # the leakage check ran and reported it (first finding, naming the option), and the log says so loudly
    assert dm.report[0].startswith(f"LEAKAGE ON PURPOSE ({COPIES}): ")
    assert any("THIS RUN LEAKS ON PURPOSE" in r.message and COPIES in r.message for r in caplog.records)


def test_no_copies_and_no_leak_without_the_option(tmp_path: Path) -> None:
    dm = _datamodule([], tmp_path)
    assert dm.table is not None and len(dm.table) == 8 * 12
    assert not any("#copy:" in r for r in dm.table.refs)
    assert all(len(s) == 1 for s in _splits_by_original(dm).values())
    assert dm.leakage == {} and not any("LEAKAGE" in line for line in dm.report)


def test_copies_before_split_of_decoded_files_and_the_recorded_run(tmp_path: Path) -> None:
    """Files decode once; copies are flipped after decoding (an unreadable file takes its copies along); the
    run's splits.csv and metrics.json say it used the leaky protocol."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    (tmp_path / "img" / "a" / "broken.png").write_bytes(b"not an image")
    args = ["dataset=imagefolder", f"dataset.root={tmp_path / 'img'}", "dataset.image_size=32",
            "dataset.copies_before_split=[hflip]", "loader.batch_size=8", "logger=csv", "callbacks=none",
            "trainer.fast_dev_run=true", "evaluation.bootstrap=0"]
    metrics = train(compose_cfg(args, tmp_path / "run"))
    rows = (tmp_path / "run" / "splits.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 30 and sum(r.split(",")[0].endswith("#copy:hflip") for r in rows) == 30
    assert not any("broken" in r for r in rows)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data/copies_before_split"] == "hflip" == metrics["data/copies_before_split"]
    assert saved["data/leaked_test_images"] > 0


@pytest.mark.parametrize("override, message", [
    ("dataset.copies_before_split=[rotate]", "each of hflip, vflip, hvflip at most once"),
    ("split.group_by=smear", "split.group_by=smear keeps copies with their original"),
])
def test_copies_before_split_bad_settings_are_refused(override: str, message: str, tmp_path: Path) -> None:
    extra = [] if "copies" in override else [COPIES]
    with pytest.raises(BloodflError, match=message):
        _datamodule([*extra, override], tmp_path)


def test_acknowledged_leak_is_reported_not_refused() -> None:
    split = np.array(["train", "test", "val"])
    with pytest.raises(BloodflError, match="leakage: source 'x' is in both 'train' and 'test' splits"):
        assert_disjoint(split, ["x", "x", "y"], "source")
    lines = assert_disjoint(split, ["x", "x", "y"], "source", acknowledged_by="opt=1")
    assert lines == ["LEAKAGE ON PURPOSE (opt=1): source in more than one split: 1 (e.g. 'x' in train and test)"]
    assert assert_disjoint(split, ["x", "y", "z"], "source", acknowledged_by="opt=1") == []
