"""Coordinate-wise median (Yin et al. 2018): per coordinate, the median of the round's (clipped) updates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator.strategies.base import BufferedStrategy, Tensors, overflow_refused, require_finite


def coordinate_median(updates: Sequence[Tensors]) -> dict[str, np.ndarray]:
    require_updates(updates, 1)
    with overflow_refused("median"):
        result = {name: np.median(np.stack([u[name] for u in updates]).astype(np.float64), axis=0).astype(first.dtype)
                  for name, first in updates[0].items()}
    require_finite("median", result)
    return result


def require_updates(updates: Sequence[Tensors], minimum: int) -> None:
    if len(updates) < minimum:
        raise ValueError(f"need at least {minimum} update(s), got {len(updates)}")
    names = set(updates[0])
    if any(set(u) != names for u in updates):
        raise ValueError("updates hold different tensor names")


class CoordinateMedian(BufferedStrategy):
    """Keeps every update of the round in memory; unweighted, so no partial sums."""

    name = "median"

    def aggregate(self) -> dict[str, np.ndarray]:
        return coordinate_median(self._updates)
