"""Backbone registry: build a backbone by name, recover (name, kwargs) from an instance for checkpoints."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .faceapi_resnet import FaceApiResNet, RawDescriptor
from .mobilefacenet import MobileFaceNet

BACKBONES: dict[str, type[nn.Module]] = {"mobilefacenet": MobileFaceNet, "faceapi-resnet": FaceApiResNet}

# The --model name of the pretrained face-api descriptor as is (faceapi-resnet backbone, model version 0).
PRETRAINED_FACEAPI = "faceapi"

# Constructor kwargs naming a place on this machine: every machine sets its own, none is announced to devices.
MACHINE_LOCAL_KWARGS = frozenset({"weights_dir"})


@runtime_checkable
class FrozenTrunk(Protocol):
    """A backbone whose `trunk` is pretrained and frozen and whose `tail` alone is trained and shared.

    forward(x) == forward_tail(trunk_features(x)); the trunk's output for an image never changes, so a
    trainer may compute it once and run its epochs over the tail only.
    """

    trunk: nn.Module
    tail: nn.Module

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_tail(self, features: torch.Tensor) -> torch.Tensor: ...


def build_backbone(name: str = "mobilefacenet", **kwargs) -> nn.Module:
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None
    return cls(**kwargs)


def backbone_spec(backbone: nn.Module) -> tuple[str, dict]:
    """(registry name, constructor kwargs) that rebuild an equivalent backbone."""
    for name, cls in BACKBONES.items():
        if type(backbone) is cls:
            return name, dict(backbone.arch_kwargs)
    raise ValueError(f"{type(backbone).__name__} is not a registered backbone; known: {sorted(BACKBONES)}")


SCORE_USES = ("evaluate", "unlock")


def model_score(model, use: str = "evaluate") -> str:
    """The score a model's embeddings are compared by (model_zoo.metrics.SCORES; higher = more alike), chosen by
    measurement for each use: image pairs (`facefed evaluate`) or unlock's 5-image templates at FAR 1e-3.

    The pretrained face-api descriptor as is (PRETRAINED_FACEAPI or None): "l2" (minus the euclidean distance of
    the raw descriptors) to evaluate, EER 4.4 % against cosine's 5.2 % on celeb-dev pairs (BENCHMARKS.md, "Camera
    domain (issue 16)"); "cosine" to unlock: through the unlock path the raw mean template rejects more owners at
    FAR 1e-3 than the normalised one (FRR 0.032 against 0.021, bench/unlock_score.py). FaceFed checkpoints and
    exports: "cosine" for both, their outputs are L2-normalised and were trained or exported as such."""
    if use not in SCORE_USES:
        raise ValueError(f"unknown use {use!r}; available: {', '.join(SCORE_USES)}")
    return "l2" if has_raw_descriptor(model) and use == "evaluate" else "cosine"


def has_raw_descriptor(model) -> bool:
    """Whether `model` can give unnormalised descriptors for the l2 score: the pretrained face-api descriptor only
    (checkpoints and exports give L2-normalised outputs)."""
    return model is None or str(model) == PRETRAINED_FACEAPI


__all__ = ["BACKBONES", "MACHINE_LOCAL_KWARGS", "PRETRAINED_FACEAPI", "FaceApiResNet", "FrozenTrunk", "MobileFaceNet",
           "RawDescriptor", "SCORE_USES", "backbone_spec", "build_backbone", "has_raw_descriptor", "model_score"]
