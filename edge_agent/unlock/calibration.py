"""Threshold for a target false-accept rate from genuine and impostor scores. Pure numpy, no I/O.

Unlock compares each face with the owner's template (mean_template) by the score the model declares
(model_zoo.backbones.model_score: cosine, or l2 = minus the euclidean distance of raw descriptors), so the threshold is calibrated on template trials: several random enrolments per identity
(draw_enrolments), each one's template scored against the identity's other images (genuine) and every other
identity's images (impostor) (template_trials). Averaging embeddings raises impostor scores, so a threshold
calibrated on image pairs (model_zoo.metrics.pair_scores) admits more false accepts than it promises. A trial
is accepted when its score is >= the threshold, as in model_zoo.metrics.roc_counts, under either score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from model_zoo.metrics import SCORES, normalize_rows, report_from_scores, roc_counts, score_matrix

ENROL_IMAGES = 5  # templates `facefed-agent enroll` keeps by default
ENROLMENT_DRAWS = 10  # random enrolments per identity when calibrating


def mean_template(embeddings, score: str = "cosine") -> np.ndarray:
    """The owner's template, one comparison per face: under cosine the L2-normalised mean of the normalised
    enrolment embeddings; under l2 the mean of the raw descriptors (the point nearest them all in L2)."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; available: {', '.join(SCORES)}")
    embeddings = normalize_rows(embeddings) if score == "cosine" else np.asarray(embeddings, dtype=np.float64)
    mean = embeddings.mean(axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12) if score == "cosine" else mean).astype(np.float32)


def draw_enrolments(labels, enrol_images: int = ENROL_IMAGES, draws: int = ENROLMENT_DRAWS,
                    seed: int = 0) -> list[np.ndarray]:
    """`draws` random sets of `enrol_images` image indices per identity, identities in label order.

    Each set is drawn independently (an identity with few images may repeat one). Only identities with more
    than enrol_images images get enrolments, so that one image at least is left as a genuine probe; the
    others still serve as impostors in template_trials."""
    if enrol_images < 1 or draws < 1:
        raise ValueError(f"enrol_images and draws must be >= 1, got {enrol_images} and {draws}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    enrolments = []
    for label in np.unique(labels):
        images = np.flatnonzero(labels == label)
        if len(images) > enrol_images:
            enrolments += [np.sort(rng.choice(images, enrol_images, replace=False)) for _ in range(draws)]
    if not enrolments:
        largest = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
        raise ValueError(f"template trials need an identity with more than {enrol_images} images (the enrolment "
                         f"plus a genuine probe); the largest has {largest}")
    return enrolments


def template_scores(embeddings, enrolments: list[np.ndarray], score: str = "cosine") -> np.ndarray:
    """[enrolments, images]: the score of each enrolment's template against every image."""
    emb = np.asarray(embeddings, dtype=np.float64)
    templates = np.stack([mean_template(emb[np.asarray(e)], score) for e in enrolments])
    return score_matrix(emb, templates, score)


def template_trials(embeddings, labels, enrolments: list[np.ndarray], score: str = "cosine"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(score, is-genuine) of every template trial: each enrolment's template against each image of the same
    identity outside the enrolment (genuine) and each image of every other identity (impostor); enrolments
    in order, images in index order within each."""
    labels = np.asarray(labels)
    scores = template_scores(embeddings, enrolments, score)
    owners = np.array([_owner(labels, e) for e in enrolments])
    genuine = labels[None, :] == owners[:, None]
    probe = np.ones_like(genuine)
    for row, enrolment in enumerate(enrolments):
        probe[row, enrolment] = False
    return scores[probe], genuine[probe]


def _owner(labels: np.ndarray, enrolment: np.ndarray):
    owner = np.unique(labels[np.asarray(enrolment)])
    if len(owner) != 1:
        raise ValueError(f"an enrolment must hold images of one identity, got labels {owner.tolist()}")
    return owner[0]


@dataclass(frozen=True)
class Calibration:
    threshold: float  # the lowest threshold whose false accepts stay within target_far, in `score`
    score: str  # what the threshold is on: "cosine", or "l2" (minus the euclidean distance)
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


def calibrate_threshold(scores, genuine, target_far: float, score: str = "cosine") -> Calibration:
    """The threshold that admits at most floor(target_far x impostor trials) false accepts, and its FAR/FRR;
    score names what the trial scores are (recorded with the threshold)."""
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
        threshold=float(thresholds[best]), score=score, target_far=float(target_far),
        far=accepted_fa / report.impostor_pairs, frr=1.0 - accepted_ta / report.genuine_pairs,
        genuine_trials=report.genuine_pairs, impostor_trials=report.impostor_pairs,
        false_accepts=accepted_fa, false_rejects=report.genuine_pairs - accepted_ta, eer=report.eer)

