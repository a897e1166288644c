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


# ---- top-k sparsification (topk-int8-delta) ----

from fedwire.chunking import build_transfer  # noqa: E402
from fedwire.codec import encode_tensors, sha256_hex  # noqa: E402
from fedwire.compression import (  # noqa: E402
    TOPK_INT8_DELTA,
    as_global_delta,
    declared_topk,
    decode_update,
    encode_global_delta,
    encode_topk_int8_delta,
    encode_update,
    topk_count,
)
from fedwire.messages import TransferManifest  # noqa: E402


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
            "fc": rng.standard_normal((40, 30)).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 2, 16).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, np.int64)}


def test_topk_keeps_the_largest_elements_and_decodes_exactly():
    reference = _model(0)
    rng = np.random.default_rng(1)
    update = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 if v.dtype == np.float32 else v)
              for k, v in reference.items()}
    wire, residual = encode_topk_int8_delta(update, reference, fraction=0.1)
    k = topk_count(16 * 8 * 9, 0.1)
    assert wire["conv"].shape == (k,) and wire["conv#index"].dtype == np.int32 and wire["conv#scale"].shape == (1,)
    assert (np.diff(wire["conv#index"]) > 0).all()
    delta = (update["conv"] - reference["conv"]).ravel()
    kept = np.abs(delta[wire["conv#index"]])
    dropped = np.delete(np.abs(delta), wire["conv#index"])
    assert kept.min() >= dropped.max()  # the k largest magnitudes, nothing else
    assert tensor_specs(wire) == wire_specs(tensor_specs(reference), TOPK_INT8_DELTA, 0.1)
    assert tensor_specs(wire) == wire_specs(tensor_specs(reference), TOPK_INT8_DELTA, declared_topk(tensor_specs(wire)))
    decoded = decode_update(wire, reference, TOPK_INT8_DELTA)
    assert decoded["bn.num_batches_tracked"] == 7
    for name in ("conv", "fc"):
        sent = np.zeros(reference[name].size, np.float32)
        index = wire[name + "#index"]
        sent[index] = wire[name].astype(np.float32) * np.repeat(wire[name + "#scale"], BLOCK)[:index.size]
        expected = (reference[name] + sent.reshape(reference[name].shape)).astype(np.float32)
        np.testing.assert_array_equal(decoded[name], expected)  # exact: what the sender computed
        untouched = np.ones(reference[name].size, bool)
        untouched[index] = False
        np.testing.assert_array_equal(decoded[name].ravel()[untouched], reference[name].ravel()[untouched])
        np.testing.assert_allclose(residual[name], update[name] - decoded[name], atol=1e-6)  # what was not sent


def test_topk_error_feedback_delivers_every_element_eventually():
    reference = {"w": np.zeros((10, 10), np.float32)}
    update = {"w": np.linspace(0.01, 1.0, 100, dtype=np.float32).reshape(10, 10)}
    received, residual = np.zeros((10, 10), np.float32), None
    for _ in range(200):
        wire, residual = encode_update(update, reference, TOPK_INT8_DELTA, residual, topk=0.1)
        received += decode_update(wire, reference, TOPK_INT8_DELTA)["w"]
    # nothing is lost: what arrived plus what the device still holds is exactly what it meant to send ...
    np.testing.assert_allclose(received + residual["w"], 200 * update["w"], rtol=1e-4, atol=1e-3)
    assert (received > 0).mean() >= 0.95  # ... nearly every element, small ones included, got through
    assert np.abs(residual["w"]).max() < 10  # and the backlog stays bounded, far below the 200 sent in total


@pytest.mark.parametrize("tamper, message", [
    (lambda w: w.update({"fc#index": w["fc#index"][::-1].copy()}), "strictly increasing"),
    (lambda w: w["fc#index"].__setitem__(-1, 40 * 30), r"\[0, 1200\)"),
    (lambda w: w.update({"fc#index": w["fc#index"].astype(np.int64)}), "I32"),
    (lambda w: w.pop("fc#index"), "fc#index"),
    (lambda w: w.update({"fc": w["fc"][:-1]}), "expected int8"),
    (lambda w: w.update({"fc#scale": np.array([np.inf] * w["fc#scale"].size, np.float32)}), "scale"),
    (lambda w: w.update({"extra": np.zeros(3, np.float32)}), "unexpected tensors"),
    (lambda w: w.update({"bn.running_var": w["bn.running_var"].astype(np.float32)}), "expected float16"),
])
def test_malformed_compressed_updates_are_refused_with_a_clear_reason(tamper, message):
    reference = _model(0)
    update = {k: v + np.float32(0.5) if v.dtype == np.float32 else v for k, v in reference.items()}
    wire, _ = encode_topk_int8_delta(update, reference, fraction=0.2)
    tamper(wire)
    with pytest.raises(ProtocolError, match=message):
        decode_update(wire, reference, TOPK_INT8_DELTA)


