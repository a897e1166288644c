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

`topk-int8-delta` (uploads, optional) sends, for each 2+ dimensional float tensor, only the k = ceil(f * size)
largest-magnitude elements of the error-fed delta: `name#index` (I32 [k], strictly increasing flat C-order
indices), `name` (I8 [k]) and `name#scale` (F32 [ceil(k / BLOCK)]), the int8 quantization of the kept
values. Vectors and non-float tensors travel as in int8-delta. Everything not sent stays in the residual.

Downloads (optional, `download_codec: int8-delta`): the aggregator sends global model v as an int8-delta
against v - 1 and from then on uses the *decoded* model as the global model itself (see encode_global_delta),
so every device that applies the delta holds bit for bit the model the aggregator aggregates against.

`patch` (downloads, `bn_statistics: measured`): some of a version's tensors replaced, the rest kept. After the
fleet has measured BatchNorm statistics on global version v, the aggregator sends only those statistics as a patch
of v (base_version = model_version = v); the receiver copies them over the v it holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import ProtocolError
from .messages import TensorSpec, TransferManifest

PLAIN = "safetensors"
INT8_DELTA = "int8-delta"
TOPK_INT8_DELTA = "topk-int8-delta"
PATCH = "patch"
UPLOAD_CODECS = (PLAIN, INT8_DELTA, TOPK_INT8_DELTA)
DOWNLOAD_CODECS = (PLAIN, INT8_DELTA)
SCALE_SUFFIX = "#scale"
INDEX_SUFFIX = "#index"
DEFAULT_TOPK_FRACTION = 0.1  # share of each kernel's elements a topk-int8-delta update carries
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


def _check_wire(wire: Tensors, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    value = wire.get(name)
    if value is None:
        raise ProtocolError("tensors", f"{name} missing from the compressed update")
    if isinstance(value, np.generic):
        value = np.asarray(value)  # a 0-d tensor computed in numpy may be a scalar
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype) or value.shape != shape:
        got = f"{getattr(value, 'dtype', type(value).__name__)} {list(getattr(value, 'shape', ()))}"
        raise ProtocolError("tensors", f"{name}: expected {np.dtype(dtype)} {list(shape)}, got {got}")
    return value


def _check_scales(wire: Tensors, name: str, count: int) -> np.ndarray:
    scales = wire.get(name + SCALE_SUFFIX)
    if (not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.shape != (num_blocks(count),)
            or not np.isfinite(scales).all()):
        raise ProtocolError("tensors", f"{name}{SCALE_SUFFIX} missing or invalid")
    return scales


def _check_index(wire: Tensors, name: str, size: int) -> np.ndarray:
    index = wire.get(name + INDEX_SUFFIX)
    if not isinstance(index, np.ndarray) or index.dtype != np.int32 or index.ndim != 1 or not 1 <= index.size <= size:
        raise ProtocolError("tensors", f"{name}{INDEX_SUFFIX} missing or invalid (I32, 1..{size} elements)")
    if int(index[0]) < 0 or int(index[-1]) >= size or (index.size > 1 and not (np.diff(index) > 0).all()):
        raise ProtocolError("tensors", f"{name}{INDEX_SUFFIX}: indices must be strictly increasing in [0, {size})")
    return index


def _check_names(wire: Tensors, reference: Tensors, codec: str) -> None:
    expected = {spec.name for spec in wire_specs(_specs(reference), codec, _declared_k(wire, reference))}
    extra = sorted(set(wire) - expected)
    if extra:
        raise ProtocolError("tensors", f"unexpected tensors in the {codec} update: {extra[:3]}")


