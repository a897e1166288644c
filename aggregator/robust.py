"""Robust aggregation against poisoned updates, as pure functions over {name: array} dicts.

- Norm clipping bounds how far one update can move the model: the update's delta from the
  round's global model is scaled down to at most `max_norm` (L2 over all float tensors).
- Coordinate-wise median and trimmed mean (Yin et al. 2018) ignore outlying values per
  coordinate. They are unweighted by n_k on purpose: weighting would let a client that
  claims a huge n_k dominate again.
Both robust rules need every update of the round at once, unlike streaming FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def update_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of update - reference over all float tensors."""
    total = 0.0
    for name, value in update.items():
        if _is_float(value):
            delta = value.astype(np.float64) - reference[name].astype(np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return total ** 0.5


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> dict[str, np.ndarray]:
    """reference + delta * min(1, max_norm / ||delta||)."""
    norm = update_norm(update, reference)
    if norm <= max_norm:
        return dict(update)
    scale = max_norm / norm
    return {
        name: (reference[name].astype(np.float64) + (value.astype(np.float64) - reference[name]) * scale).astype(value.dtype)
        if _is_float(value) else value
        for name, value in update.items()
    }


def coordinate_median(updates: Sequence[Tensors]) -> dict[str, np.ndarray]:
    _require_updates(updates, 1)
    return {name: np.median(np.stack([u[name] for u in updates]).astype(np.float64), axis=0).astype(first.dtype)
            for name, first in updates[0].items()}


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per coordinate: drop the floor(trim_fraction * K) largest and smallest values, average the rest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    _require_updates(updates, 1)
    k = len(updates)
    cut = int(np.floor(trim_fraction * k))
    result = {}
    for name, first in updates[0].items():
        stacked = np.sort(np.stack([u[name] for u in updates]).astype(np.float64), axis=0)
        result[name] = stacked[cut:k - cut].mean(axis=0).astype(first.dtype)
    return result


def _require_updates(updates: Sequence[Tensors], minimum: int) -> None:
    if len(updates) < minimum:
        raise ValueError(f"need at least {minimum} update(s), got {len(updates)}")
    names = set(updates[0])
    if any(set(u) != names for u in updates):
        raise ValueError("updates hold different tensor names")
