"""FedAdam: FedOpt's Adam moments over the FedAvg pseudo-gradient (Reddi et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.strategies.fedavgm import FedAvgM


class FedAdam(FedAvgM):
    """Adam moments m, v over the pseudo-gradient; tau for adaptivity."""

    name = "fedadam"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(train, clip_norm, server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def step(self, slots: dict[str, np.ndarray], name: str, grad: np.ndarray) -> np.ndarray:
        m = self.beta1 * slots.get(f"m.{name}", 0.0) + (1 - self.beta1) * grad
        v = self.beta2 * slots.get(f"v.{name}", 0.0) + (1 - self.beta2) * grad * grad
        slots[f"m.{name}"], slots[f"v.{name}"] = m, v
        return m / (np.sqrt(v) + self.tau)
