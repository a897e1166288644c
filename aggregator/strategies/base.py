"""What every server-side strategy shares: the round's steps, optional norm clipping, and the overflow guard.

A strategy is called by the service in this order: `configure_round` -> `begin_round` -> `accumulate` (once
per accepted update, with its bounded weight) -> `aggregate`. Each declares what it supports instead of a
list elsewhere: `supports_partial_sums` (shard workers can split a round, aggregator/sharded.py) and
`weighted` (whether the weight of an update changes the result at all).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from aggregator.strategies.clipping import clip_update

Tensors = Mapping[str, np.ndarray]


class NonFiniteResult(ValueError):
    """A numeric step of aggregation overflowed or went NaN; the update (or aggregate) that caused it is refused."""


@contextmanager
def overflow_refused(what: str) -> Iterator[None]:
    """numpy overflow and invalid operations inside the block raise NonFiniteResult naming `what`."""
    try:
        with np.errstate(over="raise", invalid="raise"):
            yield
    except FloatingPointError as exc:
        raise NonFiniteResult(f"{what}: {exc}") from None


def require_finite(what: str, tensors: Tensors) -> None:
    """Float tensors must hold no NaN or Inf (an overflow numpy did not flag, e.g. on integer weights)."""
    for name, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise NonFiniteResult(f"{what}: {name} is not finite")


class Strategy:
    """Base of all strategies: announced train settings, the round's global model, clipping."""

    name = ""
    supports_partial_sums = False
    weighted = True

    def __init__(self, train: Mapping[str, Any] | None = None, clip_norm: float | None = None) -> None:
        self._train = dict(train or {})
        self._clip_norm = clip_norm
        self._global: Tensors = {}

    def configure_round(self, round_number: int) -> dict[str, Any]:
        """Training settings announced to the devices for this round."""
        return dict(self._train)

    def begin_round(self, global_tensors: Tensors) -> None:
        self._global = global_tensors

    def clip(self, tensors: Tensors) -> Tensors:
        """Bound the update's distance from the global model, when clipping is on."""
        if self._clip_norm is None:
            return tensors
        with overflow_refused("clipping"):
            return clip_update(tensors, self._global, self._clip_norm)

    def accumulate(self, tensors: Tensors, weight: int) -> None:
        raise NotImplementedError

    @property
    def num_updates(self) -> int:
        raise NotImplementedError

    def aggregate(self) -> dict[str, np.ndarray]:
        raise NotImplementedError


class BufferedStrategy(Strategy):
    """A rule that needs every (clipped) update of the round at once; weights are ignored on purpose, so a
    client claiming a huge n_k gains nothing (and the round cannot be split into partial sums)."""

    weighted = False

    def begin_round(self, global_tensors: Tensors) -> None:
        super().begin_round(global_tensors)
        self._updates: list[Tensors] = []

    def accumulate(self, tensors: Tensors, weight: int) -> None:
        self._updates.append(self.clip(tensors))

    @property
    def num_updates(self) -> int:
        return len(self._updates)
