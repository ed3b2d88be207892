"""Client partitions: disjoint, covering, seeded; label skew and size spread where promised; bad requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bloodfl.errors import BloodflError
from bloodfl.fl.partition import KINDS, class_count_table, partition, save_partition_csv

# an imbalanced 5-class data set; the training split is a random 70% of it
LABELS = np.repeat(np.arange(5), [400, 250, 150, 120, 80])
GROUPS = np.array([f"smear{i // 7}" for i in range(len(LABELS))])
TRAIN = np.sort(np.random.default_rng(0).choice(len(LABELS), size=700, replace=False))


def shards(kind: str, seed: int = 1, k: int = 5, **kw: object) -> list[np.ndarray]:
    return partition(LABELS, TRAIN, k, kind, seed=seed, groups=GROUPS, **kw)  # type: ignore[arg-type]


def max_class_share(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of a client's largest class (1.0: every client holds one class)."""
    counts = class_count_table(LABELS, parts, 5)
    return float((counts.max(axis=1) / counts.sum(axis=1)).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_disjoint_covering_deterministic(kind: str) -> None:
    parts = shards(kind)
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(TRAIN) and np.array_equal(np.sort(joined), TRAIN)  # disjoint and covering
    again = shards(kind)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = shards(kind, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_is_stratified_and_equal() -> None:
    parts = shards("iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = class_count_table(LABELS, parts, 5)
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1  # every class within one image per client


def test_dirichlet_small_alpha_is_skewed() -> None:
    iid = max_class_share(shards("iid"))
    skewed = max_class_share(shards("dirichlet", alpha=0.1))
    mild = max_class_share(shards("dirichlet", alpha=100.0))
    # measured over seeds 0-7: iid 0.38 (the largest class' overall share), alpha=0.1 0.68-0.79
    assert skewed > iid + 0.2, (skewed, iid)
    assert abs(mild - iid) < 0.1, (mild, iid)


def test_dirichlet_respects_min_size() -> None:
    for seed in range(5):
        assert min(len(p) for p in shards("dirichlet", seed=seed, alpha=0.1, min_size=30)) >= 30


def test_random_size_sizes_vary_with_minimum() -> None:
    spreads = []
    for seed in range(5):
        sizes = [len(p) for p in shards("random_size", seed=seed, min_size=20)]
        assert min(sizes) >= 20
        spreads.append(max(sizes) / min(sizes))
    assert np.median(spreads) > 2.0, spreads  # equal shares: 1.0; measured median 6.6


def test_by_group_keeps_groups_whole_and_balanced() -> None:
    parts = shards("by_group")
    owners = [set(GROUPS[p]) for p in parts]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not owners[i] & owners[j]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 7  # greedy balancing: within one group's size


def test_impossible_requests_fail_clearly() -> None:
    with pytest.raises(BloodflError, match="only 700 images"):
        shards("iid", k=701)
    with pytest.raises(BloodflError, match="groups"):
        partition(LABELS, TRAIN[:20], 10, "by_group", groups=GROUPS)
    with pytest.raises(BloodflError, match="group key"):
        partition(LABELS, TRAIN, 3, "by_group", groups=None)
    with pytest.raises(BloodflError, match="unknown fl.partition"):
        shards("pathological")
    with pytest.raises(BloodflError, match="min_size"):
        shards("random_size", min_size=200)
    with pytest.raises(BloodflError, match="alpha"):
        shards("dirichlet", alpha=0.0)
    with pytest.raises(BloodflError, match="num_clients"):
        shards("iid", k=0)


def test_partition_csv(tmp_path: Path) -> None:
    parts = shards("dirichlet", alpha=0.5)
    counts = class_count_table(LABELS, parts, 5)
    save_partition_csv(tmp_path / "partition.csv", counts, ["a", "b", "c", "d", "e"])
    lines = (tmp_path / "partition.csv").read_text().splitlines()
    assert lines[0] == "client,n,a,b,c,d,e" and len(lines) == 6
    row = [int(v) for v in lines[1].split(",")]
    assert row[1] == len(parts[0]) == sum(row[2:])
