"""Locate the shared face-api weight folder and build the three ported networks from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .landmarks import FaceLandmark68Net
from .recognition import FaceRecognitionNet
from .tfjs_weights import read_tfjs_weights
from .tiny_detector import TinyFaceDetector

ENV_VAR = "FACEFED_FACEAPI_DIR"
RECOGNITION_MANIFEST = "face_recognition_model-weights_manifest.json"
LANDMARKS_MANIFEST = "face_landmark_68_model-weights_manifest.json"
DETECTOR_MANIFEST = "tiny_face_detector_model-weights_manifest.json"


@dataclass(frozen=True)
class FaceApiModels:
    recognition: FaceRecognitionNet
    landmarks: FaceLandmark68Net
    detector: TinyFaceDetector


def default_models_dir() -> Path:
    """$FACEFED_FACEAPI_DIR if set, else <repo>/../shared/models/faceapi (weights are not vendored)."""
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        return Path(env_dir)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "models" / "faceapi"


def _manifest(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"face-api weights manifest not found: {path}. Point {ENV_VAR} (or the root argument) at the "
            "folder holding the @vladmandic/face-api 1.7.15 model files."
        )
    return path


def load_faceapi_models(root: str | Path | None = None) -> FaceApiModels:
    """Build recognition, landmark and detector nets (eval mode, CPU) from the TF.js weights in root."""
    root = Path(root) if root is not None else default_models_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"face-api model folder not found: {root}. Set {ENV_VAR} or pass root= to load_faceapi_models."
        )
    return FaceApiModels(
        recognition=FaceRecognitionNet.from_tfjs(read_tfjs_weights(_manifest(root, RECOGNITION_MANIFEST))),
        landmarks=FaceLandmark68Net.from_tfjs(read_tfjs_weights(_manifest(root, LANDMARKS_MANIFEST))),
        detector=TinyFaceDetector.from_tfjs(read_tfjs_weights(_manifest(root, DETECTOR_MANIFEST))),
    )
