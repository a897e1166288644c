"""Backbone registry: build a backbone by name, recover (name, kwargs) from an instance for checkpoints."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .faceapi_resnet import FaceApiResNet
from .mobilefacenet import MobileFaceNet

BACKBONES: dict[str, type[nn.Module]] = {"mobilefacenet": MobileFaceNet, "faceapi-resnet": FaceApiResNet}

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


__all__ = ["BACKBONES", "MACHINE_LOCAL_KWARGS", "FaceApiResNet", "FrozenTrunk", "MobileFaceNet", "backbone_spec",
           "build_backbone"]
