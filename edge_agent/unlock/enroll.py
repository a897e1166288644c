"""Enrolment: read frames, keep the good ones (one face, large, sharp, frontal, eyes open), store the owner's
aligned chips and their embeddings in the template store."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from .analyzer import AnalyzedFace, FaceAnalyzer
from .calibration import ENROL_IMAGES
from .geometry import mean_eye_aspect_ratio, roll_degrees, yaw_ratio
from .sources import FrameSource
from .store import Enrolment, TemplateStore, validate_name

log = logging.getLogger("facefed.unlock")


@dataclass(frozen=True)
class QualityGates:
    min_face_px: float = 60.0  # detector box width in frame pixels
    # Variance of the Laplacian of the grey 112x112 chip: 150-900 on sharp Yale frames, 15-50 once blurred
    # with a 3-pixel Gaussian.
    min_sharpness: float = 80.0
    max_yaw: float = 0.25  # |geometry.yaw_ratio|: about 15 degrees of head turn
    max_roll_deg: float = 20.0
    min_ear: float = 0.18  # eyes open


def sharpness(chip: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def rejection(faces: list[AnalyzedFace], gates: QualityGates) -> str | None:
    """Why a frame is not good enough to enrol from, or None when it is."""
    if not faces:
        return "no face"
    if len(faces) > 1:
        return "several faces"
    face = faces[0]
    if face.box[2] < gates.min_face_px:
        return "face too small"
    if sharpness(face.chip) < gates.min_sharpness:
        return "blurred"
    if abs(yaw_ratio(face.landmarks)) > gates.max_yaw or abs(roll_degrees(face.landmarks)) > gates.max_roll_deg:
        return "not frontal"
    if mean_eye_aspect_ratio(face.landmarks) < gates.min_ear:
        return "eyes closed"
    return None


@dataclass
class EnrolResult:
    enrolment: Enrolment
    frames: int
    rejected: Counter  # reason -> frames


def enroll(name: str, source: FrameSource, analyzer: FaceAnalyzer, store: TemplateStore, templates: int = ENROL_IMAGES,
           max_frames: int = 300, gates: QualityGates = QualityGates()) -> EnrolResult:
    """Keep up to `templates` good frames, spread evenly over those seen (at most max_frames are read; a live
    source stops once it has four times the templates needed), and save them under `name`."""
    validate_name(name)
    if templates < 1 or max_frames < 1:
        raise ValueError("templates and max_frames must be >= 1")
    good: list[AnalyzedFace] = []
    rejected: Counter = Counter()
    frames = 0
    for frame in source:
        frames += 1
        faces, _ = analyzer.analyze(frame.rgb)
        reason = rejection(faces, gates)
        if reason is None:
            good.append(faces[0])
        else:
            rejected[reason] += 1
        if frames >= max_frames or (source.info.live and len(good) >= 4 * templates):
            break
    if not good:
        raise ValueError(f"no usable frame in {frames} from {source.info.description} "
                         f"(rejected: {_reasons(rejected)})")
    keep = np.unique(np.linspace(0, len(good) - 1, min(templates, len(good))).round().astype(int))
    chosen = [good[i] for i in keep]
    enrolment = Enrolment(name, np.stack([f.chip for f in chosen]), np.stack([f.embedding for f in chosen]),
                          analyzer.model)
    store.save(enrolment)
    if len(chosen) < templates:
        log.warning("%s: only %d good frame(s) of the %d templates asked for", name, len(chosen), templates)
    return EnrolResult(enrolment, frames, rejected)


def _reasons(rejected: Counter) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in rejected.most_common()) or "none"
