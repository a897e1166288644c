"""Per frame: detect -> landmarks -> ArcFace alignment -> embedding, each stage timed.

Detection and landmarks are the shared FacePipeline's (BlazeFace or the tiny detector, Face Mesh or 68 points:
--detector, --landmarks); the embedder is the device's model behind edge_agent.backends' one interface (torch,
ONNX Runtime or TFLite), fed 112x112 ArcFace-aligned crops, the input contract of every backbone and export.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_agent.backends import Embedder, TorchEmbedder, load_embedder
from model_zoo import align
from model_zoo.backbones import PRETRAINED_FACEAPI, has_raw_descriptor, model_score
from model_zoo.exported import sha256_file
from model_zoo.faceapi.loader import default_models_dir
from model_zoo.metrics import SCORES
from model_zoo.pipeline import FacePipeline, whole_image_box
from model_zoo.vision import Detection


PRETRAINED = PRETRAINED_FACEAPI  # --model value for the pretrained face-api descriptor (faceapi-resnet backbone)
MAX_FACES = 4  # faces per frame that get landmarks and an embedding: bounds the frame time in a crowd
STAGES = ("detect", "landmarks", "align", "embed")
RECOGNITION_WEIGHTS = "face_recognition_model.bin"


@dataclass(frozen=True)
class ModelRef:
    """Which model made an embedding: templates only compare with embeddings of the same model."""

    path: str | None  # None: the pretrained face-api descriptor
    sha256: str
    backend: str
    # How its embeddings compare (model_zoo.backbones.model_score); stores written before scores were declared
    # hold cosine embeddings.
    score: str = "cosine"

    @property
    def label(self) -> str:
        return Path(self.path).name if self.path else "pretrained face-api descriptor"


@dataclass
class AnalyzedFace:
    box: tuple[float, float, float, float]  # x, y, width, height in frame pixels
    detector_score: float
    landmarks: np.ndarray  # float64 frame pixels: [68, 2] or mesh [468, 3]
    chip: np.ndarray  # uint8 [112, 112, 3] RGB, ArcFace-aligned
    embedding: np.ndarray  # float32 [D], L2-normalised under cosine, the raw descriptor under l2


@dataclass
class StageTimes:
    ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def total(self) -> float:
        return sum(self.ms.values())


class FaceAnalyzer:
    def __init__(self, embedder: Embedder, model: ModelRef, pipeline: FacePipeline | None = None) -> None:
        if embedder.input.size != align.ARCFACE_SIZE:
            raise ValueError(f"the model takes {embedder.input.size}px input; unlock feeds {align.ARCFACE_SIZE}px "
                             "ArcFace-aligned crops")
        self.embedder = embedder
        self.model = model
        self.pipeline = pipeline if pipeline is not None else FacePipeline()

    def analyze(self, frame_rgb: np.ndarray) -> tuple[list[AnalyzedFace], StageTimes]:
        """Every face in the frame (at most MAX_FACES, best detector score first), with stage times."""
        times = StageTimes()
        start = time.perf_counter()
        detections = self.pipeline.detector.detect(frame_rgb)[:MAX_FACES]
        times.ms["detect"] = _ms_since(start)
        if not detections:
            return [], times
        return self._describe(frame_rgb, detections, times), times

    def analyze_photo(self, image_rgb: np.ndarray) -> AnalyzedFace:
        """The best face of a labelled photo, else the whole photo as the face box (pipeline.whole_image_box)."""
        faces, times = self.analyze(image_rgb)
        if faces:
            return faces[0]
        return self._describe(image_rgb, [Detection(0.0, whole_image_box(image_rgb))], times)[0]

    def analyze_aligned(self, crop_rgb: np.ndarray) -> tuple[list[AnalyzedFace], StageTimes]:
        """A photo that is already an ArcFace-aligned square crop (--aligned): no detection, the crop resized to
        the embedder's input; landmarks of the whole crop, for the quality gates and liveness."""
        times = StageTimes()
        height, width = crop_rgb.shape[:2]
        if height != width:
            raise ValueError(f"an aligned crop must be square, got {width}x{height}")
        whole = Detection(0.0, whole_image_box(crop_rgb))
        start = time.perf_counter()
        landmarks = self.pipeline.landmarker.locate(crop_rgb, [whole])
        times.ms["landmarks"] = _ms_since(start)
        start = time.perf_counter()
        size = align.ARCFACE_SIZE
        chip = crop_rgb if height == size else cv2.resize(crop_rgb, (size, size), interpolation=cv2.INTER_AREA)
        times.ms["align"] = _ms_since(start)
        start = time.perf_counter()
        embedding = self.embedder.embed(chip[None])[0]
        times.ms["embed"] = _ms_since(start)
        return [AnalyzedFace(whole.box, whole.score, landmarks[0], np.ascontiguousarray(chip), embedding)], times

    def _describe(self, frame, detections: list[Detection], times: StageTimes) -> list[AnalyzedFace]:
        start = time.perf_counter()
        landmarks = self.pipeline.landmarker.locate(frame, detections)
        times.ms["landmarks"] = _ms_since(start)
        start = time.perf_counter()
        chips = np.stack([FacePipeline.arcface_crop(frame, points) for points in landmarks])
        times.ms["align"] = _ms_since(start)
        start = time.perf_counter()
        embeddings = self.embedder.embed(chips)
        times.ms["embed"] = _ms_since(start)
        return [AnalyzedFace(tuple(map(float, d.box)), float(d.score), points, chip, emb)
                for d, points, chip, emb in zip(detections, landmarks, chips, embeddings)]


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def load_model(model: str | Path | None, threads: int = 1, backend: str | None = None,
               score: str | None = None) -> tuple[Embedder, ModelRef]:
    """The embedder for --model: a .safetensors checkpoint, an .onnx / .tflite export, or None / 'faceapi' for the
    pretrained face-api descriptor (faceapi-resnet backbone, weights from $FACEFED_FACEAPI_DIR). score: how its
    embeddings will be compared, cosine (L2-normalised) or l2 (raw descriptors, the pretrained descriptor only);
    None: the model's declared score for unlock (model_zoo.backbones.model_score)."""
    score = model_score(model, "unlock") if score is None else score
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; available: {', '.join(SCORES)}")
    if score == "l2" and not has_raw_descriptor(model):
        raise ValueError(f"score l2 needs raw descriptors, which only the pretrained face-api descriptor ({PRETRAINED}) "
                         f"gives; {model} gives L2-normalised embeddings: use cosine")
    if has_raw_descriptor(model):
        from model_zoo.backbones import RawDescriptor, build_backbone

        weights = default_models_dir() / RECOGNITION_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"pretrained face-api weights not found at {weights}: set FACEFED_FACEAPI_DIR "
                                    "or pass --model FILE")
        digest = hashlib.sha256(b"faceapi-resnet:" + sha256_file(weights).encode()).hexdigest()
        backbone = build_backbone("faceapi-resnet")
        embedder = TorchEmbedder(RawDescriptor(backbone) if score == "l2" else backbone, threads, score)
        return embedder, ModelRef(None, digest, "torch", score)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    embedder = load_embedder(path, backend, threads)
    return embedder, ModelRef(str(path.resolve()), sha256_file(path), embedder.backend, embedder.score)
