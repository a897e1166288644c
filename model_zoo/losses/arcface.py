"""ArcFace head (Deng et al., 2019): additive angular margin on the target class."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    """Class centres on the unit sphere; forward gives s*cos(theta + m) for the target, s*cos(theta) elsewhere."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 32.0, margin: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        """generator: where the initial class centres are drawn from (None: torch's global generator)."""
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"need positive sizes, got embedding_size={embedding_size} num_classes={num_classes}")
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2), got {margin}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight, generator=generator)
        self._cos_m = math.cos(margin)
        self._sin_m = math.sin(margin)
        # Past theta = pi - m, cos(theta + m) stops decreasing in theta; there the target logit falls back to
        # cos(theta) - m*sin(m), which keeps the penalty monotonic (the usual non-"easy margin" formulation).
        self._th = math.cos(math.pi - margin)
        self._mm = math.sin(math.pi - margin) * margin

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Plain scaled cosine logits, for accuracy and prediction."""
        return self.scale * self.cosine(embeddings)

    def penalty(self) -> torch.Tensor | None:
        """A regulariser over the head's own parameters, added to the training loss; None: nothing to add."""
        return None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        sin = torch.sqrt((1.0 - cos * cos).clamp(0.0, 1.0))
        cos_margin = cos * self._cos_m - sin * self._sin_m
        cos_margin = torch.where(cos > self._th, cos_margin, cos - self._mm)
        target = F.one_hot(labels, cos.shape[1]).to(torch.bool)  # columns past num_classes are never targets
        return self.scale * torch.where(target, cos_margin, cos)
