"""Face pipeline on the face-api nets: detect -> 68 landmarks -> dlib chip alignment -> 128-d descriptor.

Two routes to a descriptor:
- full frames (`detect`): TinyFaceDetector boxes; the landmark net runs on each box crop and its points
  are mapped back to the frame (face-api's detectLandmarks on extracted faces); the frame is warped
  into the 150x150 dlib chip by a similarity fitted on those landmarks (align.dlib_chip_transform).
- already aligned crops (`embed_aligned_crops`, e.g. 112x112 ArcFace-aligned celeb-dev): one fixed
  similarity maps the ArcFace template onto the dlib chip template (align.arcface_to_dlib_transform);
  the part of the chip outside the crop is filled by border replication. A plain resize would put the
  face at the wrong scale and position for the descriptor net.

Descriptors are face-api's raw (unnormalised) 128-d vectors: face-api compares them by euclidean
distance (same person below ~0.6); L2-normalise before cosine or euclidean verification metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import align
from .faceapi import FaceApiModels, FaceDetection, detect_faces, load_faceapi_models
from .faceapi import landmarks as faceapi_landmarks

EMBEDDERS = ("faceapi",)
DESCRIPTOR_DIM = 128


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in frame pixels (detector output)
    score: float
    landmarks68: np.ndarray  # float64 [68, 2] (x, y) frame pixels
    chip: np.ndarray  # uint8 [150, 150, 3] RGB dlib-aligned chip
    embedding: np.ndarray  # float32 [128] raw face-api descriptor


def crop_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """face-api extractFaces: floor the box, clip it to the frame -> integer (x0, y0, x1, y1)."""
    x, y, w, h = (int(np.floor(v)) for v in box)
    x0, y0 = max(x, 0), max(y, 0)
    return x0, y0, min(x + w, width), min(y + h, height)


def whole_image_box(image: np.ndarray) -> tuple[float, float, float, float]:
    """The face box of an image the detector finds no face in: the whole image. Detectors miss faces that fill
    the image (tight crops), and the landmark net still places them; every "best face, else the whole image"
    route (training, evaluation, distillation, unlock enrolment) falls back to this box."""
    height, width = image.shape[:2]
    return 0.0, 0.0, float(width), float(height)


def _as_image_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


class FacePipeline:
    def __init__(self, models: FaceApiModels | None = None, embedder: str = "faceapi", *,
                 detector_input_size: int = 320, score_threshold: float = 0.5, batch_size: int = 64) -> None:
        if embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {embedder!r}; available: {', '.join(EMBEDDERS)}")
        if detector_input_size % 32:
            raise ValueError(f"detector_input_size must be a multiple of 32, got {detector_input_size}")
        self.models = models if models is not None else load_faceapi_models()
        self.embedder = embedder
        self.detector_input_size = detector_input_size
        self.score_threshold = score_threshold
        self.batch_size = batch_size

    # --- stages ---

    def landmarks_in_boxes(self, frame: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """[K, 68, 2] frame-pixel landmarks: the landmark net on each (floored, clipped) box crop."""
        height, width = frame.shape[:2]
        crops = [crop_box(box, height, width) for box in boxes]
        if any(x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in crops):
            raise ValueError(f"a face box lies outside the {width}x{height} frame: {boxes}")
        batch = torch.cat([faceapi_landmarks.preprocess(frame[y0:y1, x0:x1]) for x0, y0, x1, y1 in crops])
        with torch.no_grad():
            outputs = self.models.landmarks(batch)
        # The net's points are relative to its crop: shift them back by the crop origin.
        return np.stack([faceapi_landmarks.to_pixel_coords(out, y1 - y0, x1 - x0) + (x0, y0)
                         for out, (x0, y0, x1, y1) in zip(outputs, crops)])

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """Raw descriptors [N, 128] of uint8 150x150 dlib-aligned chips, batch_size at a time."""
        chips = _as_image_batch(chips)
        size = align.DLIB_CHIP_SIZE
        if chips.shape[1:3] != (size, size):
            raise ValueError(f"chips must be {size}x{size}, got {chips.shape[1]}x{chips.shape[2]}")
        out = np.empty((len(chips), DESCRIPTOR_DIM), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(chips), self.batch_size):
                # At 150x150 face-api's input step is the identity (no padding, no resize): NHWC -> NCHW.
                batch = torch.from_numpy(chips[start:start + self.batch_size]).permute(0, 3, 1, 2).float()
                out[start:start + len(batch)] = self.models.recognition(batch).numpy()
        return out

    # --- routes ---

    def locate(self, frame: np.ndarray) -> tuple[list[FaceDetection], np.ndarray]:
        """Detections, best score first, and their [K, 68, 2] frame-pixel landmarks (no alignment, no embedding)."""
        detections = detect_faces(self.models.detector, frame, self.detector_input_size, self.score_threshold)
        detections = sorted(detections, key=lambda d: -d.score)
        if not detections:
            return [], np.empty((0, 68, 2))
        return detections, self.landmarks_in_boxes(frame, [d.box for d in detections])

    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        """Every face in a uint8 RGB frame, best score first, each aligned and described."""
        frame = _as_image_batch(frame_rgb[None])[0]
        detections, landmarks = self.locate(frame)
        if not detections:
            return []
        chips = np.stack([self.chip_from_landmarks(frame, points) for points in landmarks])
        embeddings = self.embed_chips(chips)
        return [Face(d.box, d.score, points, chip, emb)
                for d, points, chip, emb in zip(detections, landmarks, chips, embeddings)]

    def primary_landmarks(self, image: np.ndarray) -> np.ndarray:
        """[68, 2] landmarks of the best-scoring face of an image, else of the whole image (whole_image_box)."""
        detections, landmarks = self.locate(image)
        if detections:
            return landmarks[0]
        return self.landmarks_in_boxes(image, [whole_image_box(image)])[0]

    @staticmethod
    def chip_from_landmarks(frame: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
        return align.warp(frame, align.dlib_chip_transform(landmarks68), align.DLIB_CHIP_SIZE)

    @staticmethod
    def reframe_aligned_crops(images: np.ndarray) -> np.ndarray:
        """ArcFace-aligned square crops (any size) -> dlib chips by the template-to-template similarity."""
        images = _as_image_batch(images)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"aligned crops must be square, got {images.shape[1]}x{images.shape[2]}")
        matrix = align.arcface_to_dlib_transform(arcface_size=images.shape[1])
        return np.stack([align.warp(image, matrix, align.DLIB_CHIP_SIZE) for image in images])

    def embed_aligned_crops(self, images: np.ndarray) -> np.ndarray:
        """Raw descriptors [N, 128] of ArcFace-aligned crops (e.g. 112x112), re-framed to the dlib chip."""
        return self.embed_chips(self.reframe_aligned_crops(images))

    @staticmethod
    def arcface_crop(frame: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
        """The 112x112 ArcFace-aligned crop every backbone (MobileFaceNet, faceapi-resnet) and export expects."""
        return align.warp(frame, align.arcface_transform(landmarks68), align.ARCFACE_SIZE)

    def arcface_crops(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 112, 112, 3] ArcFace-aligned crops of the best face of each image (primary_landmarks)."""
        images = _as_image_batch(images)
        return np.stack([self.arcface_crop(image, self.primary_landmarks(image)) for image in images])

    def embed_frames(self, images: np.ndarray) -> np.ndarray:
        """Raw descriptors [N, 128] of the best-scoring face of each image (primary_landmarks)."""
        images = _as_image_batch(images)
        return self.embed_chips(np.stack([self.chip_from_landmarks(image, self.primary_landmarks(image))
                                          for image in images]))

    def embed_images(self, images: np.ndarray, aligned: bool | Literal["auto"] = "auto") -> np.ndarray:
        """Raw descriptors [N, 128]. aligned="auto" treats 112x112 images as ArcFace-aligned crops."""
        images = _as_image_batch(images)
        if aligned == "auto":
            aligned = images.shape[1:3] == (align.ARCFACE_SIZE, align.ARCFACE_SIZE)
        elif not isinstance(aligned, bool):
            raise ValueError(f"aligned must be True, False or 'auto', got {aligned!r}")
        return self.embed_aligned_crops(images) if aligned else self.embed_frames(images)
