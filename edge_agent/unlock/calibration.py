"""Threshold for a target false-accept rate from genuine and impostor scores. Pure numpy, no I/O.

Scores are cosine similarities of every pair (model_zoo.metrics.pair_scores); a pair is accepted when its
score is >= the threshold, as in model_zoo.metrics.roc_counts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from model_zoo.metrics import report_from_scores, roc_counts


@dataclass(frozen=True)
class Calibration:
    threshold: float  # the lowest threshold whose false accepts stay within target_far
    target_far: float
    far: float  # measured at the threshold
    frr: float
    genuine_trials: int
    impostor_trials: int
    false_accepts: int
    false_rejects: int
    eer: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_threshold(scores, genuine, target_far: float) -> Calibration:
    """The threshold that admits at most floor(target_far x impostor trials) false accepts, and its FAR/FRR."""
    if not 0 < target_far < 1:
        raise ValueError(f"target_far must be in (0, 1), got {target_far}")
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine, dtype=bool)
    report = report_from_scores(scores, genuine)  # also checks both kinds of trials are present
    thresholds, false_accepts, true_accepts = roc_counts(scores, genuine)
    allowed = int(np.floor(target_far * report.impostor_pairs + 1e-9))
    # false_accepts rises as the threshold falls: take the last (lowest) threshold still within the budget.
    best = int(np.flatnonzero(false_accepts <= allowed)[-1])
    accepted_fa, accepted_ta = int(false_accepts[best]), int(true_accepts[best])
    return Calibration(
        threshold=float(thresholds[best]), target_far=float(target_far),
        far=accepted_fa / report.impostor_pairs, frr=1.0 - accepted_ta / report.genuine_pairs,
        genuine_trials=report.genuine_pairs, impostor_trials=report.impostor_pairs,
        false_accepts=accepted_fa, false_rejects=report.genuine_pairs - accepted_ta, eer=report.eer)


def error_rates_at(scores, genuine, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) of accepting score >= threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine, dtype=bool)
    accepted = scores >= threshold
    return float(accepted[~genuine].mean()), float((~accepted[genuine]).mean())
