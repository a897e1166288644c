"""The streamed weighted sum behind FedAvg and the BatchNorm statistics mean: sum_k w_k * x_k / sum_k w_k.

The sum is kept in float64 so that adding clients one at a time gives the same result as the closed formula,
and memory holds one model, not one per client. Each add or merge is computed aside and committed only when
finite, so an update that would overflow the sum is refused and leaves the sum as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies.base import overflow_refused, require_finite
from fedwire.messages import MAX_NUM_SAMPLES, brief_int



class WeightedSum:
    """Running sum of weight_k * x_k over the updates of one round."""

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
        require_finite("partial sum", acc._sums)
        acc._dtypes = dict(dtypes)
        acc.total_weight, acc.count = total_weight, count
        return acc

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """The float64 sums of weight_k * x_k, as a partial sum travels."""
        return dict(self._sums)

    def add(self, tensors: Mapping[str, np.ndarray], weight: int) -> None:
        if not 0 < weight <= MAX_NUM_SAMPLES:  # compared as integers: a huge claim is never made a float
            raise ValueError(f"weight must be positive and at most 2^53, got {brief_int(weight)}")
        if self._sums and set(tensors) != set(self._sums):
            raise ValueError("update tensor names differ from earlier updates of this round")
        with overflow_refused("weighted sum"):
            added = {name: np.asarray(value, dtype=np.float64) * weight + self._sums.get(name, 0.0)
                     for name, value in tensors.items()}
        require_finite("weighted sum", added)
        for name, value in tensors.items():
            self._dtypes.setdefault(name, np.asarray(value).dtype)
        self._sums = added
        self.total_weight += weight
        self.count += 1

    def merge(self, other: "WeightedSum") -> None:
        """Add another partial sum (sums are additive, so workers can split a round)."""
        if other.count == 0:
            return
        if self._sums and set(other._sums) != set(self._sums):
            raise ValueError("partial sums hold different tensor names")
        with overflow_refused("merged partial sums"):
            merged = {name: value + self._sums.get(name, 0.0) for name, value in other._sums.items()}
        require_finite("merged partial sums", merged)
        for name in other._sums:
            self._dtypes.setdefault(name, other._dtypes[name])
        self._sums = merged
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean, cast back to each tensor's wire dtype."""
        if self.total_weight == 0:
            raise ValueError("no updates to average")
        with overflow_refused("weighted mean"):
            result = {name: (total / self.total_weight).astype(self._dtypes[name])
                      for name, total in self._sums.items()}
        require_finite("weighted mean", result)
        return result
