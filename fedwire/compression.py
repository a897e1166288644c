"""The int8-delta update codec: an update travels as its difference from the round's global model,
quantized to int8 with one float32 scale per tensor.

Each float tensor `name` of 2+ dimensions becomes two wire tensors: `name` (I8, same shape) and `name#scale`
(F32, shape [1]); 0-D and 1-D tensors travel as they are. The receiver rebuilds reference + q * scale exactly as the sender computed it.
The sender keeps the quantization error and adds it to the next round's delta (error feedback),
so rounding errors do not accumulate into a bias. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import ProtocolError
from .messages import TensorSpec

PLAIN = "safetensors"
INT8_DELTA = "int8-delta"
SCALE_SUFFIX = "#scale"
INT8_MAX = 127

Tensors = Mapping[str, np.ndarray]


def _is_quantized(value: np.ndarray) -> bool:
    # Weight matrices and kernels (2+ dims) carry nearly all the bytes. Vectors (biases, norm scales,
    # BatchNorm statistics) stay exact: a rounded variance could even turn negative.
    return np.issubdtype(value.dtype, np.floating) and value.ndim >= 2


def encode_int8_delta(tensors: Tensors, reference: Tensors,
                      residual: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire tensors, new residual) for an update against `reference`, adding last round's `residual`."""
    residual = residual or {}
    wire, new_residual = {}, {}
    for name, value in tensors.items():
        if not _is_quantized(value):
            wire[name] = value
            continue
        delta = value.astype(np.float32) - reference[name].astype(np.float32) + residual.get(name, 0.0)
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        scale = np.float32(peak / INT8_MAX if peak > 0 else 1.0)
        quantized = np.clip(np.rint(delta / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        wire[name] = quantized
        wire[name + SCALE_SUFFIX] = np.array([scale], np.float32)
        new_residual[name] = delta - quantized.astype(np.float32) * scale
    return wire, new_residual


def decode_int8_delta(wire: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    """The update the sender meant: reference + q * scale for every float tensor of `reference`."""
    tensors = {}
    for name, ref in reference.items():
        if name not in wire:
            raise ProtocolError("tensors", f"{name} missing from the int8-delta update")
        if not _is_quantized(ref):
            tensors[name] = wire[name]
            continue
        scale = wire.get(name + SCALE_SUFFIX)
        if scale is None or scale.shape != (1,) or not np.isfinite(scale).all():
            raise ProtocolError("tensors", f"{name}{SCALE_SUFFIX} missing or invalid")
        tensors[name] = (ref.astype(np.float32) + wire[name].astype(np.float32) * scale[0]).astype(ref.dtype)
    return tensors


def wire_specs(reference: Sequence[TensorSpec], codec: str) -> list[TensorSpec]:
    """The tensor list a manifest must declare for an update of `reference` under `codec`."""
    if codec == PLAIN:
        return list(reference)
    if codec != INT8_DELTA:
        raise ProtocolError("codec", f"unknown codec {codec!r}")
    specs = []
    for spec in reference:
        if spec.dtype in ("F16", "BF16", "F32", "F64") and len(spec.shape) >= 2:
            specs += [TensorSpec(spec.name, spec.shape, "I8"), TensorSpec(spec.name + SCALE_SUFFIX, (1,), "F32")]
        else:
            specs.append(spec)
    return sorted(specs, key=lambda s: s.name)
