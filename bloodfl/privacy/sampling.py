"""DP-SGD's batch sampling: Poisson batches, exactly as many per epoch as the privacy plan counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset


class PoissonLoader(DataLoader):
    """Every image joins each batch independently with probability ``sample_rate``; exactly ``steps`` batches
    per epoch (Opacus' UniformWithReplacementSampler with its ``steps`` argument).

    Opacus' DPDataLoader takes ``int(1 / sample_rate)`` steps, which for about 8% of batch counts k
    (93, 99, 105, ...) is k - 1 since 1 / (1 / k) rounds below k; bloodfl plans, accounts and records k steps
    at q = 1 / k, so the loader must take k. The masks come from ``generator`` (a client's secret one). An empty
    batch keeps the shapes and dtypes of the data, so it still makes a (noise-only) DP step. ``public_generator``
    (the plain loader's) only seeds worker processes."""

    def __init__(self, dataset: Dataset, *, sample_rate: float, steps: int, generator: torch.Generator | None,
                 collate_fn: Callable[[Any], Any] | None = None, num_workers: int = 0,
                 public_generator: torch.Generator | None = None) -> None:
        self.sample_rate = sample_rate
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,  # type: ignore[arg-type]
                                                generator=generator, steps=steps)
        first = dataset[0]
        super().__init__(
            dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
            generator=public_generator,  # only seeds worker processes; keeps the global torch stream untouched
            collate_fn=wrap_collate_with_empty(collate_fn=collate_fn, batch_first=True,
                                               sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
                                               dtypes=[getattr(x, "dtype", type(x)) for x in first]))
