"""PyTorch ports of three pretrained @vladmandic/face-api 1.7.15 networks (weights read at run time).

- FaceRecognitionNet: 150x150 RGB face chip -> 128-d descriptor
- FaceLandmark68Net: face crop -> 68 landmarks
- TinyFaceDetector: full frame -> face boxes

Each helper takes uint8 HWC RGB numpy and reproduces face-api's preprocessing and post-processing.
"""

from .landmarks import FaceLandmark68Net, detect_landmarks
from .loader import FaceApiModels, default_models_dir, load_faceapi_models
from .recognition import FaceRecognitionNet, compute_descriptor
from .tfjs_weights import decode_weights, read_tfjs_weights
from .tiny_detector import FaceDetection, TinyFaceDetector, detect_faces

__all__ = [
    "FaceApiModels",
    "FaceDetection",
    "FaceLandmark68Net",
    "FaceRecognitionNet",
    "TinyFaceDetector",
    "compute_descriptor",
    "decode_weights",
    "default_models_dir",
    "detect_faces",
    "detect_landmarks",
    "load_faceapi_models",
    "read_tfjs_weights",
]
