"""The one face pipeline: detect -> landmarks -> similarity alignment to the embedder's chip -> descriptor.

Detectors (`detector=`): "tiny", the ported face-api TinyFaceDetector (torch), or "blazeface", MediaPipe's
BlazeFace through TFLite (model_zoo.vision: short range, retried padded, at full range and on tiles where it
finds nothing). Landmarks (`landmarks=`): "68", face-api's 68-point net (torch) on each box crop, or "mesh",
MediaPipe's Face Mesh (468 points, TFLite) on the rotated crop around each box. Both sit behind the same two
calls (FaceDetector.detect, LandmarkModel.locate), so the mixed pairings run too, but only tiny + 68 and
blazeface + mesh are measured (BENCHMARKS.md); alignment takes either landmark set (align.five_points). The embedder is the face-api descriptor here; unlock's embedders take the ArcFace crop.

Two routes to a descriptor:
- full frames (`detect`): detector boxes, landmarks mapped back to the frame, and the frame warped into the
  150x150 dlib chip by a similarity fitted on those landmarks (align.dlib_chip_transform).
- already aligned crops (`embed_aligned_crops`, e.g. 112x112 ArcFace-aligned celeb-dev): one fixed
  similarity maps the ArcFace template onto the dlib chip template (align.arcface_to_dlib_transform);
  the part of the chip outside the crop is filled by border replication. A plain resize would put the
  face at the wrong scale and position for the descriptor net.

Descriptors are face-api's raw (unnormalised) 128-d vectors: face-api compares them by euclidean
distance (same person below ~0.6); L2-normalise before cosine or euclidean verification metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from . import align
from .faceapi import FaceApiModels, detect_faces, load_faceapi_models
from .faceapi import landmarks as faceapi_landmarks
from .vision import DETECTORS, LANDMARK_MODELS, Detection, facemesh
from .vision.blazeface import CropAwareBlazeFace

EMBEDDERS = ("faceapi",)
DESCRIPTOR_DIM = 128


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in frame pixels (detector output)
    score: float
    landmarks: np.ndarray  # float64 frame pixels: [68, 2] (68-point net) or [468, 3] (mesh: x, y, z)
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


class FaceDetector(Protocol):
    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Faces in a uint8 RGB frame, best score first."""


class LandmarkModel(Protocol):
    points: int  # 68 or 468

    def locate(self, frame: np.ndarray, detections: list[Detection]) -> np.ndarray:
        """[K, points, 2 or 3] frame-pixel landmarks of each detection."""


class TinyDetector:
    def __init__(self, net, input_size: int = 320, score_threshold: float = 0.5) -> None:
        if input_size % 32:
            raise ValueError(f"detector_input_size must be a multiple of 32, got {input_size}")
        self.net, self.input_size, self.score_threshold = net, input_size, score_threshold

    def detect(self, frame: np.ndarray) -> list[Detection]:
        found = detect_faces(self.net, frame, self.input_size, self.score_threshold)
        return [Detection(d.score, d.box) for d in sorted(found, key=lambda d: -d.score)]


class Landmarks68:
    """face-api's 68-point net on each (floored, clipped) box crop, its points shifted back to the frame."""

    points = 68

    def __init__(self, net) -> None:
        self.net = net

    def locate(self, frame: np.ndarray, detections: list[Detection]) -> np.ndarray:
        height, width = frame.shape[:2]
        crops = [crop_box(d.box, height, width) for d in detections]
        if any(x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in crops):
            raise ValueError(f"a face box lies outside the {width}x{height} frame: {[d.box for d in detections]}")
        batch = torch.cat([faceapi_landmarks.preprocess(frame[y0:y1, x0:x1]) for x0, y0, x1, y1 in crops])
        with torch.no_grad():
            outputs = self.net(batch)
        # The net's points are relative to its crop: shift them back by the crop origin.
        return np.stack([faceapi_landmarks.to_pixel_coords(out, y1 - y0, x1 - x0) + (x0, y0)
                         for out, (x0, y0, x1, y1) in zip(outputs, crops)])


class MeshLandmarks:
    """Face Mesh on the crop around each box, rotated by the detector's eye keypoints where it has them."""

    points = facemesh.POINTS

    def __init__(self, mesh: facemesh.FaceMesh) -> None:
        self.mesh = mesh

    def locate(self, frame: np.ndarray, detections: list[Detection]) -> np.ndarray:
        return np.stack([self.mesh.landmarks(frame, d.box, None if d.keypoints is None else d.keypoints[:2])[0]
                         for d in detections])


class FacePipeline:
    def __init__(self, models: FaceApiModels | None = None, embedder: str = "faceapi", *,
                 detector_input_size: int = 320, score_threshold: float = 0.5, batch_size: int = 64,
                 detector: str = "tiny", landmarks: str = "68", threads: int = 1) -> None:
        """detector_input_size and score_threshold: the tiny detector's; threads: the TFLite interpreters'
        (BlazeFace, mesh); the torch nets follow torch's own setting."""
        if embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {embedder!r}; available: {', '.join(EMBEDDERS)}")
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; available: {', '.join(DETECTORS)}")
        if landmarks not in LANDMARK_MODELS:
            raise ValueError(f"unknown landmarks {landmarks!r}; available: {', '.join(LANDMARK_MODELS)}")
        self.models = models if models is not None else load_faceapi_models()
        self.embedder = embedder
        self.detector_name, self.landmarks_name = detector, landmarks
        self.detector: FaceDetector = (TinyDetector(self.models.detector, detector_input_size, score_threshold)
                                       if detector == "tiny" else CropAwareBlazeFace(threads))
        self.landmarker: LandmarkModel = (Landmarks68(self.models.landmarks) if landmarks == "68"
                                          else MeshLandmarks(facemesh.FaceMesh(threads)))
        self.batch_size = batch_size

    # --- stages ---

    def landmarks_in_boxes(self, frame: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """Frame-pixel landmarks [K, P, 2|3] of the face in each box (no detector keypoints: an upright crop)."""
        return self.landmarker.locate(frame, [Detection(0.0, tuple(map(float, box))) for box in boxes])

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

    def locate(self, frame: np.ndarray) -> tuple[list[Detection], np.ndarray]:
        """Detections, best score first, and their frame-pixel landmarks (no alignment, no embedding)."""
        detections = self.detector.detect(frame)
        if not detections:
            return [], np.empty((0, self.landmarker.points, 2))
        return detections, self.landmarker.locate(frame, detections)

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
        """Landmarks of the best-scoring face of an image, else of the whole image (whole_image_box)."""
        detections, landmarks = self.locate(image)
        if detections:
            return landmarks[0]
        return self.landmarks_in_boxes(image, [whole_image_box(image)])[0]

    @staticmethod
    def chip_from_landmarks(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return align.warp(frame, align.dlib_chip_transform(landmarks), align.DLIB_CHIP_SIZE)

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
    def arcface_crop(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The 112x112 ArcFace-aligned crop every backbone (MobileFaceNet, faceapi-resnet) and export expects."""
        return align.warp(frame, align.arcface_transform(landmarks), align.ARCFACE_SIZE)

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
