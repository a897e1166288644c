"""Margin-based classification heads for training embedders."""
from .anchors import AnchoredArcFaceHead, negative_anchors, spreadout_penalty
from .arcface import ArcFaceHead

__all__ = ["AnchoredArcFaceHead", "ArcFaceHead", "negative_anchors", "spreadout_penalty"]
