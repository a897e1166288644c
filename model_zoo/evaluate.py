"""Evaluation of a backbone on a labelled dataset: verification report plus rank-1 identification."""
from __future__ import annotations

import numpy as np
from torch import nn

from .data import FaceDataset
from .metrics import rank1_accuracy, verification_report
from .train import embed_images


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    return {**verification_report(embeddings, labels).to_dict(), "rank1": rank1_accuracy(embeddings, labels)}


def evaluate_backbone(backbone: nn.Module, dataset: FaceDataset, batch_size: int = 64) -> dict:
    return evaluate_embeddings(embed_images(backbone, dataset.images, batch_size), dataset.labels)
