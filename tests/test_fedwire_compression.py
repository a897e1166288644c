import numpy as np
import pytest

from fedwire.codec import tensor_specs
from fedwire.compression import BLOCK, INT8_DELTA, PLAIN, decode_int8_delta, encode_int8_delta, wire_specs
from fedwire.errors import ProtocolError


def test_round_trip_error_is_at_most_half_a_step_and_specs_match():
    rng = np.random.default_rng(0)
    reference = {"w": rng.standard_normal((64, 32)).astype(np.float32), "steps": np.array([3], np.int64)}
    update = {"w": reference["w"] + rng.standard_normal((64, 32)).astype(np.float32) * 0.05, "steps": reference["steps"]}
    wire, residual = encode_int8_delta(update, reference)
    assert wire["w"].dtype == np.int8 and wire["w#scale"].shape == (64 * 32 // BLOCK,)
    step = np.repeat(wire["w#scale"], BLOCK).reshape(64, 32)  # each element's own block scale
    decoded = decode_int8_delta(wire, reference)
    assert (np.abs(decoded["w"] - update["w"]) <= step / 2 + 1e-6).all()
    np.testing.assert_allclose(residual["w"], (update["w"] - reference["w"]) - (decoded["w"] - reference["w"]), atol=1e-6)
    assert tensor_specs(wire) == wire_specs(tensor_specs(reference), INT8_DELTA)
    vectors = {"bias": np.ones(3, np.float32)}
    assert encode_int8_delta(vectors, {"bias": np.zeros(3, np.float32)})[0]["bias"].dtype == np.float16
    assert wire_specs(tensor_specs(reference), PLAIN) == tensor_specs(reference)


def test_error_feedback_keeps_a_small_steady_drift_from_vanishing():
    # A delta far below one quantization step (set by a large value elsewhere) rounds to zero every
    # time without feedback; with feedback its running sum reaches the receiver.
    reference = {"w": np.zeros((1, 2), np.float32)}
    update = {"w": np.array([[1.0, 0.003]], np.float32)}  # one block: step = 1/127 ~ 0.0079
    sent_without, sent_with, residual = 0.0, 0.0, None
    for _ in range(100):
        plain, _ = encode_int8_delta(update, reference)
        sent_without += decode_int8_delta(plain, reference)["w"][0, 1]
        wire, residual = encode_int8_delta(update, reference, residual)
        sent_with += decode_int8_delta(wire, reference)["w"][0, 1]
    assert sent_without == 0.0
    assert sent_with == pytest.approx(0.3, abs=0.01)


def test_missing_or_bad_scales_are_refused():
    reference = {"w": np.zeros((2, 2), np.float32)}
    wire, _ = encode_int8_delta({"w": np.ones((2, 2), np.float32)}, reference)
    with pytest.raises(ProtocolError, match="scale"):
        decode_int8_delta({"w": wire["w"]}, reference)
    with pytest.raises(ProtocolError, match="scale"):
        decode_int8_delta({**wire, "w#scale": np.array([np.nan], np.float32)}, reference)
    with pytest.raises(ProtocolError, match="codec"):
        wire_specs(tensor_specs(reference), "zstd")


def test_a_large_value_coarsens_only_its_own_block():
    reference = {"w": np.zeros((4, BLOCK), np.float32)}
    update = {"w": np.full((4, BLOCK), 0.01, np.float32)}
    update["w"][0, 0] = 100.0  # one outlier in block 0
    decoded = decode_int8_delta(encode_int8_delta(update, reference)[0], reference)["w"]
    assert np.abs(decoded[1:] - 0.01).max() < 0.01 / 254 + 1e-9  # blocks 1..3 keep their own fine step
    assert decoded[0, 0] == pytest.approx(100.0)


def test_ragged_tensors_and_vectors_round_trip_within_their_precision():
    rng = np.random.default_rng(1)
    reference = {"k": rng.standard_normal((3, 5, 7)).astype(np.float32), "b": rng.standard_normal(9).astype(np.float32),
                 "t": np.float32(2.5).reshape(())}
    update = {name: value + np.float32(0.1) for name, value in reference.items()}
    wire, _ = encode_int8_delta(update, reference)
    assert wire["k#scale"].shape == (1,) and wire["b"].dtype == np.float16 and wire["t"].shape == ()
    decoded = decode_int8_delta(wire, reference)
    for name in reference:
        np.testing.assert_allclose(decoded[name], update[name], atol=1e-3)
    assert tensor_specs(wire) == wire_specs(tensor_specs(reference), INT8_DELTA)


def test_a_non_negative_value_never_arrives_negative():
    # A variance that collapses to (almost) zero: plain float16 rounding of the delta could overshoot.
    reference = {"running_var": np.array([1.2351, 3.3003, 0.7], np.float32)}
    update = {"running_var": np.array([0.0, 1e-9, 0.7], np.float32)}
    plain_rounding = reference["running_var"] + (update["running_var"] - reference["running_var"]).astype(np.float16)
    assert (plain_rounding[:2] < 0).all()  # what the guard prevents
    decoded = decode_int8_delta(encode_int8_delta(update, reference)[0], reference)["running_var"]
    assert (decoded >= 0).all()
    np.testing.assert_allclose(decoded, update["running_var"], atol=2e-3)
