"""Backbone weights as numpy tensors (the federated payload) and safetensors checkpoints with JSON metadata."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .backbones import backbone_spec, build_backbone
from .checkpoint_file import (CHECKPOINT_FORMAT, BackboneSpec, CheckpointError, read_checkpoint, running_statistics,
                              write_checkpoint)


def shared_tensors(backbone: nn.Module) -> dict[str, np.ndarray]:
    """The federated payload: float state_dict entries, BN running stats included, integer counters
    (num_batches_tracked) left out; of a backbone with a shared_state() (FaceApiResNet) only those: every
    device holds the frozen trunk and the pretrained weights."""
    return {name: np.ascontiguousarray(t.detach().cpu().numpy()).copy() for name, t in _shared_state(backbone).items()}


def load_shared_tensors(backbone: nn.Module, tensors) -> None:
    """Copy tensors into the backbone; names and shapes must match shared_tensors(backbone) exactly."""
    state = _shared_state(backbone)
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(f"tensor names do not match the backbone: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [f"{n}: {tuple(np.shape(tensors[n]))} != {tuple(t.shape)}"
             for n, t in state.items() if tuple(np.shape(tensors[n])) != tuple(t.shape)]
    if wrong:
        raise ValueError(f"tensor shapes do not match the backbone: {wrong[:5]}")
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(torch.tensor(np.asarray(tensors[name])))  # copies: inputs may be read-only buffers


def _shared_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    # A frozen trunk never changes and comes from the pretrained weights on each machine: it never travels.
    state = backbone.shared_state() if hasattr(backbone, "shared_state") else backbone.state_dict()
    return {name: t for name, t in state.items() if t.is_floating_point()}


def spec_of(backbone: nn.Module) -> BackboneSpec:
    return BackboneSpec(*backbone_spec(backbone))


def save_checkpoint(path, backbone: nn.Module, meta: dict) -> None:
    """Write atomically (model_zoo.checkpoint_file: the same bytes as the aggregator's numpy writer)."""
    write_checkpoint(path, shared_tensors(backbone), spec_of(backbone), meta)


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """(backbone in eval mode, user meta), the backbone rebuilt from the architecture recorded in the file.
    A truncated or corrupted file raises CheckpointError, one line naming it (callers print it, no traceback)."""
    tensors, spec, meta = read_checkpoint(path)
    try:
        backbone = build_backbone(spec.arch, **spec.arch_kwargs)
        load_shared_tensors(backbone, tensors)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:  # tensors or kwargs that do not fit the backbone
        raise CheckpointError(f"{path}: not a usable checkpoint ({type(exc).__name__}: {exc})") from None
    return backbone.eval(), meta


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "load_shared_tensors", "running_statistics",
           "save_checkpoint", "shared_tensors", "spec_of"]
