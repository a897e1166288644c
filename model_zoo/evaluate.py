"""Evaluation of a backbone on a labelled dataset: verification report plus rank-1 identification."""
from __future__ import annotations

import numpy as np
from torch import nn

from .data import FaceDataset
from .metrics import rank1_accuracy, verification_report
from .train import embed_images


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    return {**verification_report(embeddings, labels).to_dict(), "rank1": rank1_accuracy(embeddings, labels)}


def verification_row(model: str, data: str, embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """One row of a bench's verification table: what a model scores on a data set, all pairs."""
    report = evaluate_embeddings(embeddings, labels)
    return {"model": model, "data": data, "images": len(labels), "genuine_pairs": report["genuine_pairs"],
            "impostor_pairs": report["impostor_pairs"], "accuracy": report["accuracy"], "eer": report["eer"],
            "tar_at_far_1e-3": report["tar_at_far"]["1e-3"], "rank1": report["rank1"]}


def evaluate_backbone(backbone: nn.Module, dataset: FaceDataset, batch_size: int = 64) -> dict:
    return evaluate_embeddings(embed_images(backbone, dataset.images, batch_size), dataset.labels)
