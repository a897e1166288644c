"""Face verification and identification metrics over embeddings (pure numpy).

Verification uses every pair i < j (or, the way unlock compares, every gallery-vs-probe pair) scored by
cosine similarity or minus the L2 distance of the raw vectors; a pair is accepted as "same person"
when its score is >= the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


@dataclass
class VerificationReport:
    genuine_pairs: int
    impostor_pairs: int
    # Best-threshold verification accuracy on a balanced pair set, (TAR + TRR) / 2: all-pairs accuracy
    # would be dominated by impostor pairs (rejecting everything scores 0.9 with 10 identities).
    accuracy: float
    threshold: float  # the threshold reaching it (highest one on ties)
    pair_accuracy: float  # accuracy over all pairs at that threshold, for reference
    eer: float  # equal error rate, linearly interpolated where FPR crosses FNR
    # max TPR with FPR <= FAR; with fewer than 1/FAR impostor pairs that means zero false accepts, and it
    # is 0.0 when even the single best-scored pair is an impostor
    tar_at_far: dict[str, float]
    fpr: np.ndarray = field(repr=False)  # ROC, from (0, 0) up to (1, 1)
    tpr: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"genuine_pairs": self.genuine_pairs, "impostor_pairs": self.impostor_pairs,
                "accuracy": self.accuracy, "threshold": self.threshold, "pair_accuracy": self.pair_accuracy,
                "eer": self.eer,
                "tar_at_far": dict(self.tar_at_far)}


def far_key(far: float) -> str:
    """1e-2 -> '1e-2' (the tar_at_far key)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def normalize_rows(embeddings) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def pair_scores(embeddings, labels, score: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(score, is-genuine) for every pair i < j (score: see gallery_pair_scores)."""
    emb = np.asarray(embeddings)
    labels = np.asarray(labels)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
    if labels.shape != (len(emb),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(emb)} embeddings")
    scores, genuine = gallery_pair_scores(emb, labels, emb, labels, score)
    i, j = np.triu_indices(len(emb), k=1)
    flat = i * len(emb) + j  # row = probe i, column = gallery j
    return scores[flat], genuine[flat]


SCORES = ("cosine", "l2")


def score_matrix(gallery, probes, score: str = "cosine") -> np.ndarray:
    """[probes, gallery] scores, higher = more alike: "cosine" compares directions; "l2" is minus the euclidean
    distance of the vectors as given (raw, unnormalised descriptors: face-api's own comparison)."""
    if score == "cosine":
        return normalize_rows(probes) @ normalize_rows(gallery).T
    if score == "l2":
        gallery, probes = np.asarray(gallery, np.float64), np.asarray(probes, np.float64)
        squared = (probes ** 2).sum(1)[:, None] + (gallery ** 2).sum(1)[None, :] - 2.0 * probes @ gallery.T
        return -np.sqrt(np.maximum(squared, 0.0))
    raise ValueError(f"unknown score {score!r}; available: {', '.join(SCORES)}")


def gallery_pair_scores(gallery, gallery_labels, probes, probe_labels, score: str = "cosine"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(score, is-genuine) for every gallery-vs-probe pair, the pairs unlock compares (score: score_matrix)."""
    gallery_labels, probe_labels = np.asarray(gallery_labels), np.asarray(probe_labels)
    scores = score_matrix(gallery, probes, score)
    if gallery_labels.shape != (scores.shape[1],) or probe_labels.shape != (scores.shape[0],):
        raise ValueError("gallery and probe labels must have one entry per embedding")
    return scores.ravel(), (probe_labels[:, None] == gallery_labels[None, :]).ravel()


def roc_counts(scores: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, false accepts, true accepts) for 'accept all above the top score' and then each unique score.

    Sorting once and taking cumulative counts at the last position of each distinct score evaluates every
    threshold in O(n log n); tied genuine and impostor scores are accepted together, as a threshold must.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_accepts = np.cumsum(genuine[order])
    false_accepts = np.arange(1, len(scores) + 1) - true_accepts
    last_of_value = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    reject_all = np.nextafter(sorted_scores[0], np.inf)
    return (np.r_[reject_all, sorted_scores[last_of_value]],
            np.r_[0, false_accepts[last_of_value]], np.r_[0, true_accepts[last_of_value]])


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """FPR where it equals FNR, interpolating linearly between the two ROC points that bracket the crossing."""
    gap = fpr - (1.0 - tpr)  # rises from -1 at (0, 0) to +1 at (1, 1)
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0:
        return float(fpr[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def report_from_scores(scores, genuine, fars=DEFAULT_FARS) -> VerificationReport:
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine, dtype=bool)
    num_genuine, num_impostor = int(genuine.sum()), int((~genuine).sum())
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"verification needs genuine and impostor pairs, got {num_genuine} and {num_impostor} "
                         "(every identity needs >= 2 images, and >= 2 identities)")
    thresholds, false_accepts, true_accepts = roc_counts(scores, genuine)
    fpr, tpr = false_accepts / num_impostor, true_accepts / num_genuine
    balanced = (tpr + 1.0 - fpr) / 2.0
    best = int(np.argmax(balanced >= balanced.max() - 1e-12))  # ties (up to rounding) go to the higher threshold
    correct = true_accepts[best] + (num_impostor - false_accepts[best])
    # Compare counts, not rates, so FAR 1e-2 over 100 impostor pairs admits exactly 1 false accept.
    tar = {far_key(far): float(tpr[false_accepts <= np.floor(far * num_impostor + 1e-9)].max()) for far in fars}
    return VerificationReport(genuine_pairs=num_genuine, impostor_pairs=num_impostor,
                              accuracy=float(balanced[best]), threshold=float(thresholds[best]),
                              pair_accuracy=float(correct / len(scores)),
                              eer=equal_error_rate(fpr, tpr), tar_at_far=tar, fpr=fpr, tpr=tpr)


def verification_report(embeddings, labels, fars=DEFAULT_FARS, score: str = "cosine") -> VerificationReport:
    scores, genuine = pair_scores(embeddings, labels, score)
    return report_from_scores(scores, genuine, fars)


def rank1_accuracy(embeddings, labels) -> float:
    """Closed-set identification: each identity's first image is enrolled, every later image is a probe."""
    emb = normalize_rows(embeddings)
    labels = np.asarray(labels)
    gallery_labels, gallery_idx = np.unique(labels, return_index=True)
    probes = np.setdiff1d(np.arange(len(labels)), gallery_idx)
    if len(probes) == 0:
        raise ValueError("rank-1 needs an identity with >= 2 images (none has a probe)")
    nearest = np.argmax(emb[probes] @ emb[gallery_idx].T, axis=1)
    return float(np.mean(gallery_labels[nearest] == labels[probes]))
