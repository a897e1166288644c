"""The checkpoint file itself, without torch: numpy tensors in safetensors with JSON metadata.

The aggregator writes and reads its global models through this module only (its math is numpy);
model_zoo.checkpoint builds on it to save and load an nn.Module, so both write the same bytes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

CHECKPOINT_FORMAT = "facefed-checkpoint"
RUNNING_STATISTICS = (".running_mean", ".running_var")


def running_statistics(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The BatchNorm running means and variances among `tensors` (shared_tensors names)."""
    return {name: value for name, value in tensors.items() if name.endswith(RUNNING_STATISTICS)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupted, or not one of ours)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What rebuilds the backbone a checkpoint's tensors belong to (model_zoo.backbones.build_backbone)."""

    arch: str
    arch_kwargs: dict[str, Any]


def write_checkpoint(path, tensors: Mapping[str, np.ndarray], spec: BackboneSpec, meta: dict) -> None:
    """Write atomically, so a device that loses power mid-write keeps its previous checkpoint."""
    metadata = {"format": CHECKPOINT_FORMAT, "arch": spec.arch, "arch_kwargs": json.dumps(spec.arch_kwargs),
                "meta": json.dumps(meta)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_checkpoint(path) -> tuple[dict[str, np.ndarray], BackboneSpec, dict]:
    """(tensors, backbone spec, user meta). A truncated, corrupted or foreign file raises CheckpointError, one
    line naming it (callers print it, no traceback)."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (format={metadata.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        spec = BackboneSpec(metadata["arch"], json.loads(metadata["arch_kwargs"]))
        return tensors, spec, json.loads(metadata.get("meta", "{}"))
    except CheckpointError:
        raise
    except SafetensorError as exc:  # not a ValueError: the header or the data is cut short or garbled
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted: {exc})") from None
    except (KeyError, ValueError) as exc:  # metadata that is not ours or not JSON
        raise CheckpointError(f"{path}: not a usable checkpoint ({type(exc).__name__}: {exc})") from None