def decode_int8_delta(wire: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    """The update the sender meant: reference + its delta for every float tensor of `reference`."""
    return decode_update(wire, reference, INT8_DELTA)


def decode_update(wire: Tensors, reference: Tensors, codec: str) -> dict[str, np.ndarray]:
    """Rebuild the tensors a sender encoded under `codec` against `reference`; ProtocolError if malformed.

    Exact: the result is bit for bit what encode_update's sender computed as reference + sent delta."""
    if codec == PLAIN:
        return dict(wire)
    if codec == PATCH:
        return _apply_patch(wire, reference)
    if codec not in (INT8_DELTA, TOPK_INT8_DELTA):
        raise ProtocolError("codec", f"unknown codec {codec!r}")
    _check_names(wire, reference, codec)
    tensors = {}
    for name, ref in reference.items():
        if name not in wire:
            raise ProtocolError("tensors", f"{name} missing from the {codec} update")
        if not _is_float(ref):
            tensors[name] = _check_wire(wire, name, ref.dtype.type, ref.shape)
            continue
        if ref.ndim >= 2 and codec == TOPK_INT8_DELTA:
            index = _check_index(wire, name, ref.size)
            codes = _check_wire(wire, name, np.int8, index.shape)
            flat = np.zeros(ref.size, np.float32)
            flat[index] = _dequantize_int8(codes, _check_scales(wire, name, index.size))
            delta = flat.reshape(ref.shape)
        elif ref.ndim >= 2:
            codes = _check_wire(wire, name, np.int8, ref.shape)
            delta = _dequantize_int8(codes, _check_scales(wire, name, ref.size))
        else:
            delta = _check_wire(wire, name, np.float16, ref.shape).astype(np.float32)
        tensors[name] = np.asarray((ref.astype(np.float32) + delta).astype(ref.dtype))  # 0-d stays an array
    return tensors


def topk_count(size: int, fraction: float) -> int:
    """Elements a topk-int8-delta update keeps of a tensor with `size` elements."""
    if not 0 < fraction <= 1:
        raise ProtocolError("codec_topk", f"top-k fraction must be in (0, 1], got {fraction!r}")
    return min(size, max(1, math.ceil(fraction * size)))


def encode_topk_int8_delta(tensors: Tensors, reference: Tensors, residual: Mapping[str, np.ndarray] | None = None,
                           fraction: float = DEFAULT_TOPK_FRACTION) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Like encode_int8_delta, but each 2+ dimensional float tensor sends only its k largest |delta| elements."""
    residual = residual or {}
    wire, new_residual = {}, {}
    for name, value in tensors.items():
        if not _is_float(value) or value.ndim < 2:
            part, rest = encode_int8_delta({name: value}, {name: reference[name]},
                                           {name: residual[name]} if name in residual else None)
            wire.update(part)
            new_residual.update(rest)
            continue
        delta = (value.astype(np.float32) - reference[name].astype(np.float32) + residual.get(name, 0.0)).ravel()
        k = topk_count(delta.size, fraction)
        index = np.sort(np.argpartition(np.abs(delta), delta.size - k)[delta.size - k:]).astype(np.int32)
        codes, scales = _quantize_int8(delta[index])
        sent = np.zeros_like(delta)
        sent[index] = _dequantize_int8(codes, scales)
        wire[name], wire[name + SCALE_SUFFIX], wire[name + INDEX_SUFFIX] = codes, scales, index
        new_residual[name] = (delta - sent).reshape(value.shape)
    return wire, new_residual


def encode_update(tensors: Tensors, reference: Tensors, codec: str, residual: Mapping[str, np.ndarray] | None = None,
                  topk: float = DEFAULT_TOPK_FRACTION) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire tensors, new residual) under `codec`; PLAIN sends the tensors as they are (no residual)."""
    if codec == PLAIN:
        return dict(tensors), {}
    if codec == INT8_DELTA:
        return encode_int8_delta(tensors, reference, residual)
    if codec == TOPK_INT8_DELTA:
        return encode_topk_int8_delta(tensors, reference, residual, topk)
    raise ProtocolError("codec", f"unknown codec {codec!r}")


def encode_global_delta(new: Tensors, reference: Tensors, residual: Mapping[str, np.ndarray] | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Aggregator side of the int8-delta download: (wire tensors, decoded model, new residual).

    The decoded model, not `new`, becomes the global model: it is exactly what every device rebuilds with
    decode_update(wire, reference, INT8_DELTA), so the aggregator and the fleet never drift apart. What
    quantization left out of this version (new - decoded) is carried into the next version's delta."""
    wire, new_residual = encode_int8_delta(new, reference, residual)
    return wire, decode_update(wire, reference, INT8_DELTA), new_residual


def _apply_patch(wire: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    unknown = sorted(set(wire) - set(reference))
    if unknown:
        raise ProtocolError("tensors", f"the patch names tensors the model lacks: {unknown[:3]}")
    for name, value in wire.items():
        _check_wire(wire, name, reference[name].dtype.type, reference[name].shape)
    return {**reference, **wire}


def as_global_delta(manifest: TransferManifest, base_version: int, model_sha256: str,
                    codec: str = INT8_DELTA) -> TransferManifest:
    """A global transfer built (by chunking.build_transfer, codec safetensors) from encode_global_delta's wire
    tensors (or a patch's tensors), declared as `codec` against `base_version`, rebuilding the model with
    `model_sha256`."""
    declared = dataclasses.replace(manifest, codec=codec, base_version=base_version, model_sha256=model_sha256)
    return TransferManifest.from_json(declared.to_json())  # validated as a receiver will


def _specs(tensors: Tensors) -> list[TensorSpec]:
    from .codec import tensor_specs

    return tensor_specs(tensors)


def _declared_k(wire: Tensors, reference: Tensors) -> dict[str, int]:
    return {name: int(np.size(wire[name + INDEX_SUFFIX])) for name in reference if name + INDEX_SUFFIX in wire}


def declared_topk(specs: Sequence[TensorSpec]) -> dict[str, int]:
    """k per tensor as a manifest's `name#index` specs declare it (for wire_specs on the receiving side)."""
    return {spec.name[:-len(INDEX_SUFFIX)]: int(spec.shape[0]) for spec in specs
            if spec.name.endswith(INDEX_SUFFIX) and len(spec.shape) == 1}


def wire_specs(reference: Sequence[TensorSpec], codec: str, topk: Mapping[str, int] | float | None = None
               ) -> list[TensorSpec]:
    """The tensor list a manifest must declare for an update of `reference` under `codec`.

    topk-int8-delta: `topk` is either the fraction the fleet announced or k per tensor name as a manifest
    declares it (declared_topk); a declared k must be in [1, size]."""
    if codec == PLAIN:
        return list(reference)
    if codec not in (INT8_DELTA, TOPK_INT8_DELTA):
        raise ProtocolError("codec", f"unknown codec {codec!r}")
    specs = []
    for spec in reference:
        size = int(np.prod(spec.shape))
        if spec.dtype not in FLOAT_DTYPES:
            specs.append(spec)
        elif len(spec.shape) >= 2 and codec == TOPK_INT8_DELTA:
            if isinstance(topk, Mapping):
                k = int(topk.get(spec.name, 0))
                if not 1 <= k <= size:
                    raise ProtocolError("tensors", f"{spec.name}{INDEX_SUFFIX}: k={k} not in [1, {size}]")
            else:
                k = topk_count(size, DEFAULT_TOPK_FRACTION if topk is None else float(topk))
            specs += [TensorSpec(spec.name, (k,), "I8"),
                      TensorSpec(spec.name + SCALE_SUFFIX, (num_blocks(k),), "F32"),
                      TensorSpec(spec.name + INDEX_SUFFIX, (k,), "I32")]
        elif len(spec.shape) >= 2:
            specs += [TensorSpec(spec.name, spec.shape, "I8"),
                      TensorSpec(spec.name + SCALE_SUFFIX, (num_blocks(size),), "F32")]
        else:
            specs.append(TensorSpec(spec.name, spec.shape, "F16"))
    return sorted(specs, key=lambda s: s.name)
