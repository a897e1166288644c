"""Face Mesh (MediaPipe face_landmark): 468 3-D landmarks from a face crop, with the crop rules around it.

Crop rule (as MediaPipe's face_landmark_front graph documents it): a square centred on the detection box,
1.5x its longer side (a 25 % margin each way), rotated so that the eyes are level (the angle of the line from
the subject's right eye to the left eye keypoint); without keypoints (a detector that has none, or a whole
image taken as the face) the crop is upright. The crop is resampled to 192x192 RGB in [0, 1]; the net returns
468 (x, y, z) in crop pixels (z: depth, same scale as x, smaller towards the camera) and a face-presence logit.
Points are mapped back to frame pixels through the inverse of the crop transform.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import load_model

FILE_NAME = "face_landmark.tflite"
POINTS = 468
CROP_SCALE = 1.5

# Mesh indices (subject's right = image left on an unmirrored frame).
RIGHT_EYE = (33, 160, 158, 133, 153, 144)  # p1..p6 of the eye aspect ratio: corner, upper lid x2, corner, lower x2
LEFT_EYE = (362, 385, 387, 263, 373, 380)
RIGHT_EYE_CONTOUR = (33, 133, 159, 145)  # corners, upper and lower lid middle: the eye centre for alignment
LEFT_EYE_CONTOUR = (263, 362, 386, 374)
NOSE_TIP = 1
MOUTH_CORNERS = (61, 291)  # image left, image right
FACE_SIDES = (234, 454)  # the face oval at ear height, image left and right: the head-turn axis


def crop_transform(box: tuple[float, float, float, float], eyes: np.ndarray | None, size: int,
                   scale: float = CROP_SCALE) -> np.ndarray:
    """2x3 frame -> crop matrix of the rotated square crop around box (x, y, w, h); eyes: [2, 2] right, left."""
    x, y, w, h = box
    centre = np.array([x + w / 2.0, y + h / 2.0])
    angle = 0.0 if eyes is None else float(np.arctan2(eyes[1][1] - eyes[0][1], eyes[1][0] - eyes[0][0]))
    side = max(w, h) * scale
    cos, sin = np.cos(angle), np.sin(angle)
    # Crop axes in the frame: u along the eye line, v perpendicular (down the face).
    u, v = np.array([cos, sin]), np.array([-sin, cos])
    k = size / side
    linear = k * np.stack([u, v])
    return np.hstack([linear, (size / 2.0 - linear @ centre)[:, None]])


class FaceMesh:
    """landmarks(frame, box, eyes) -> ([468, 3] frame pixels, face presence in [0, 1])."""

    def __init__(self, threads: int = 1, root=None) -> None:
        self.model = load_model(FILE_NAME, root, threads)
        self.size = self.model.input_size

    def landmarks(self, frame: np.ndarray, box: tuple[float, float, float, float],
                  eyes: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        matrix = crop_transform(box, eyes, self.size)
        crop = cv2.warpAffine(frame, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)
        outputs = self.model((crop.astype(np.float32) / 255.0)[None])
        points, presence = sorted(outputs, key=lambda o: o.size, reverse=True)  # [1,1,1,1404], [1,1,1,1]
        points = points.reshape(POINTS, 3).astype(np.float64)
        inverse = cv2.invertAffineTransform(matrix)
        frame_points = np.empty_like(points)
        frame_points[:, :2] = points[:, :2] @ inverse[:, :2].T + inverse[:, 2]
        frame_points[:, 2] = points[:, 2] / np.hypot(*matrix[0, :2])  # crop -> frame scale
        return frame_points, float(1.0 / (1.0 + np.exp(-float(presence.ravel()[0]))))
