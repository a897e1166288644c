"""Coordinate-wise trimmed mean (Yin et al. 2018): the top and bottom trim_fraction of values are dropped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.strategies.base import BufferedStrategy, Tensors, overflow_refused, require_finite
from aggregator.strategies.median import require_updates


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per coordinate: drop the floor(trim_fraction * K) largest and smallest values, average the rest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    require_updates(updates, 1)
    k = len(updates)
    cut = int(np.floor(trim_fraction * k))
    result = {}
    with overflow_refused("trimmed mean"):
        for name, first in updates[0].items():
            stacked = np.sort(np.stack([u[name] for u in updates]).astype(np.float64), axis=0)
            result[name] = stacked[cut:k - cut].mean(axis=0).astype(first.dtype)
    require_finite("trimmed mean", result)
    return result


class TrimmedMean(BufferedStrategy):
    name = "trimmed_mean"

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None,
                 trim_fraction: float = 0.2) -> None:
        super().__init__(train, clip_norm)
        self._trim_fraction = trim_fraction

    def aggregate(self) -> dict[str, np.ndarray]:
        return trimmed_mean(self._updates, self._trim_fraction)
