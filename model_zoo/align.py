"""Face alignment geometry: similarity transforms from landmarks to a template, templates, and the warp.

Coordinates are (x, y) in pixel-index units (pixel (0, 0) has its centre at (0, 0)), the convention of
cv2.warpAffine, of insightface's ArcFace template and of dlib's chip points.

Templates
- ARCFACE_112: insightface's 5-point template for 112x112 ArcFace crops (left eye, right eye, nose tip,
  left mouth corner, right mouth corner; "left" = image left).
- dlib 150x150 chip (what the face-api / dlib ResNet descriptor was trained on): dlib's
  `get_face_chip_details(det, size=150, padding=0.25)` (as used by dlib's face recognition example)
  maps its mean face shape (68-point landmarks 17..67, unit square) into the chip with
  p_chip = (padding + p_mean) / (1 + 2 * padding) * size, and fits the similarity transform on the
  nose (27..35), eyes (36..47) and upper lip (48..54, 60..64) only: eyebrows, jaw and lower lip move
  too much. dlib_mean_shape68 / DLIB_CHIP_INDICES reproduce that; dlib_chip_5points() reduces the same
  mean shape to 5 points. dlib then resamples through a centred rotated rectangle, which differs from
  warping with the fitted similarity directly (done here) by under a pixel at size 150.
"""

from __future__ import annotations

import cv2
import numpy as np

from .vision import facemesh

ARCFACE_SIZE = 112
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

# Where the mesh's five points (five_points_from_mesh) fall on faces aligned to ARCFACE_112: the median over 554
# celeb-dev crops of its first six people in name order (every 5th image; bench/vision_bench.py scores EER on all
# twelve, bench/unlock_bench.py calibrates on these six), BlazeFace + Face Mesh on the crops as they are. The mesh's
# nose tip sits 5.6 px below ARCFACE_112's and its mouth corners 2.8 px above: fitting the mesh's points onto
# ARCFACE_112 itself would shrink every face vertically (measured: celeb-dev EER 5.6 % against 2.9 %, smoke run).
MESH_ARCFACE_112 = np.array(
    [[37.77, 53.08], [73.9, 52.9], [55.66, 77.35], [40.87, 89.67], [71.29, 89.48]], dtype=np.float64,
)

DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25

# dlib's mean face shape for the 68-point landmarks 17..67, in a unit square (dlib get_face_chip_details).
_DLIB_MEAN_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
    0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
    0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
    0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
    0.42689,
)
_DLIB_MEAN_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
    0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
    0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
    0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
    0.831803, 0.824182,
)
_DLIB_FIRST_POINT = 17

# 68-point indices (iBUG 300-W order, 0-based) used for the 5-point reduction.
RIGHT_EYE_68 = slice(36, 42)  # subject's right eye = image left
LEFT_EYE_68 = slice(42, 48)
NOSE_TIP_68 = 30
MOUTH_CORNERS_68 = (48, 54)

DLIB_CHIP_INDICES = np.array(
    [i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)], dtype=np.int64
)


