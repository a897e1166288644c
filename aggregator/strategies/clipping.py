"""Norm clipping against poisoned updates, as pure functions over {name: array} dicts.

Clipping bounds how far one update can move the model: the update's delta from the round's global model is
scaled down to at most `max_norm` (L2 over all float tensors). It bounds the step, not the weight: the weight
of an update is bounded by the sample-count policy (aggregator/claims.py).
"""

from __future__ import annotations

from collections.abc import Mapping

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
