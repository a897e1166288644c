"""Client-level differential privacy (DP-FedAvg) as pure math over {name: array} dicts, no I/O.

Both sides use it: the aggregator clips and noises in central mode (aggregator/dp.py), and in distributed mode
each device clips its own update and adds its share of the noise before anything leaves it. An update's delta
is its L2 distance from the round's global model over all float tensors (BatchNorm statistics included: they
are computed from the device's images too). Noise is float64 Gaussian from a generator seeded by `secrets`;
only tests pass a seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np

Tensors = Mapping[str, np.ndarray]


def secure_generator(seed: int | None = None) -> np.random.Generator:
    """A numpy Generator seeded with 128 bits from the OS's CSPRNG; an explicit seed is for tests only."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def delta_of(update: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    """update - reference in float64, for the float tensors (integer counters carry no gradient)."""
    return {name: np.asarray(value, np.float64) - np.asarray(reference[name], np.float64)
            for name, value in update.items() if is_float(value)}


def l2_norm(delta: Tensors) -> float:
    return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in delta.values()))


def clip_delta(delta: Tensors, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """The delta scaled to L2 norm at most `clip`, and its norm before clipping."""
    norm = l2_norm(delta)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: v * scale for name, v in delta.items()}, norm


def add_gaussian(delta: Tensors, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """delta + N(0, std^2) per coordinate, in float64."""
    return {name: v + rng.normal(0.0, std, size=v.shape) for name, v in delta.items()}


def device_noise_std(clip: float, noise_multiplier: float, shares: int) -> float:
    """Each of `shares` devices adds N(0, (z C)^2 / shares): their sum carries the central noise N(0, (z C)^2)."""
    return noise_multiplier * clip / math.sqrt(shares)


def top_up_std(clip: float, noise_multiplier: float, shares: int, received: int) -> float:
    """Distributed mode: noise the aggregator adds when fewer than `shares` noised updates arrived, so the sum
    still carries N(0, (z C)^2) (the missing devices' shares)."""
    missing = max(0, shares - received)
    return noise_multiplier * clip * math.sqrt(missing / shares)


def privatize_update(update: Tensors, reference: Tensors, clip: float, std: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A device's update clipped to `clip` around `reference` plus its noise share, back in wire dtypes.

    BatchNorm variances are floored at 0 afterwards (post-processing keeps DP) so the update stays valid."""
    noised = add_gaussian(clip_delta(delta_of(update, reference), clip)[0], std, rng)
    out = dict(update)
    for name, d in noised.items():
        value = np.asarray(reference[name], np.float64) + d
        if "running_var" in name:
            value = np.maximum(value, 0.0)
        out[name] = value.astype(np.asarray(update[name]).dtype)
    return out


# ---- adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
# Clipping" (NeurIPS 2021). Each round the clip follows a target quantile of the update norms, learned from a
# noised count of the updates that were not clipped. ----

def adaptive_delta_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier left for the deltas when the count is released with N(0, count_stddev^2), so both
    together cost what one Gaussian mechanism of `noise_multiplier` costs: z_delta = (z^-2 - (2 s)^-2)^(-1/2)."""
    rest = noise_multiplier ** -2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"noise_multiplier {noise_multiplier} needs count_stddev > {noise_multiplier / 2}")
    return rest ** -0.5


def next_clip(clip: float, unclipped: int, received: int, count_stddev: float, target_quantile: float,
              learning_rate: float, rng: np.random.Generator) -> tuple[float, float]:
    """Geometric update C <- C * exp(-eta (b - gamma)), b the noised share of updates with norm <= C.
    Returns (the next clip, b)."""
    share = (unclipped + rng.normal(0.0, count_stddev)) / max(1, received)
    return clip * math.exp(-learning_rate * (share - target_quantile)), share