def dlib_mean_shape68(size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """dlib's mean face for landmarks 17..67 placed in a size x size chip: [68, 2], rows 0..16 (jaw) NaN."""
    shape = np.full((68, 2), np.nan)
    mean = np.stack([_DLIB_MEAN_X, _DLIB_MEAN_Y], axis=1)
    shape[_DLIB_FIRST_POINT:] = (padding + mean) / (1 + 2 * padding) * size
    return shape


def five_points_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """68 landmarks -> [5, 2] in ArcFace order: eye centres (image left, right), nose tip, mouth corners."""
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected [68, 2] landmarks, got shape {points.shape}")
    return np.stack([
        points[RIGHT_EYE_68].mean(axis=0),
        points[LEFT_EYE_68].mean(axis=0),
        points[NOSE_TIP_68],
        points[MOUTH_CORNERS_68[0]],
        points[MOUTH_CORNERS_68[1]],
    ])


def five_points_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """Face Mesh [468, 2|3] -> [5, 2] in ArcFace order: eye centres (mean of each eye's corners and lid middles,
    image left first), nose tip, mouth corners."""
    points = np.asarray(mesh, dtype=np.float64)
    if points.shape[0] != facemesh.POINTS or points.ndim != 2:
        raise ValueError(f"expected [{facemesh.POINTS}, 2|3] mesh landmarks, got shape {points.shape}")
    points = points[:, :2]
    return np.stack([
        points[list(facemesh.RIGHT_EYE_CONTOUR)].mean(axis=0),
        points[list(facemesh.LEFT_EYE_CONTOUR)].mean(axis=0),
        points[facemesh.NOSE_TIP],
        points[facemesh.MOUTH_CORNERS[0]],
        points[facemesh.MOUTH_CORNERS[1]],
    ])


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Either landmark set (68-point [68, 2] or mesh [468, 2|3]) -> the [5, 2] ArcFace-order points."""
    landmarks = np.asarray(landmarks)
    return five_points_from_mesh(landmarks) if len(landmarks) == facemesh.POINTS else five_points_from_68(landmarks)


def dlib_chip_5points(size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """The dlib chip geometry as a 5-point template, reduced from its mean shape like real landmarks."""
    return five_points_from_68(dlib_mean_shape68(size, padding))


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) with dst ~ M @ [src; 1].

    Umeyama (1991): closed form from the SVD of the cross-covariance of the centred point sets.
    Returns the 2x3 matrix M, ready for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var == 0:
        raise ValueError("source points are all identical: no similarity transform is defined")
    u, sigma, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    # Flip the weakest axis if the best orthogonal map is a reflection: faces are never mirrored.
    sign = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / src_var
    linear = scale * rotation
    return np.hstack([linear, (dst_mean - linear @ src_mean)[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map [N, 2] points through a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int,
         border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Resample image into a size x size output through the 2x3 image->output matrix (bilinear)."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=border)


def dlib_chip_transform(landmarks: np.ndarray, size: int = DLIB_CHIP_SIZE,
                        padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """Image -> dlib chip similarity: from 68 landmarks on the same subset as dlib's get_face_chip_details; from
    the mesh (no 68-point correspondence) on its 5 points against the chip's 5-point template."""
    points = np.asarray(landmarks, dtype=np.float64)
    if len(points) == facemesh.POINTS:  # through the ArcFace frame, where the mesh's own template is measured
        chip_template = apply_transform(arcface_to_dlib_transform(chip_size=size, padding=padding), MESH_ARCFACE_112)
        return estimate_similarity(five_points_from_mesh(points), chip_template)
    if points.shape != (68, 2):
        raise ValueError(f"expected [68, 2] or [468, 2|3] landmarks, got shape {points.shape}")
    return estimate_similarity(points[DLIB_CHIP_INDICES], dlib_mean_shape68(size, padding)[DLIB_CHIP_INDICES])


def arcface_transform(landmarks: np.ndarray) -> np.ndarray:
    """Image -> 112x112 ArcFace crop similarity, fitted on the 5 points of either landmark set (the mesh's onto
    MESH_ARCFACE_112): the input every backbone (MobileFaceNet, faceapi-resnet) and every export of one expects."""
    landmarks = np.asarray(landmarks)
    template = MESH_ARCFACE_112 if len(landmarks) == facemesh.POINTS else ARCFACE_112
    return estimate_similarity(five_points(landmarks), template)


def arcface_to_dlib_transform(arcface_size: int = ARCFACE_SIZE, chip_size: int = DLIB_CHIP_SIZE,
                              padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """ArcFace crop -> dlib chip similarity, fitted between the two 5-point templates.

    A crop aligned to ARCFACE_112 (scaled to arcface_size) then lands where dlib's alignment would have
    put the face, up to the two templates' own disagreement: no landmarks needed.
    """
    arcface = ARCFACE_112 * (arcface_size / ARCFACE_SIZE)
    return estimate_similarity(arcface, dlib_chip_5points(chip_size, padding))