def test_malformed_int8_delta_updates_are_refused():
    reference = _model(0)
    wire, _ = encode_int8_delta({k: v + 1 if v.dtype == np.float32 else v for k, v in reference.items()}, reference)
    for bad in ({**wire, "conv": wire["conv"].astype(np.int16)}, {**wire, "fc": wire["fc"][:, :-1]},
                {**wire, "junk#scale": np.ones(1, np.float32)}, {**wire, "conv#scale": wire["conv#scale"][:-1]}):
        with pytest.raises(ProtocolError):
            decode_update(bad, reference, INT8_DELTA)
    with pytest.raises(ProtocolError, match="codec"):
        decode_update(wire, reference, "zstd")
    with pytest.raises(ProtocolError, match="k=0"):
        wire_specs(tensor_specs(reference), TOPK_INT8_DELTA, {})


# ---- downloads: the global model as a delta against the previous version ----

def test_download_deltas_rebuild_the_aggregators_model_bit_for_bit_over_many_rounds():
    rng = np.random.default_rng(3)
    server = _model(0)  # version 0, sent in full
    device = {k: v.copy() for k, v in server.items()}
    residual = None
    for version in range(1, 16):
        # the aggregate the server would publish: the model moves, BatchNorm variances shrink towards zero
        aggregate = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.05 if k in ("conv", "fc")
                         else np.maximum(v * np.float32(0.3), 0) if v.dtype == np.float32 else np.asarray(v + 1))
                     for k, v in server.items()}
        wire, decoded, residual = encode_global_delta(aggregate, server, residual)
        manifest, _ = build_transfer("global", "aggregator", version, version, wire)
        manifest = TransferManifest.from_json(
            as_global_delta(manifest, version - 1, sha256_hex(encode_tensors(decoded))).to_json())
        assert manifest.codec == INT8_DELTA and manifest.base_version == version - 1
        device = decode_update(wire, device, manifest.codec)  # what every device holding version - 1 does
        for name in server:
            np.testing.assert_array_equal(device[name], decoded[name])
        assert sha256_hex(encode_tensors(device)) == manifest.model_sha256
        assert (device["bn.running_var"] >= 0).all()
        server = decoded  # the aggregator's next reference is the decoded model, never the raw aggregate
    # error feedback: the decoded model does not wander away from the aggregate it tracks
    assert np.abs(server["fc"] - aggregate["fc"]).max() < 0.02


def test_a_device_that_missed_a_version_cannot_apply_the_next_delta():
    v0 = _model(0)
    v1 = encode_global_delta({k: v + 1 if v.dtype == np.float32 else v for k, v in v0.items()}, v0)[1]
    wire2, v2, _ = encode_global_delta({k: v + 1 if v.dtype == np.float32 else v for k, v in v1.items()}, v1)
    stale = decode_update(wire2, v0, INT8_DELTA)  # applying v1->v2 to v0 "works" numerically ...
    assert sha256_hex(encode_tensors(stale)) != sha256_hex(encode_tensors(v2))  # ... but the model hash catches it


def test_a_patch_replaces_only_its_tensors_and_refuses_strangers():
    from fedwire.compression import PATCH, decode_update

    base = {"w": np.ones((4, 3), np.float32), "bn.running_var": np.ones(3, np.float32)}
    rebuilt = decode_update({"bn.running_var": np.full(3, 2.0, np.float32)}, base, PATCH)
    np.testing.assert_array_equal(rebuilt["bn.running_var"], [2.0, 2.0, 2.0])
    assert rebuilt["w"] is base["w"]
    with pytest.raises(ProtocolError, match="lacks"):
        decode_update({"other": np.ones(3, np.float32)}, base, PATCH)
    with pytest.raises(ProtocolError, match="expected float32"):
        decode_update({"bn.running_var": np.ones(4, np.float32)}, base, PATCH)
