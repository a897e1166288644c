"""Margin-based classification heads for training embedders."""
from .arcface import ArcFaceHead

__all__ = ["ArcFaceHead"]
