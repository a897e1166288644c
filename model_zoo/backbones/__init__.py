"""Backbone registry: build a backbone by name, recover (name, kwargs) from an instance for checkpoints."""
from __future__ import annotations

from torch import nn

from .mobilefacenet import MobileFaceNet

BACKBONES: dict[str, type[nn.Module]] = {"mobilefacenet": MobileFaceNet}


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


__all__ = ["BACKBONES", "MobileFaceNet", "backbone_spec", "build_backbone"]
