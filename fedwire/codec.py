"""Tensor payload encoding: safetensors bytes, deterministic for equal inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from .errors import ProtocolError, TransferError
from .messages import TensorSpec

# (numpy kind, itemsize) -> safetensors dtype name; BF16 has no numpy dtype.
_DTYPE_NAMES = {
    ("b", 1): "BOOL",
    ("u", 1): "U8", ("u", 2): "U16", ("u", 4): "U32", ("u", 8): "U64",
    ("i", 1): "I8", ("i", 2): "I16", ("i", 4): "I32", ("i", 8): "I64",
    ("f", 2): "F16", ("f", 4): "F32", ("f", 8): "F64",
}


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ProtocolError("dtype", f"{dtype} has no safetensors equivalent") from None


def _wire_array(name: object, array: np.ndarray) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise ProtocolError("tensors", f"tensor name {name!r} must be a non-empty string")
    if not isinstance(array, np.ndarray):
        raise ProtocolError(f"tensors[{name}]", f"expected a numpy array, got {type(array).__name__}")
    dtype_name(array.dtype)
    # safetensors is little-endian, C order.
    # np.asarray keeps 0-d shapes (ascontiguousarray would make them 1-d).
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    ordered = {name: _wire_array(name, tensors[name]) for name in sorted(tensors)}
    return safetensors.numpy.save(ordered)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TransferError("payload", f"not a valid safetensors payload: {exc}") from None


def tensor_specs(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    return [
        TensorSpec(name, tuple(int(d) for d in tensors[name].shape), dtype_name(tensors[name].dtype))
        for name in sorted(tensors)
    ]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
