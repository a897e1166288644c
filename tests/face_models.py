"""Small models and faces for the export and backend tests (no shared data needed)."""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch

from model_zoo.backbones import build_backbone
from model_zoo.data import FaceDataset
from model_zoo.losses import ArcFaceHead
from model_zoo.train import TrainConfig, train_local


def blob_faces(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 112, 112, 3] smooth random images: upsampled 7x7 noise, so convolutions see structure."""
    small = np.random.default_rng(seed).integers(0, 256, (n, 7, 7, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (112, 112), interpolation=cv2.INTER_CUBIC) for s in small])


@lru_cache(maxsize=1)
def briefly_trained_backbone() -> torch.nn.Module:
    """MobileFaceNet after 2 SGD steps on 32 blob faces (4 classes).

    Untrained weights are no stand-in for a deployed model: their activation ranges differ so much across
    channels that int8 agreement drops to ~0.7 cosine, while two steps already give trained-like ranges.
    BatchNorm statistics are not recalibrated: re-estimated on 32 blob faces they give ranges no face model
    has (int8 cosine 0.95). On a real one it makes no difference: MobileFaceNet after 3 ORL epochs exports to
    onnx-int8 with mean cosine 0.9987 recalibrated, 0.9989 not.
    """
    torch.manual_seed(0)
    backbone = build_backbone()
    faces = FaceDataset(blob_faces(32, seed=0), np.arange(32) % 4, ["a", "b", "c", "d"])
    train_local(backbone, ArcFaceHead(128, 4), faces, TrainConfig(epochs=1, batch_size=16, seed=0, recalibrate_bn=False))
    return backbone.eval()
