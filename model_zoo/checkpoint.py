"""Backbone weights as numpy tensors (the federated payload) and safetensors checkpoints with JSON metadata."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from .backbones import FrozenTrunk, backbone_spec, build_backbone

CHECKPOINT_FORMAT = "facefed-checkpoint"


def shared_tensors(backbone: nn.Module) -> dict[str, np.ndarray]:
    """The federated payload: float state_dict entries, BN running stats included, integer counters
    (num_batches_tracked) left out; of a FrozenTrunk backbone only the tail's (every device holds the trunk)."""
    return {name: np.ascontiguousarray(t.detach().cpu().numpy()).copy() for name, t in _shared_state(backbone).items()}


RUNNING_STATISTICS = (".running_mean", ".running_var")


def running_statistics(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The BatchNorm running means and variances among `tensors` (shared_tensors names)."""
    return {name: value for name, value in tensors.items() if name.endswith(RUNNING_STATISTICS)}


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
    state = backbone.tail.state_dict(prefix="tail.") if isinstance(backbone, FrozenTrunk) else backbone.state_dict()
    return {name: t for name, t in state.items() if t.is_floating_point()}


def save_checkpoint(path, backbone: nn.Module, meta: dict) -> None:
    """Write atomically, so a device that loses power mid-write keeps its previous checkpoint."""
    arch, arch_kwargs = backbone_spec(backbone)
    metadata = {"format": CHECKPOINT_FORMAT, "arch": arch, "arch_kwargs": json.dumps(arch_kwargs),
                "meta": json.dumps(meta)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(shared_tensors(backbone), str(tmp), metadata=metadata)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupted, or not one of ours)."""


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """(backbone in eval mode, user meta), the backbone rebuilt from the architecture recorded in the file.
    A truncated or corrupted file raises CheckpointError, one line naming it (callers print it, no traceback)."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (format={metadata.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        backbone = build_backbone(metadata["arch"], **json.loads(metadata["arch_kwargs"]))
        load_shared_tensors(backbone, tensors)
        return backbone.eval(), json.loads(metadata.get("meta", "{}"))
    except CheckpointError:
        raise
    except SafetensorError as exc:  # not a ValueError: the header or the data is cut short or garbled
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted: {exc})") from None
    except (KeyError, RuntimeError, ValueError) as exc:  # metadata (JSON) or tensors that do not fit the backbone
        raise CheckpointError(f"{path}: not a usable checkpoint ({type(exc).__name__}: {exc})") from None
