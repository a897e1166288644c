"""FedAvg (McMahan et al. 2017): w = sum_k (n_k / n) * w_k, streamed through one WeightedSum."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from aggregator.strategies.base import Strategy, Tensors
from aggregator.strategies.weighted_sum import WeightedSum


class FedAvg(Strategy):
    """Weighted by each client's bounded sample count, streamed; its sums are additive, so shard workers can
    each keep one and a reducer merges them."""

    name = "fedavg"
    supports_partial_sums = True

    def begin_round(self, global_tensors: Tensors) -> None:
        super().begin_round(global_tensors)
        self._sum = WeightedSum()

    def accumulate(self, tensors: Tensors, weight: int) -> None:
        self._sum.add(self.clip(tensors), weight)

    @property
    def num_updates(self) -> int:
        return self._sum.count

    @property
    def partial_sum(self) -> WeightedSum:
        """This round's running sum (what a shard worker hands to the reducer)."""
        return self._sum

    def merge(self, partial: WeightedSum) -> None:
        """Add a shard worker's partial sum of this round (sums are additive)."""
        self._sum.merge(partial)

    def aggregate(self) -> dict[str, np.ndarray]:
        return self._sum.mean()


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg of (tensors, n_k) pairs."""
    acc = WeightedSum()
    for tensors, num_samples in updates:
        acc.add(tensors, num_samples)
    return acc.mean()
