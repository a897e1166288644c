"""Enrolment: read frames, keep the good ones (one face, large, sharp, frontal, eyes open), store the owner's
aligned chips and their embeddings in the template store."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

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


def rejection(faces: list[AnalyzedFace], gates: QualityGates) -> tuple[str, str] | None:
    """(why a frame is not good enough to enrol from, the measurement behind it), or None when it is good."""
    if not faces:
        return "no face", "the detector found none"
    if len(faces) > 1:
        return "several faces", f"{len(faces)} faces"
    face = faces[0]
    if face.box[2] < gates.min_face_px:
        return "face too small", f"{face.box[2]:.0f} px wide < {gates.min_face_px:.0f}"
    if (sharp := sharpness(face.chip)) < gates.min_sharpness:
        return "blurred", f"sharpness {sharp:.0f} < {gates.min_sharpness:.0f}"
    yaw, roll = yaw_ratio(face.landmarks), roll_degrees(face.landmarks)
    if abs(yaw) > gates.max_yaw or abs(roll) > gates.max_roll_deg:
        return "not frontal", (f"head turn {yaw:+.2f} (max {gates.max_yaw}), "
                               f"tilt {roll:+.0f} deg (max {gates.max_roll_deg:.0f})")
    if (ear := mean_eye_aspect_ratio(face.landmarks)) < gates.min_ear:
        return "eyes closed", f"eye openness {ear:.2f} < {gates.min_ear}"
    return None


@dataclass
class EnrolResult:
    enrolment: Enrolment
    frames: int
    rejected: Counter  # reason -> frames
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (frame or file name, reason), in order


def enroll(name: str, source: FrameSource, analyzer: FaceAnalyzer, store: TemplateStore, templates: int = ENROL_IMAGES,
           max_frames: int = 300, gates: QualityGates = QualityGates(), aligned: bool = False) -> EnrolResult:
    """Keep up to `templates` good frames, spread evenly over those seen (at most max_frames are read; a live
    source stops once it has four times the templates needed), and save them under `name`. aligned: the frames
    are ArcFace-aligned crops (FaceAnalyzer.analyze_aligned), not photos to find the face in."""
    validate_name(name)
    if templates < 1 or max_frames < 1:
        raise ValueError("templates and max_frames must be >= 1")
    good: list[AnalyzedFace] = []
    rejected: Counter = Counter()
    rejections: list[tuple[str, str]] = []
    frames = 0
    for frame in source:
        frames += 1
        faces, _ = analyzer.analyze_aligned(frame.rgb) if aligned else analyzer.analyze(frame.rgb)
        verdict = rejection(faces, gates)
        if verdict is None:
            good.append(faces[0])
        else:
            rejected[verdict[0]] += 1
            rejections.append((frame.name or f"frame {frame.index}", f"{verdict[0]} ({verdict[1]})"))
        if frames >= max_frames or (source.info.live and len(good) >= 4 * templates):
            break
    if not good:
        raise ValueError(f"no usable frame in {frames} from {source.info.description} (rejected: "
                         + "; ".join(f"{label}: {reason}" for label, reason in rejections[:20])
                         + ("; ..." if len(rejections) > 20 else "") + ")")
    keep = np.unique(np.linspace(0, len(good) - 1, min(templates, len(good))).round().astype(int))
    chosen = [good[i] for i in keep]
    enrolment = Enrolment(name, np.stack([f.chip for f in chosen]), np.stack([f.embedding for f in chosen]),
                          analyzer.model)
    store.save(enrolment)
    if len(chosen) < templates:
        log.warning("%s: only %d good frame(s) of the %d templates asked for", name, len(chosen), templates)
    return EnrolResult(enrolment, frames, rejected, rejections)

