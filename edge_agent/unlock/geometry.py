"""Measures on either landmark set, in frame pixels: the 68 points (iBUG 300-W order) or the Face Mesh's 468
(x, y, z): eye openness, head pose, in-plane rotation. Sets are told apart by their point count.

Pure numpy, no I/O.
"""
from __future__ import annotations

import numpy as np

from model_zoo import align
from model_zoo.vision import facemesh

# 0-based iBUG indices of each eye's six points: corner, two upper-lid points, corner, two lower-lid points.
EYES_68 = (slice(36, 42), slice(42, 48))
EYES_MESH = (list(facemesh.RIGHT_EYE), list(facemesh.LEFT_EYE))  # the same six roles on the mesh's eyelids
JAW_LEFT_68, JAW_RIGHT_68 = 0, 16  # jaw ends at the ears, image left and right
NOSE_TIP_68 = align.NOSE_TIP_68


def _points(landmarks) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if not (points.shape == (68, 2) or (points.ndim == 2 and points.shape[0] == facemesh.POINTS
                                         and points.shape[1] in (2, 3))):
        raise ValueError(f"expected [68, 2] or [468, 2|3] landmarks, got shape {points.shape}")
    return points


def _is_mesh(points: np.ndarray) -> bool:
    return len(points) == facemesh.POINTS


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


def mean_eye_aspect_ratio(landmarks) -> float:
    """Both eyes' EAR averaged: a blink closes both, a wink or a landmark slip moves one."""
    points = _points(landmarks)
    eyes = EYES_MESH if _is_mesh(points) else EYES_68
    return float(np.mean([eye_aspect_ratio(points[eye, :2]) for eye in eyes]))


def yaw_ratio(landmarks) -> float:
    """Head turn in [-1, 1], 0 when frontal, negative when the nose turns towards image left.

    68 points: where the nose tip sits between the jaw ends, (x_nose - x_mid) / (half the jaw width), measured
    along the line between the jaw ends so that in-plane rotation does not count. Mesh: the sine of the yaw from
    its 3-D pose, the depth difference of the face's two sides at ear height over their distance (the side that
    turns away from the camera gets deeper).
    """
    points = _points(landmarks)
    if _is_mesh(points):
        if points.shape[1] != 3:
            raise ValueError("the mesh's head turn needs its depth: pass [468, 3] landmarks")
        left, right = points[list(facemesh.FACE_SIDES)]
        axis = right - left
        length = np.linalg.norm(axis)
        if length == 0:
            raise ValueError("the face sides coincide: the yaw is undefined")
        return float(axis[2] / length)
    left, right = points[JAW_LEFT_68], points[JAW_RIGHT_68]
    axis = right - left
    half_width = np.linalg.norm(axis) / 2.0
    if half_width == 0:
        raise ValueError("jaw ends coincide: the yaw ratio is undefined")
    along = float(np.dot(points[NOSE_TIP_68] - (left + right) / 2.0, axis / (2.0 * half_width)))
    return along / half_width


def roll_degrees(landmarks) -> float:
    """In-plane rotation: the angle of the line through the two eye centres, 0 when level."""
    points = _points(landmarks)
    dx, dy = np.subtract(*align.five_points(points)[[1, 0]])
    return float(np.degrees(np.arctan2(dy, dx)))
