"""Server-side strategies, one per file, and the one factory that builds them from the config.

fedavg (streamed weighted sum), fedavgm and fedadam (server optimizers over the FedAvg mean), median and
trimmed_mean (coordinate-wise, every update in memory, unweighted). Each class declares what it supports
(`supports_partial_sums`, `weighted`); see base.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aggregator.strategies.base import NonFiniteResult, Strategy
from aggregator.strategies.fedadam import FedAdam
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from aggregator.strategies.median import CoordinateMedian
from aggregator.strategies.trimmed_mean import TrimmedMean
from aggregator.strategies.weighted_sum import WeightedSum

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, CoordinateMedian, TrimmedMean, FedAvgM,
                                                                    FedAdam)}

__all__ = ["STRATEGIES", "CoordinateMedian", "FedAdam", "FedAvg", "FedAvgM", "NonFiniteResult", "Strategy",
           "TrimmedMean", "WeightedSum", "build_strategy"]


def build_strategy(name: str, train: Mapping[str, Any], clip_norm: float | None, trim_fraction: float,
                   server_lr: float | None = None) -> Strategy:
    if name == TrimmedMean.name:
        return TrimmedMean(train, clip_norm, trim_fraction)
    if name in (FedAvgM.name, FedAdam.name):
        cls = STRATEGIES[name]
        return cls(train, clip_norm) if server_lr is None else cls(train, clip_norm, server_lr)
    return STRATEGIES[name](train, clip_norm)
