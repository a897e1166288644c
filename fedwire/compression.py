"""The int8-delta update codec: an update travels as its difference from the round's global model.

- Float tensors of 2+ dimensions (kernels and weight matrices: nearly all the bytes) become int8 with one
  float32 scale per block of BLOCK consecutive elements (C order): `name` (I8, same shape) and
  `name#scale` (F32, [ceil(size / BLOCK)]). Per-block scales follow the range of each part of a tensor, so
  one large value no longer coarsens the whole tensor's step.
- Float vectors and scalars (biases, norm scales, BatchNorm statistics) become float16 deltas (`name`, F16,
  same shape). Where a value is non-negative its rebuilt value is too (a BatchNorm variance must stay >= 0).
- Other dtypes (integer counters) travel as they are.

The receiver rebuilds reference + delta exactly as the sender computed it. The sender keeps each tensor's
quantization error and adds it to the next round's delta (error feedback), so rounding errors do not add
up to a bias. Pure functions, no I/O.
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
BLOCK = 256  # elements per int8 scale: 4 bytes of scale per 256 bytes of payload (1.6 %)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

Tensors = Mapping[str, np.ndarray]


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def num_blocks(size: int) -> int:
    return max(1, -(-size // BLOCK))


def _blocks(flat: np.ndarray) -> np.ndarray:
    """[num_blocks, BLOCK] view of a flat float32 array, zero-padded at the end."""
    padded = np.zeros(num_blocks(flat.size) * BLOCK, np.float32)
    padded[:flat.size] = flat
    return padded.reshape(-1, BLOCK)


def _quantize_int8(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes shaped like delta, float32 scale per block)."""
    blocks = _blocks(delta.ravel())
    peak = np.abs(blocks).max(axis=1)
    scales = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes.ravel()[:delta.size].reshape(delta.shape), scales


def _dequantize_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    blocks = _blocks(codes.astype(np.float32).ravel()) * scales[:, None]
    return blocks.ravel()[:codes.size].reshape(codes.shape)


def _float16_delta(value: np.ndarray, reference: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """delta in float16, rounded up where rounding would push a non-negative value below zero."""
    finite16 = np.finfo(np.float16).max
    codes = np.clip(delta, -finite16, finite16).astype(np.float16)
    below_zero = (value >= 0) & (reference + codes.astype(np.float32) < 0)
    if below_zero.any():
        floor = (-reference[below_zero]).astype(np.float16)  # nearest float16 to the delta that gives 0 ...
        short = floor.astype(np.float32) < -reference[below_zero]
        floor[short] = np.nextafter(floor[short], np.float16(np.inf))  # ... or the next one up
        codes[below_zero] = floor
    return codes


def encode_int8_delta(tensors: Tensors, reference: Tensors,
                      residual: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire tensors, new residual) for an update against `reference`, adding last round's `residual`."""
    residual = residual or {}
    wire, new_residual = {}, {}
    for name, value in tensors.items():
        if not _is_float(value):
            wire[name] = value
            continue
        ref = reference[name].astype(np.float32)
        delta = value.astype(np.float32) - ref + residual.get(name, 0.0)
        if value.ndim >= 2:
            codes, scales = _quantize_int8(delta)
            wire[name], wire[name + SCALE_SUFFIX] = codes, scales
            sent = _dequantize_int8(codes, scales)
        else:
            wire[name] = _float16_delta(value.astype(np.float32), ref, delta)
            sent = wire[name].astype(np.float32)
        new_residual[name] = delta - sent
    return wire, new_residual


def decode_int8_delta(wire: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    """The update the sender meant: reference + its delta for every float tensor of `reference`."""
    tensors = {}
    for name, ref in reference.items():
        if name not in wire:
            raise ProtocolError("tensors", f"{name} missing from the int8-delta update")
        if not _is_float(ref):
            tensors[name] = wire[name]
            continue
        if ref.ndim >= 2:
            scales = wire.get(name + SCALE_SUFFIX)
            if scales is None or scales.shape != (num_blocks(ref.size),) or not np.isfinite(scales).all():
                raise ProtocolError("tensors", f"{name}{SCALE_SUFFIX} missing or invalid")
            delta = _dequantize_int8(wire[name], scales)
        else:
            delta = wire[name].astype(np.float32)
        tensors[name] = (ref.astype(np.float32) + delta).astype(ref.dtype)
    return tensors


def wire_specs(reference: Sequence[TensorSpec], codec: str) -> list[TensorSpec]:
    """The tensor list a manifest must declare for an update of `reference` under `codec`."""
    if codec == PLAIN:
        return list(reference)
    if codec != INT8_DELTA:
        raise ProtocolError("codec", f"unknown codec {codec!r}")
    specs = []
    for spec in reference:
        if spec.dtype not in FLOAT_DTYPES:
            specs.append(spec)
        elif len(spec.shape) >= 2:
            size = int(np.prod(spec.shape))
            specs += [TensorSpec(spec.name, spec.shape, "I8"),
                      TensorSpec(spec.name + SCALE_SUFFIX, (num_blocks(size),), "F32")]
        else:
            specs.append(TensorSpec(spec.name, spec.shape, "F16"))
    return sorted(specs, key=lambda s: s.name)
