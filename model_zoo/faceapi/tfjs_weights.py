"""Read TF.js "weights manifest" files (+ .bin shards) into numpy arrays.

The format: a JSON list of weight groups, each naming its shard files and its tensors. A group's
shards are concatenated and its tensors lie back to back in manifest order. A tensor may carry
`quantization`: uint8/uint16 with value = byte * scale + min, or float16.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_RAW_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
}
_QUANT_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
}


def _stored_dtype(spec: Mapping[str, Any]) -> np.dtype:
    quant = spec.get("quantization")
    table, key = (_QUANT_DTYPES, quant["dtype"]) if quant else (_RAW_DTYPES, spec["dtype"])
    if key not in table:
        raise ValueError(f"tensor {spec['name']!r}: unsupported stored dtype {key!r}")
    return table[key]


def _dequantize(stored: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    quant = spec.get("quantization")
    if not quant:
        return stored
    if quant["dtype"] == "float16":
        return stored.astype(np.float32)
    # Same arithmetic as tfjs: v * scale + min in float64, then rounded once to float32.
    return (stored.astype(np.float64) * quant["scale"] + quant["min"]).astype(np.float32)


def decode_weights(specs: Sequence[Mapping[str, Any]], buffer: bytes) -> dict[str, np.ndarray]:
    """Decode one weight group's tensors from its concatenated shard bytes."""
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        dtype = _stored_dtype(spec)
        count = int(np.prod(spec["shape"], dtype=np.int64))
        end = offset + count * dtype.itemsize
        if end > len(buffer):
            raise ValueError(f"tensor {spec['name']!r} runs past the end of the weight data")
        stored = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        weights[spec["name"]] = _dequantize(stored, spec).reshape(spec["shape"]).copy()
        offset = end
    if offset != len(buffer):
        raise ValueError(f"{len(buffer) - offset} bytes of weight data left over after the last tensor")
    return weights


def read_tfjs_weights(manifest_path: str | Path) -> dict[str, np.ndarray]:
    """Read a TF.js weights manifest and its shards (resolved next to the manifest)."""
    manifest_path = Path(manifest_path)
    groups = json.loads(manifest_path.read_text())
    weights: dict[str, np.ndarray] = {}
    for group in groups:
        buffer = b"".join((manifest_path.parent / shard).read_bytes() for shard in group["paths"])
        weights.update(decode_weights(group["weights"], buffer))
    return weights
