"""Field-native face models: MediaPipe's BlazeFace detectors and Face Mesh, run through the TFLite interpreter.

The .tflite files are Google's, unchanged (Apache-2.0), read from $FACEFED_MEDIAPIPE_DIR (default
<repo>/../shared/models/mediapipe) and never vendored. The decoding around them (anchors, boxes, keypoints,
NMS, the mesh's crop rules) is ours: blazeface.py and facemesh.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VAR = "FACEFED_MEDIAPIPE_DIR"
DETECTORS = ("blazeface", "tiny")  # model_zoo.pipeline's face detectors
LANDMARK_MODELS = ("mesh", "68")  # and landmark nets
# What enroll, unlock, calibrate, evaluate and the device profiles run unless told otherwise: the pair that
# bench/vision_bench.py measured faster at no loss of accuracy (BENCHMARKS.md, issue 17). The library's
# FacePipeline keeps the face-api port (tiny, 68) as its default, the reference the port was checked against.
DEFAULT_DETECTOR = "blazeface"
DEFAULT_LANDMARKS = "mesh"


@dataclass(frozen=True)
class Detection:
    """A face found by any detector of the pipeline (the ported tiny detector, BlazeFace)."""

    score: float
    box: tuple[float, float, float, float]  # x, y, width, height in frame pixels
    keypoints: np.ndarray | None = None  # BlazeFace: float64 [6, 2] frame pixels (blazeface.KEYPOINTS); else None


def default_models_dir() -> Path:
    """$FACEFED_MEDIAPIPE_DIR if set, else <repo>/../shared/models/mediapipe."""
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        return Path(env_dir)
    return Path(__file__).resolve().parents[2].parent / "shared" / "models" / "mediapipe"


class TFLiteModel:
    """One .tflite file behind ai-edge-litert's interpreter: float32 NHWC in, its output tensors out."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"MediaPipe model not found: {path}. Set {ENV_VAR} to the folder holding "
                                    "face_detection_short_range.tflite, face_detection_full_range.tflite and "
                                    "face_landmark.tflite")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ImportError("BlazeFace and Face Mesh run on the TFLite interpreter: pip install ai-edge-litert, "
                              "or choose the face-api port (--detector tiny --landmarks 68)") from exc

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        (self._input,) = self.interpreter.get_input_details()
        self._outputs = [d["index"] for d in self.interpreter.get_output_details()]
        self.input_size = int(self._input["shape"][1])

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self._input["index"], np.ascontiguousarray(batch, dtype=np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i) for i in self._outputs]


def load_model(file_name: str, root: Path | None = None, threads: int = 1) -> TFLiteModel:
    return TFLiteModel((root if root is not None else default_models_dir()) / file_name, threads)
