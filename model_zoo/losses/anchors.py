"""Negative anchors for clients that hold one identity (a phone with its owner's face only).

With a single class, softmax cross-entropy is identically zero and plain FedAvg learns nothing there
(Yu, Rawat, Menon and Kumar, "Federated Learning with Only Positive Labels", ICML 2020: FedAwS).
FedAwS fixes it with a *spreadout* regulariser over all class embeddings at the server, which needs
every client's class vector on the server. We keep each client's class vector on the device and use
instead a set of fixed random unit vectors ("anchors"), generated on every device from a seed the
server announces, as the negatives of an ArcFace softmax, and apply FedAwS's spreadout hinge
(max(0, nu - ||w_c - a||)^2) between the client's own class vectors and the anchors. The anchors are
pure noise from a seed: they carry no one's face, so nothing about any identity leaves a device.
Fixed random class vectors as classifier targets work as well as learned ones (Hoffer et al., "Fix
your classifier", ICLR 2018).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arcface import ArcFaceHead

SPREADOUT_MARGIN = 1.0  # nu: Euclidean distance between unit vectors below which the hinge acts (cos > 0.5)


def negative_anchors(count: int, embedding_size: int, seed: int) -> torch.Tensor:
    """count fixed unit vectors in R^embedding_size, the same on every machine for a given seed."""
    if count < 1 or embedding_size < 1:
        raise ValueError(f"need count >= 1 and embedding_size >= 1, got {count} and {embedding_size}")
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, embedding_size, generator=gen, dtype=torch.float32), dim=1)


def spreadout_penalty(weight: torch.Tensor, anchors: torch.Tensor, margin: float = SPREADOUT_MARGIN) -> torch.Tensor:
    """FedAwS spreadout hinge between normalised class vectors and anchors: sum of max(0, margin - dist)^2."""
    distances = torch.cdist(F.normalize(weight, dim=1), anchors)
    return F.relu(margin - distances).pow(2).sum()


class AnchoredArcFaceHead(ArcFaceHead):
    """ArcFace over the client's own classes followed by fixed negative anchors that are never targets.

    Logits have num_classes + len(anchors) columns; labels index the own classes only. The anchors are a
    non-persistent buffer: the head's state_dict (what the device stores) holds its own class vectors only.
    """

    def __init__(self, embedding_size: int, num_classes: int, anchors: torch.Tensor, scale: float = 32.0,
                 margin: float = 0.5, spreadout_weight: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(embedding_size, num_classes, scale, margin, generator)
        if anchors.ndim != 2 or anchors.shape[1] != embedding_size or len(anchors) < 1:
            raise ValueError(f"anchors must be [A >= 1, {embedding_size}], got {tuple(anchors.shape)}")
        if spreadout_weight < 0:
            raise ValueError(f"spreadout_weight must be >= 0, got {spreadout_weight}")
        self.register_buffer("anchors", F.normalize(anchors.float(), dim=1), persistent=False)
        self.spreadout_weight = spreadout_weight

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        centres = torch.cat([F.normalize(self.weight, dim=1), self.anchors])
        return F.linear(F.normalize(embeddings, dim=1), centres)

    def penalty(self) -> torch.Tensor | None:
        if self.spreadout_weight == 0:
            return None
        return self.spreadout_weight * spreadout_penalty(self.weight, self.anchors)
