"""What a device claims about its update (n_k, train loss), bounded before it can weigh on the global model.

Pure functions, no I/O. n_k arrives as a JSON integer already range-checked by fedwire (at most
MAX_NUM_SAMPLES, compared as an integer); here the fleet's own cap, `max_samples_per_update`, and the
weighting policy decide what the claim is worth (PROTOCOL.md 4.2.1):

| weighting | weight of an update | a claim above the cap |
|---|---|---|
| samples (default) | n_k, as FedAvg defines it | rejected, with the reason in the ack |
| capped | min(n_k, cap) | clamped to the cap, logged |
| uniform | 1 (TFF's UNIFORM, Flower without n_k) | clamped to the cap, logged (it weighs nothing) |

median and trimmed_mean ignore the weight altogether (strategies/base.py BufferedStrategy); clipping
bounds the step, the cap bounds the weight.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from aggregator.validation import UpdateRejected
from fedwire.messages import brief_int

WEIGHTINGS = ("samples", "capped", "uniform")


@dataclass(frozen=True)
class SampleCount:
    """One update's n_k as the round records it and the weight it enters the sums with."""

    n_k: int
    weight: int
    clamped_from: int | None = None  # the claim, when it was above the cap


def bound_sample_count(claimed: int, weighting: str, cap: int) -> SampleCount:
    """The update's n_k and weight under `weighting`; UpdateRejected when the policy refuses the claim."""
    if claimed <= 0:
        raise UpdateRejected("num_samples must be positive")
    clamped_from = None
    if claimed > cap:
        if weighting == "samples":
            raise UpdateRejected(f"num_samples {brief_int(claimed)} is above max_samples_per_update {cap} "
                                 "(weighting: samples refuses the claim)")
        claimed, clamped_from = cap, claimed
    return SampleCount(claimed, 1 if weighting == "uniform" else claimed, clamped_from)


def clamp_note(count: SampleCount, cap: int) -> str:
    """The logged reason of a clamp ("" when the claim was taken as it is)."""
    if count.clamped_from is None:
        return ""
    return f"claimed num_samples {brief_int(count.clamped_from)} clamped to max_samples_per_update {cap}"


def claimed_loss(losses: Mapping[str, float]) -> float | None:
    """The round's train loss from the devices' claims: their median, so one device cannot set it
    (an n_k-weighted mean would let the largest claim decide)."""
    return statistics.median(losses.values()) if losses else None
