"""Stratified, seeded, leakage-free splits and the split-related bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from bloodfl.data.splits import SplitSpec, assert_disjoint, assign_splits
from bloodfl.errors import BloodflError

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
