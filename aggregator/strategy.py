"""Server-side strategies: how a round's updates become the next global model.

Each strategy is a few small named steps, called by the service in this order:
`configure_round` -> `begin_round` -> `accumulate` (once per accepted update) -> `aggregate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.fedavg import WeightedSum


class FedAvg:
    """McMahan et al. 2017: weighted by each client's sample count n_k."""

    name = "fedavg"

    def __init__(self, train: Mapping[str, Any] | None = None) -> None:
        self._train = dict(train or {})
        self._sum = WeightedSum()

    def configure_round(self, round_number: int) -> dict[str, Any]:
        """Training settings announced to the devices for this round."""
        return dict(self._train)

    def begin_round(self, global_tensors: Mapping[str, np.ndarray]) -> None:
        self._sum = WeightedSum()

    def accumulate(self, tensors: Mapping[str, np.ndarray], num_samples: int) -> None:
        self._sum.add(tensors, num_samples)

    @property
    def num_updates(self) -> int:
        return self._sum.count

    def aggregate(self) -> dict[str, np.ndarray]:
        return self._sum.mean()
