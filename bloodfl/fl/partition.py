"""Split a training set among federated clients: iid, random_size, dirichlet and by_group shards.

Every kind returns one sorted array of data-set indices per client. The arrays are disjoint, together
cover ``train_idx`` exactly, and are identical for the same inputs and seed (all randomness comes from one
``numpy.random.Generator`` seeded with ``seed``).

- ``iid``: stratified equal shares: every class is dealt round-robin, so shard sizes differ by at most one
  and every shard has (within one image) the class mix of the whole training set.
- ``random_size``: papers/000: each client gets a random number of unique training images (uniformly
  random cut points of a shuffled training set, i.e. shares ~ Dirichlet(1, ..., 1)); at least ``min_size``.
- ``dirichlet``: label skew, the common non-IID benchmark (Hsu et al. 2019; NIID-Bench, Li et al. 2022):
  for every class, client shares ~ Dirichlet(alpha); small alpha gives clients few classes. As in
  NIID-Bench, a client already holding its equal share gets no more of later classes, and draws are
  repeated until every client has ``min_size`` images.
- ``by_group``: whole groups (a smear, a patient: a natural site key) per client, balanced in image count
  by greedy largest-group-first assignment with seeded tie-breaking.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bloodfl.errors import BloodflError

KINDS = ("iid", "random_size", "dirichlet", "by_group")
DIRICHLET_ATTEMPTS = 100


def default_min_size(n: int, num_clients: int) -> int:
    """Smallest shard for random_size/dirichlet when not given: 10 images, or less on tiny data sets."""
    return max(1, min(10, n // (2 * num_clients)))


def partition(
    labels: np.ndarray,
    train_idx: np.ndarray,
    num_clients: int,
    kind: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    groups: Sequence[str] | np.ndarray | None = None,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Data-set indices (into ``labels``/``groups``) of every client's shard; see the module docstring.

    labels: class index of every image in the data set; train_idx: the images to share out.
    groups: one key per image of the data set (only for ``by_group``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    n = len(train_idx)
    if kind not in KINDS:
        raise BloodflError(f"unknown fl.partition {kind!r}; valid: {', '.join(KINDS)}")
    if num_clients < 1:
        raise BloodflError(f"fl.num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise BloodflError(f"fl.num_clients={num_clients} but the training split has only {n} images; "
                           "use fewer clients")
    if len(np.unique(train_idx)) != n:
        raise ValueError("train_idx has repeated indices")
    rng = np.random.default_rng(seed)
    y = labels[train_idx]
    if kind == "iid":
        pos = _iid(y, num_clients, rng)
    elif kind == "random_size":
        pos = _random_size(n, num_clients, rng, _min_size(min_size, n, num_clients))
    elif kind == "dirichlet":
        if not alpha > 0:
            raise BloodflError(f"fl.alpha must be > 0 for the dirichlet partition, got {alpha}")
        pos = _dirichlet(y, num_clients, alpha, rng, _min_size(min_size, n, num_clients))
    else:
        if groups is None:
            raise BloodflError("fl.partition=by_group needs a data set with a group key (e.g. rbc's smear id); "
                               "choose fl.partition=iid, random_size or dirichlet")
        pos = _by_group(np.asarray(groups, dtype=object)[train_idx], num_clients, rng)
    return [np.sort(train_idx[p]) for p in pos]


def _min_size(min_size: int | None, n: int, num_clients: int) -> int:
    m = default_min_size(n, num_clients) if min_size is None else int(min_size)
    if m < 1 or m * num_clients > n:
        raise BloodflError(f"fl.min_size={m} is impossible for {num_clients} clients and {n} training images "
                           f"(needs 1 <= min_size <= {n // num_clients})")
    return m


def _iid(y: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    # shuffle within each class, lay the classes end to end, deal position i to client i mod k
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    return [order[i::k] for i in range(k)]


def _random_size(n: int, k: int, rng: np.random.Generator, min_size: int) -> list[np.ndarray]:
    spare = n - k * min_size
    cuts = np.sort(rng.integers(0, spare + 1, size=k - 1))
    sizes = min_size + np.diff(np.concatenate([[0], cuts, [spare]]))
    order = rng.permutation(n)
    return np.split(order, np.cumsum(sizes)[:-1])


def _dirichlet(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator, min_size: int) -> list[np.ndarray]:
    n = len(y)
    for _ in range(DIRICHLET_ATTEMPTS):
        shards: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(k, alpha))
            p = p * (sizes < n / k)  # NIID-Bench: a client with its equal share takes no more
            p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
            bounds = (np.cumsum(p) * len(members)).astype(np.int64)[:-1]
            for j, part in enumerate(np.split(members, bounds)):
                shards[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_size:
            return [np.concatenate(s) for s in shards]
    raise BloodflError(
        f"fl.partition=dirichlet with alpha={alpha} left a client below {min_size} images in "
        f"{DIRICHLET_ATTEMPTS} draws; raise fl.alpha, lower fl.min_size or use fewer clients"
    )


def _by_group(g: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    keys, inverse, counts = np.unique(g.astype(str), return_inverse=True, return_counts=True)
    if len(keys) < k:
        raise BloodflError(f"fl.partition=by_group needs at least fl.num_clients={k} groups, but the training "
                           f"split has {len(keys)}; use fewer clients or another partition")
    # largest group first onto the client with fewest images; a random permutation breaks ties
    tiebreak = rng.permutation(len(keys))
    owner = np.empty(len(keys), dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for gi in np.lexsort((tiebreak, -counts)):
        j = int(np.argmin(load))
        owner[gi] = j
        load[j] += counts[gi]
    return [np.flatnonzero(owner[inverse] == j) for j in range(k)]


def class_count_table(labels: np.ndarray, shards: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(num_clients, num_classes) image counts per client and class."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards]).astype(np.int64)


def save_partition_csv(path: str | Path, counts: np.ndarray, classes: Sequence[str]) -> None:
    """partition.csv: one row per client (client, n, then one column per class)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["client", "n", *classes])
        for cid, row in enumerate(counts):
            w.writerow([cid, int(row.sum()), *(int(v) for v in row)])


def print_partition(counts: np.ndarray, classes: Sequence[str], title: str = "partition") -> None:
    """The per-client class counts as a rich table (a total row at the bottom), never truncated."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("client", justify="right")
    table.add_column("n", justify="right")
    for c in classes:
        table.add_column(str(c), justify="right")
    for cid, row in enumerate(counts):
        table.add_row(str(cid), str(int(row.sum())), *(str(int(v)) for v in row))
    total = counts.sum(axis=0)
    table.add_row("all", str(int(total.sum())), *(str(int(v)) for v in total), style="bold")
    width = 16 + sum(max(len(str(c)), len(str(int(total.max())))) + 3 for c in classes)
    Console(width=max(80, width)).print(table)  # class names in full even when stdout is not a terminal
