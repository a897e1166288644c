"""DP-FedAvg around any linear strategy (fedavg, fedavgm, fedadam), and its privacy accounting.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018): each update's delta
from the global model is clipped to L2 norm C, the clipped deltas are summed with equal weights (n_k is a
claim a device could inflate, and a weighted mean would let one device move the model by more than C / k),
Gaussian noise N(0, (z C)^2) is added to the sum, and the mean of k updates is global + (sum + noise) / k. The
wrapped strategy then sees that one noised mean as its only update, so FedAvgM/FedAdam step on it as usual:
whatever comes after the noise is post-processing and costs no privacy.

central: the aggregator clips and noises (the operator is trusted with raw updates).
distributed: each device clips its own update and adds N(0, (z C)^2 / m), m the announced quorum, so no
update leaves a device in the clear; the aggregator only tops the noise up when fewer than m updates arrived.
It cannot check a noised update's norm, so a dishonest device is bounded by nothing here. Secure aggregation
(SecAgg+) slots in at `accumulate`: the aggregator would then receive only the masked sum, which is all this
class reads in distributed mode.

Epsilon at the configured delta comes from Google's dp-accounting (RDP accountant): each round is a Gaussian
mechanism of multiplier z on the clients sampled with rate fraction_fit. The kit samples a fixed number of
devices per round; it is accounted as Poisson sampling at that rate, the usual approximation (TFF, Opacus).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, DpConfig
from fedwire.dp import (Tensors, add_gaussian, adaptive_delta_multiplier, clip_delta, delta_of, is_float, next_clip,
                        secure_generator, top_up_std)
from fedwire.messages import DpSettings

log = logging.getLogger("facefed.aggregator.dp")



class _QuietNonConvergence(logging.Filter):
    """The RDP accountant warns, on every call, about each fractional order whose series does not converge at
    small sampling rates, then leaves that order out itself: the result is right, the warnings only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietNonConvergence())


def round_event(noise_multiplier: float, sampling_rate: float):
    """One round of DP-FedAvg as the accountant sees it (a dp_accounting.DpEvent)."""
    import dp_accounting  # the aggregator extra; only a config with dp needs it

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def epsilon_after(rounds: int, noise_multiplier: float, sampling_rate: float, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds (0 before the first)."""
    if rounds <= 0:
        return 0.0
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(round_event(noise_multiplier, sampling_rate), rounds)
    return float(accountant.get_epsilon(delta))


class DpStrategy:
    """Clips, noises and accounts around `inner`; called by the service exactly like a strategy."""

    def __init__(self, inner, dp: DpConfig, sampling_rate: float, rng: np.random.Generator | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = dp
        self.sampling_rate = sampling_rate
        self.clip = dp.clip
        self._rng = rng if rng is not None else secure_generator()
        # With adaptive clipping the noised count takes part of the budget: the deltas get a larger multiplier.
        self.delta_multiplier = (dp.noise_multiplier if dp.adaptive is None
                                 else adaptive_delta_multiplier(dp.noise_multiplier, dp.adaptive.count_stddev))
        self._global: Tensors = {}
        self.begin_round({})

    # ---- the strategy interface -----------------------------------------------

    def configure_round(self, round_number: int) -> dict[str, Any]:
        return self.inner.configure_round(round_number)

    def settings(self, quorum: int) -> DpSettings:
        """What the round's announcement tells the devices."""
        return DpSettings(self.config.mode, self.clip, self.config.noise_multiplier, max(1, quorum))

    def begin_round(self, global_tensors: Tensors) -> None:
        self._global = global_tensors
        self._sum: dict[str, np.ndarray] = {}
        self._counters: dict[str, np.ndarray] = {}  # integer tensors (BatchNorm batch counts): plain mean
        self._count = 0
        self._unclipped = 0
        self._shares = 1

    def expect_shares(self, quorum: int) -> None:
        """Distributed mode: the number of devices the round's noise was split between."""
        self._shares = max(1, quorum)

    def accumulate(self, tensors: Tensors, num_samples: int) -> None:
        delta = delta_of(tensors, self._global)
        if self.config.mode == "central":
            delta, norm = clip_delta(delta, self.clip)
            self._unclipped += norm <= self.clip
        for name, value in delta.items():
            self._sum[name] = self._sum[name] + value if name in self._sum else value
        for name, value in tensors.items():
            if not is_float(value):
                self._counters[name] = self._counters.get(name, 0) + np.asarray(value, np.float64)
        self._count += 1

    @property
    def num_updates(self) -> int:
        return self._count

    def aggregate(self) -> dict[str, np.ndarray]:
        if self._count == 0:
            raise ValueError("no updates to average")
        if self.config.mode == "central":
            std = self.delta_multiplier * self.clip
        else:
            std = top_up_std(self.clip, self.config.noise_multiplier, self._shares, self._count)
        noised = add_gaussian(self._sum, std, self._rng) if std > 0 else self._sum
        mean = {}
        for name, reference in self._global.items():
            dtype = np.asarray(reference).dtype
            if name in noised:
                value = np.asarray(reference, np.float64) + noised[name] / self._count
                if "running_var" in name:  # a variance must stay >= 0; post-processing keeps DP
                    value = np.maximum(value, 0.0)
            else:
                value = np.rint(self._counters[name] / self._count)
            mean[name] = value.astype(dtype)
        if self.config.adaptive is not None:
            a = self.config.adaptive
            self.clip, share = next_clip(self.clip, self._unclipped, self._count, a.count_stddev, a.target_quantile,
                                         a.learning_rate, self._rng)
            log.info("adaptive clipping: %.2f of updates unclipped (noised); clip now %.4g", share, self.clip)
        self.inner.begin_round(self._global)
        self.inner.accumulate(mean, 1)
        return self.inner.aggregate()

    @property
    def slots(self) -> dict[str, np.ndarray]:
        """The inner strategy's optimizer state, and the adapted clip (saved with each checkpoint)."""
        if not hasattr(self.inner, "slots") and self.config.adaptive is None:
            raise AttributeError("slots")
        slots = dict(getattr(self.inner, "slots", {}))
        if self.config.adaptive is not None:
            slots["dp.clip"] = np.array(self.clip)
        return slots

    @slots.setter
    def slots(self, value: Mapping[str, np.ndarray]) -> None:
        value = dict(value)
        if "dp.clip" in value:
            self.clip = float(value.pop("dp.clip"))
        if hasattr(self.inner, "slots"):
            self.inner.slots = value

    # ---- accounting ----------------------------------------------------------------

    def epsilon(self, rounds: int) -> float:
        return epsilon_after(rounds, self.config.noise_multiplier, self.sampling_rate, self.config.delta)

    def metrics(self, rounds: int) -> dict[str, float]:
        """Logged with each round: epsilon spent after `rounds` rounds, at dp.delta, and the clip used next."""
        return {"epsilon": self.epsilon(rounds), "dp_delta": self.config.delta, "dp_clip": self.clip}

    def budget_reached(self, rounds_done: int) -> bool:
        """True when one more round would take epsilon past the budget."""
        budget = self.config.epsilon_budget
        return budget is not None and self.epsilon(rounds_done + 1) > budget


def with_dp(strategy, config: AggregatorConfig, rng: np.random.Generator | None = None):
    """The strategy wrapped in DP-FedAvg when config.dp is set, else unchanged. rng: the noise's generator, a
    seeded one for benches only (None: seeded from the OS's CSPRNG, as production must be)."""
    if config.dp is None:
        return strategy
    return DpStrategy(strategy, config.dp, config.fraction_fit, rng=rng)
