"""Tensor payload codec: exact round trips, determinism, malformed input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedwire.codec import decode_tensors, encode_tensors, sha256_hex, tensor_specs
from fedwire.errors import ProtocolError, TransferError
from fedwire.messages import TensorSpec


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.random(8).astype(np.float16),
        "counts": rng.integers(-2**62, 2**62, size=(4, 5), dtype=np.int64),
        "mask": rng.random((3, 2)) > 0.5,
        "pixels": rng.integers(0, 255, size=(2, 2, 3), dtype=np.uint8),
        "scale": np.full((), 3.25, np.float64),  # 0-d
        "empty": np.zeros((0, 4), np.float32),
    }


def test_round_trip_is_bit_exact_for_every_dtype():
    tensors = _sample_tensors()
    decoded = decode_tensors(encode_tensors(tensors))
    assert sorted(decoded) == sorted(tensors)
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype, name
        assert decoded[name].shape == array.shape, name
        assert decoded[name].tobytes() == array.tobytes(), name


def test_special_float_values_survive():
    values = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(np.float32).tiny], np.float32)
    decoded = decode_tensors(encode_tensors({"x": values}))["x"]
    assert decoded.tobytes() == values.tobytes()


def test_encoding_is_deterministic_and_independent_of_insertion_order():
    tensors = _sample_tensors()
    reversed_order = dict(reversed(list(tensors.items())))
    assert encode_tensors(tensors) == encode_tensors(reversed_order)


def test_non_contiguous_and_big_endian_arrays_are_normalised():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[:, ::2]
    big_endian = base.astype(">f4")
    decoded = decode_tensors(encode_tensors({"strided": strided, "big": big_endian}))
    np.testing.assert_array_equal(decoded["strided"], strided)
    np.testing.assert_array_equal(decoded["big"], base)
    assert decoded["big"].dtype == np.float32
    assert encode_tensors({"x": strided}) == encode_tensors({"x": strided.copy()})


def test_decoded_arrays_are_writable():
    decoded = decode_tensors(encode_tensors({"w": np.ones(3, np.float32)}))
    decoded["w"][0] = 5.0
    assert decoded["w"][0] == 5.0


@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 64, b"\x08" + b"\x00" * 7 + b"{not json"])
def test_malformed_payload_raises_transfer_error(data):
    with pytest.raises(TransferError) as info:
        decode_tensors(data)
    assert info.value.field == "payload"


def test_truncated_payload_raises_transfer_error():
    payload = encode_tensors({"w": np.ones(100, np.float32)})
    with pytest.raises(TransferError):
        decode_tensors(payload[:-1])


@pytest.mark.parametrize("array", [np.ones(2, np.complex64), np.array(["a"], dtype=object)])
def test_unsupported_dtype_is_refused(array):
    with pytest.raises(ProtocolError, match="safetensors"):
        encode_tensors({"x": array})


def test_non_array_and_bad_names_are_refused():
    with pytest.raises(ProtocolError, match="numpy array"):
        encode_tensors({"x": [1.0, 2.0]})
    with pytest.raises(ProtocolError, match="name"):
        encode_tensors({"": np.ones(1)})


def test_tensor_specs_are_sorted_with_safetensors_dtype_names():
    specs = tensor_specs(_sample_tensors())
    assert [s.name for s in specs] == sorted(_sample_tensors())
    by_name = {s.name: s for s in specs}
    assert by_name["conv.weight"] == TensorSpec("conv.weight", (8, 3, 3, 3), "F32")
    assert by_name["bn.running_var"].dtype == "F16"
    assert by_name["counts"].dtype == "I64"
    assert by_name["mask"].dtype == "BOOL"
    assert by_name["scale"].shape == ()


def test_sha256_hex():
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
