"""FedAvg as pure math: w = sum_k (n_k / n) * w_k, accumulated as a stream.

The sum is kept in float64 so that adding clients one at a time gives the same
result as the closed formula, and memory holds one model, not one per client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


class WeightedSum:
    """Running sum of n_k * w_k over the updates of one round."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0
        self.count = 0

    @classmethod
    def from_sums(cls, sums: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype], total_weight: int,
                  count: int) -> WeightedSum:
        """A partial sum rebuilt from its float64 `sums` (e.g. a shard worker's); `dtypes` are the mean's dtypes."""
        if set(sums) != set(dtypes):
            raise ValueError(f"partial sum holds {sorted(sums)}, the global model {sorted(dtypes)}")
        if any(np.asarray(value).dtype != np.float64 for value in sums.values()):
            raise ValueError("partial sums travel as float64")
        acc = cls()
        acc._sums = {name: np.array(value, dtype=np.float64) for name, value in sums.items()}
        acc._dtypes = dict(dtypes)
        acc.total_weight, acc.count = total_weight, count
        return acc

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """The float64 sums of n_k * w_k, as a partial sum travels."""
        return dict(self._sums)

    def add(self, tensors: Mapping[str, np.ndarray], weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sums and set(tensors) != set(self._sums):
            raise ValueError("update tensor names differ from earlier updates of this round")
        for name, value in tensors.items():
            contribution = np.asarray(value, dtype=np.float64) * weight
            if name in self._sums:
                self._sums[name] += contribution
            else:
                self._sums[name] = contribution
                self._dtypes[name] = np.asarray(value).dtype
        self.total_weight += weight
        self.count += 1

    def merge(self, other: "WeightedSum") -> None:
        """Add another partial sum (sums are additive, so workers can split a round)."""
        if other.count == 0:
            return
        if self._sums and set(other._sums) != set(self._sums):
            raise ValueError("partial sums hold different tensor names")
        for name, value in other._sums.items():
            if name in self._sums:
                self._sums[name] += value
            else:
                self._sums[name] = value.copy()
                self._dtypes[name] = other._dtypes[name]
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean, cast back to each tensor's wire dtype."""
        if self.total_weight == 0:
            raise ValueError("no updates to average")
        return {
            name: (total / self.total_weight).astype(self._dtypes[name])
            for name, total in self._sums.items()
        }


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg of (tensors, n_k) pairs."""
    acc = WeightedSum()
    for tensors, num_samples in updates:
        acc.add(tensors, num_samples)
    return acc.mean()
