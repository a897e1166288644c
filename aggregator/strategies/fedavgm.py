"""FedAvgM: FedOpt (Reddi et al. 2021) with server momentum over the FedAvg mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.strategies.base import overflow_refused, require_finite
from aggregator.strategies.fedavg import FedAvg


def is_running_stat(name: str) -> bool:
    """BatchNorm statistics are averaged, never stepped by an optimizer (a variance must stay >= 0)."""
    return "running_mean" in name or "running_var" in name


class FedAvgM(FedAvg):
    """The FedAvg mean gives the pseudo-gradient g = w_global - mean, and the server steps
    v = beta * v + g, w = w_global - lr * v. The optimizer state changes only when the whole step is finite."""

    name = "fedavgm"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(train, clip_norm)
        self.server_lr = server_lr
        self.momentum = momentum
        self.slots: dict[str, np.ndarray] = {}  # optimizer state, saved with each round's checkpoint

    def aggregate(self) -> dict[str, np.ndarray]:
        mean = super().aggregate()
        result, slots = {}, dict(self.slots)
        with overflow_refused(f"{self.name} server step"):
            for name, avg in mean.items():
                if is_running_stat(name):
                    result[name] = avg
                    continue
                start = np.asarray(self._global[name], dtype=np.float64)
                step = self.step(slots, name, start - avg.astype(np.float64))
                result[name] = (start - self.server_lr * step).astype(avg.dtype)
        require_finite(f"{self.name} server step", result)
        require_finite(f"{self.name} optimizer state", slots)
        self.slots = slots
        return result

    def step(self, slots: dict[str, np.ndarray], name: str, grad: np.ndarray) -> np.ndarray:
        """The server optimizer's step for one tensor; updates `slots` (a copy, committed when all is finite)."""
        velocity = self.momentum * slots.get(f"v.{name}", 0.0) + grad
        slots[f"v.{name}"] = velocity
        return velocity
