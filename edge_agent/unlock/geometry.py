"""Measures on the 68 face landmarks (iBUG 300-W order, frame pixels): eye openness, head pose proxies, alignment.

Pure numpy, no I/O.
"""
from __future__ import annotations

import numpy as np

from model_zoo import align

# 0-based iBUG indices of each eye's six points: corner, two upper-lid points, corner, two lower-lid points.
EYES_68 = (slice(36, 42), slice(42, 48))
JAW_LEFT_68, JAW_RIGHT_68 = 0, 16  # jaw ends at the ears, image left and right
NOSE_TIP_68 = align.NOSE_TIP_68


def _points(landmarks68) -> np.ndarray:
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected [68, 2] landmarks, got shape {points.shape}")
    return points


def eye_aspect_ratio(eye: np.ndarray) -> float:
    """Soukupova & Cech (2016): (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|) for one eye's six points p1..p6.

    About 0.3 for an open eye, near 0 for a closed one; invariant to the face's scale and in-plane rotation.
    """
    eye = np.asarray(eye, dtype=np.float64)
    if eye.shape != (6, 2):
        raise ValueError(f"expected an eye's [6, 2] points, got shape {eye.shape}")
    width = np.linalg.norm(eye[0] - eye[3])
    if width == 0:
        raise ValueError("eye corners coincide: the eye aspect ratio is undefined")
    return float((np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])) / (2.0 * width))


def mean_eye_aspect_ratio(landmarks68) -> float:
    """Both eyes' EAR averaged: a blink closes both, a wink or a landmark slip moves one."""
    points = _points(landmarks68)
    return float(np.mean([eye_aspect_ratio(points[eye]) for eye in EYES_68]))


def yaw_ratio(landmarks68) -> float:
    """Head turn proxy in [-1, 1]: where the nose tip sits between the jaw ends, 0 when frontal.

    (x_nose - x_mid) / (half the jaw width), measured along the line between the jaw ends so that in-plane
    rotation does not count; its sign says which way the head turned (image left is negative).
    """
    points = _points(landmarks68)
    left, right = points[JAW_LEFT_68], points[JAW_RIGHT_68]
    axis = right - left
    half_width = np.linalg.norm(axis) / 2.0
    if half_width == 0:
        raise ValueError("jaw ends coincide: the yaw ratio is undefined")
    along = float(np.dot(points[NOSE_TIP_68] - (left + right) / 2.0, axis / (2.0 * half_width)))
    return along / half_width


def roll_degrees(landmarks68) -> float:
    """In-plane rotation: the angle of the line through the two eye centres, 0 when level."""
    points = _points(landmarks68)
    dx, dy = points[EYES_68[1]].mean(axis=0) - points[EYES_68[0]].mean(axis=0)
    return float(np.degrees(np.arctan2(dy, dx)))

