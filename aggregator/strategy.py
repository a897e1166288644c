"""Server-side strategies: how a round's updates become the next global model.

Each strategy is a few small named steps, called by the service in this order:
`configure_round` -> `begin_round` -> `accumulate` (once per accepted update) -> `aggregate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.fedavg import WeightedSum
from aggregator.robust import clip_update, coordinate_median, trimmed_mean

Tensors = Mapping[str, np.ndarray]


class FedAvg:
    """McMahan et al. 2017: weighted by each client's sample count n_k, streamed."""

    name = "fedavg"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None) -> None:
        self._train = dict(train or {})
        self._clip_norm = clip_norm
        self._global: Tensors = {}
        self._sum = WeightedSum()

    def configure_round(self, round_number: int) -> dict[str, Any]:
        """Training settings announced to the devices for this round."""
        return dict(self._train)

    def begin_round(self, global_tensors: Tensors) -> None:
        self._global = global_tensors
        self._sum = WeightedSum()

    def accumulate(self, tensors: Tensors, num_samples: int) -> None:
        self._sum.add(self.clip(tensors), num_samples)

    def clip(self, tensors: Tensors) -> Tensors:
        """Bound the update's distance from the global model, when clipping is on."""
        if self._clip_norm is None:
            return tensors
        return clip_update(tensors, self._global, self._clip_norm)

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


class CoordinateMedian(FedAvg):
    """Coordinate-wise median of the round's (clipped) updates; keeps them all in memory."""

    name = "median"

    def begin_round(self, global_tensors: Tensors) -> None:
        super().begin_round(global_tensors)
        self._updates: list[Tensors] = []

    def accumulate(self, tensors: Tensors, num_samples: int) -> None:
        self._updates.append(self.clip(tensors))

    @property
    def num_updates(self) -> int:
        return len(self._updates)

    def aggregate(self) -> dict[str, np.ndarray]:
        return coordinate_median(self._updates)


class TrimmedMean(CoordinateMedian):
    """Coordinate-wise trimmed mean: the top and bottom trim_fraction of values are dropped."""

    name = "trimmed_mean"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 trim_fraction: float = 0.2) -> None:
        super().__init__(train, clip_norm)
        self._trim_fraction = trim_fraction

    def aggregate(self) -> dict[str, np.ndarray]:
        return trimmed_mean(self._updates, self._trim_fraction)


def is_running_stat(name: str) -> bool:
    """BatchNorm statistics are averaged, never stepped by an optimizer (a variance must stay >= 0)."""
    return "running_mean" in name or "running_var" in name


class FedAvgM(FedAvg):
    """FedOpt (Reddi et al. 2021) with server momentum: the FedAvg mean gives the pseudo-gradient
    g = w_global - mean, and the server steps v = beta * v + g, w = w_global - lr * v."""

    name = "fedavgm"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(train, clip_norm)
        self.server_lr = server_lr
        self.momentum = momentum
        self.slots: dict[str, np.ndarray] = {}  # optimizer state, saved with each round's checkpoint

    def aggregate(self) -> dict[str, np.ndarray]:
        mean = super().aggregate()
        result = {}
        for name, avg in mean.items():
            if is_running_stat(name):
                result[name] = avg
                continue
            start = np.asarray(self._global[name], dtype=np.float64)
            step = self.step(name, start - avg.astype(np.float64))
            result[name] = (start - self.server_lr * step).astype(avg.dtype)
        return result

    def step(self, name: str, grad: np.ndarray) -> np.ndarray:
        velocity = self.momentum * self.slots.get(f"v.{name}", 0.0) + grad
        self.slots[f"v.{name}"] = velocity
        return velocity


class FedAdam(FedAvgM):
    """FedOpt's FedAdam: Adam moments over the pseudo-gradient, tau for adaptivity (Reddi et al. 2021)."""

    name = "fedadam"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(train, clip_norm, server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def step(self, name: str, grad: np.ndarray) -> np.ndarray:
        m = self.beta1 * self.slots.get(f"m.{name}", 0.0) + (1 - self.beta1) * grad
        v = self.beta2 * self.slots.get(f"v.{name}", 0.0) + (1 - self.beta2) * grad * grad
        self.slots[f"m.{name}"], self.slots[f"v.{name}"] = m, v
        return m / (np.sqrt(v) + self.tau)


STRATEGIES = {cls.name: cls for cls in (FedAvg, CoordinateMedian, TrimmedMean, FedAvgM, FedAdam)}


def build_strategy(name: str, train: Mapping[str, Any], clip_norm: float | None, trim_fraction: float,
                   server_lr: float | None = None) -> FedAvg:
    if name == TrimmedMean.name:
        return TrimmedMean(train, clip_norm, trim_fraction)
    if name in (FedAvgM.name, FedAdam.name):
        cls = STRATEGIES[name]
        return cls(train, clip_norm) if server_lr is None else cls(train, clip_norm, server_lr)
    return STRATEGIES[name](train, clip_norm)
