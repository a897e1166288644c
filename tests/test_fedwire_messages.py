"""JSON messages, topics and errors: round trips and field-named validation failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedwire.errors import ProtocolError, TransferError
from fedwire.messages import (
    PROTOCOL_VERSION,
    DeviceStatus,
    RoundAnnouncement,
    RoundSummary,
    TrainSettings,
    TensorSpec,
    TransferManifest,
    UpdateAck,
)
from fedwire.topics import ParsedTopic, Topics, validate_device_id

HEX32 = "0123456789abcdef" * 2
SHA = "ab" * 32


def _manifest(**overrides) -> TransferManifest:
    fields = dict(kind="update", transfer_id=HEX32, sender="dev-1", round=4, model_version=3, num_samples=120,
                  tensors=[TensorSpec("a", (2, 3), "F32"), TensorSpec("b", (), "I64")], payload_bytes=1000,
                  payload_sha256=SHA, chunk_size=400, chunk_sha256=[SHA] * 3, metrics={"train_loss": 0.25})
    return TransferManifest(**{**fields, **overrides})


MESSAGES = [
    _manifest(),
    RoundAnnouncement(round=2, model_version=1, state="open", announce_id=HEX32, deadline=1.7e9, min_clients=2,
                      train=TrainSettings(local_epochs=1, lr=0.05), expires=1.7e9 + 60),
    DeviceStatus("rpi4-01", "training", 2, 1.7e9, "epoch 1/1"),
    DeviceStatus("rpi4-01", "offline", None, 1.7e9),
    UpdateAck("rpi4-01", 2, HEX32, False, "shape mismatch"),
    RoundSummary(round=2, model_version=2, clients=["a", "b"], num_samples=80, bytes_up=10, bytes_down=20,
                 train_loss=None, metrics={"val_accuracy": 0.9}, seconds=12.5),
]


def _json(message) -> dict:
    return json.loads(message.to_json())


def _bytes(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    data = message.to_json()
    assert isinstance(data, bytes)
    assert type(message).from_json(data) == message
    assert json.loads(data)["protocol"] == PROTOCOL_VERSION == 1


def test_encoding_is_compact_sorted_and_deterministic():
    data = MESSAGES[2].to_json()
    assert data == MESSAGES[2].to_json()
    assert b" " not in data.replace(b"epoch 1/1", b"")
    assert list(json.loads(data)) == sorted(json.loads(data))


def test_manifest_json_layout():
    obj = _json(_manifest())
    assert obj["tensors"][0] == {"name": "a", "shape": [2, 3], "dtype": "F32"}
    assert obj["codec"] == "safetensors" and obj["chunk_sha256"] == [SHA] * 3
    assert _manifest().chunk_count == 3


def test_numpy_scalars_are_normalised_to_plain_numbers():
    summary = RoundSummary(round=np.int64(1), model_version=1, clients=[], num_samples=np.int64(5), bytes_up=0,
                           bytes_down=0, train_loss=np.float32(0.5), metrics={"acc": np.float64(0.75)}, seconds=1)
    assert _json(summary)["train_loss"] == 0.5 and _json(summary)["round"] == 1


def test_unknown_fields_are_ignored_and_defaults_apply():
    obj = _json(MESSAGES[4])
    obj["future_field"] = {"x": 1}
    del obj["reason"]
    ack = UpdateAck.from_json(_bytes(obj))
    assert ack.reason == "" and ack.transfer_id == HEX32


@pytest.mark.parametrize("data", [b"", b"\xff\xfe\x00garbage", b"{", b"not json", b"{\"a\": NaN}", b"[" * 100000])
def test_garbage_bytes_raise_protocol_error(data):
    with pytest.raises(ProtocolError) as info:
        DeviceStatus.from_json(data)
    assert info.value.field == "json"


@pytest.mark.parametrize("data", [b"[]", b"[1, 2]", b"\"text\"", b"3", b"null", b"true"])
def test_non_object_json_raises_protocol_error(data):
    with pytest.raises(ProtocolError, match="expected an object") as info:
        UpdateAck.from_json(data)
    assert info.value.field == "json"


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="limit"):
        UpdateAck.from_json(b" " * (5 * 1024 * 1024))


def test_non_bytes_input_is_refused():
    with pytest.raises(ProtocolError, match="bytes"):
        UpdateAck.from_json(MESSAGES[4].to_json().decode())


@pytest.mark.parametrize("version, reason", [(2, "unsupported version 2"), (0, "unsupported"),
                                             ("1", "integer"), (1.0, "integer"), (True, "integer")])
def test_wrong_protocol_version_names_the_protocol_field(version, reason):
    obj = {**_json(MESSAGES[1]), "protocol": version, "round": "checked after the version"}
    with pytest.raises(ProtocolError, match=reason) as info:
        RoundAnnouncement.from_json(_bytes(obj))
    assert info.value.field == "protocol"


def test_missing_protocol_field():
    obj = _json(MESSAGES[2])
    del obj["protocol"]
    with pytest.raises(ProtocolError, match="missing") as info:
        DeviceStatus.from_json(_bytes(obj))
    assert info.value.field == "protocol"


MANIFEST_FAULTS = [
    ("round", -1, "round", "minimum"),
    ("round", "4", "round", "integer"),
    ("round", 4.0, "round", "integer"),
    ("round", True, "round", "integer"),
    ("num_samples", -5, "num_samples", "minimum"),
    ("kind", "model", "kind", "not one of"),
    ("transfer_id", "0123456789ABCDEF" * 2, "transfer_id", "does not match"),
    ("transfer_id", "abc", "transfer_id", "does not match"),
    ("transfer_id", 123, "transfer_id", "string"),
    ("sender", "bad/id", "sender", "device id"),
    ("sender", "", "sender", "device id"),
    ("payload_sha256", "zz" * 32, "payload_sha256", "does not match"),
    ("payload_bytes", 0, "payload_bytes", "minimum"),
    ("chunk_size", 0, "chunk_size", "minimum"),
    ("chunk_sha256", [SHA, SHA, "nothex"], "chunk_sha256[2]", "does not match"),
    ("chunk_sha256", [SHA] * 2, "chunk_sha256", "make 3"),
    ("chunk_sha256", SHA, "chunk_sha256", "list"),
    ("tensors", {"a": 1}, "tensors", "list"),
    ("tensors", [1], "tensors[0]", "object"),
    ("tensors", [{"name": "a", "shape": [2, -3], "dtype": "F32"}], "tensors[0].shape[1]", "non-negative"),
    ("tensors", [{"name": "a", "shape": [2], "dtype": "float32"}], "tensors[0].dtype", "not one of"),
    ("tensors", [{"name": "", "shape": [2], "dtype": "F32"}], "tensors[0].name", "empty"),
    ("tensors", [{"name": "a", "shape": [1], "dtype": "F32"}] * 2, "tensors", "duplicate"),
    ("metrics", {"loss": "low"}, "metrics.loss", "finite number"),
    ("metrics", [1.0], "metrics", "object"),
    ("codec", "pickle", "codec", "not one of"),
]


@pytest.mark.parametrize("key, value, field, reason", MANIFEST_FAULTS,
                         ids=[f"{f[0]}={f[1]!r}"[:40] for f in MANIFEST_FAULTS])
def test_manifest_validation_names_the_field(key, value, field, reason):
    obj = {**_json(_manifest()), key: value}
    with pytest.raises(ProtocolError, match=reason) as info:
        TransferManifest.from_json(_bytes(obj))
    assert info.value.field == field


@pytest.mark.parametrize("cls, index, key, value, reason", [
    (RoundAnnouncement, 1, "state", "closed", "not one of"),
    (RoundAnnouncement, 1, "announce_id", "xyz", "does not match"),
    (RoundAnnouncement, 1, "deadline", -1.0, "minimum"),
    (RoundAnnouncement, 1, "deadline", "soon", "finite number"),
    (RoundAnnouncement, 1, "train", [], "object"),
    (RoundAnnouncement, 1, "min_clients", None, "integer"),
    (DeviceStatus, 2, "device_id", "../etc", "device id"),
    (DeviceStatus, 2, "state", "sleeping", "not one of"),
    (DeviceStatus, 2, "round", -2, "minimum"),
    (DeviceStatus, 2, "detail", 5, "string"),
    (UpdateAck, 4, "accepted", 1, "true/false"),
    (UpdateAck, 4, "round", None, "integer"),
    (RoundSummary, 5, "clients", ["ok", "not ok"], "device id"),
    (RoundSummary, 5, "train_loss", "nan", "finite number"),
    (RoundSummary, 5, "seconds", -1, "minimum"),
    (RoundSummary, 5, "bytes_up", -1, "minimum"),
])
def test_message_validation_names_the_field(cls, index, key, value, reason):
    obj = {**_json(MESSAGES[index]), key: value}
    with pytest.raises(ProtocolError, match=reason) as info:
        cls.from_json(_bytes(obj))
    assert info.value.field.startswith(key)


def test_missing_required_field_is_named():
    obj = _json(MESSAGES[1])
    del obj["deadline"]
    with pytest.raises(ProtocolError, match="missing") as info:
        RoundAnnouncement.from_json(_bytes(obj))
    assert info.value.field == "deadline"


def test_to_json_refuses_what_a_receiver_would_reject():
    with pytest.raises(ProtocolError) as info:
        DeviceStatus("dev-1", "sleeping", None, 0.0).to_json()
    assert info.value.field == "state"
    with pytest.raises(ProtocolError) as info:
        RoundSummary(1, 1, [], 0, 0, 0, float("nan"), {}, 1.0).to_json()
    assert info.value.field == "train_loss"
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement(1, 1, "open", HEX32, 0.0, 1, TrainSettings(lr=float("inf"))).to_json()
    assert info.value.field == "train.lr"


def test_error_types_and_format():
    error = TransferError("chunk", "sha256 mismatch")
    assert isinstance(error, ProtocolError) and isinstance(error, ValueError)
    assert str(error) == "chunk: sha256 mismatch"
    assert (error.field, error.reason) == ("chunk", "sha256 mismatch")


# -- topics -------------------------------------------------------------------


def test_topic_names():
    t = Topics()
    assert t.round == "facefed/round"
    assert t.global_manifest == "facefed/global/manifest"
    assert t.global_chunk(7) == "facefed/global/chunk/7"
    assert t.update_manifest("dev-1") == "facefed/update/dev-1/manifest"
    assert t.update_chunk("dev-1", 0) == "facefed/update/dev-1/chunk/0"
    assert t.status("dev-1") == "facefed/status/dev-1"
    assert t.ack("dev-1") == "facefed/ack/dev-1"
    assert t.round_summary == "facefed/summary"
    assert t.aggregator_subscriptions() == ["facefed/update/+/manifest", "facefed/update/+/chunk/+", "facefed/status/+"]
    assert t.agent_subscriptions("d") == ["facefed/round", "facefed/global/manifest", "facefed/global/chunk/+",
                                          "facefed/ack/d"]


@pytest.mark.parametrize("prefix", ["facefed", "lab/facefed-2"])
def test_every_topic_parses_back(prefix):
    t = Topics(prefix)
    cases = {
        t.round: ParsedTopic("round"),
        t.round_summary: ParsedTopic("summary"),
        t.global_manifest: ParsedTopic("global_manifest"),
        t.global_chunk(12): ParsedTopic("global_chunk", chunk_index=12),
        t.update_manifest("cam.7"): ParsedTopic("update_manifest", "cam.7"),
        t.update_chunk("cam.7", 0): ParsedTopic("update_chunk", "cam.7", 0),
        t.status("cam_7"): ParsedTopic("status", "cam_7"),
        t.ack("Cam7"): ParsedTopic("ack", "Cam7"),
    }
    for topic, expected in cases.items():
        assert t.parse(topic) == expected, topic


@pytest.mark.parametrize("topic", [
    "other/round", "facefed", "facefed/", "facefed/round/x", "facefed/unknown", "facefed/global/chunk/01",
    "facefed/global/chunk/-1", "facefed/global/chunk/x", "facefed/global/chunk/4294967296",
    "facefed/update/-dev/manifest", "facefed/update/dev/chunk", "facefed/status/" + "a" * 65, "facefedx/round",
])
def test_unknown_or_malformed_topics_raise(topic):
    with pytest.raises(ProtocolError):
        Topics().parse(topic)


@pytest.mark.parametrize("prefix", ["", "a//b", "/a", "a/", "fed/+", "fed/#", "fed erated"])
def test_bad_prefix_is_refused(prefix):
    with pytest.raises(ProtocolError, match="prefix"):
        Topics(prefix)


def test_device_id_validation():
    assert validate_device_id("rpi4-01.lab_A") == "rpi4-01.lab_A"
    assert validate_device_id("a" * 64)
    for bad in ["", "-a", ".a", "a" * 65, "a/b", "a+b", "a#", "a b", "é", None, 5]:
        with pytest.raises(ProtocolError):
            validate_device_id(bad)
    with pytest.raises(ProtocolError):
        Topics().status("a/b")  # building a topic validates too: no wildcard injection


# ---- download codec fields (PROTOCOL.md 5.2) ----

def _delta_manifest(**overrides) -> TransferManifest:
    return _manifest(**{"kind": "global", "sender": "aggregator", "round": 5, "model_version": 5, "num_samples": 0,
                        "metrics": {}, "codec": "int8-delta", "base_version": 4, "model_sha256": "cd" * 32,
                        **overrides})


def test_plain_manifests_do_not_carry_the_download_fields():
    obj = _json(_manifest())
    assert "base_version" not in obj and "model_sha256" not in obj  # byte for byte what earlier versions sent
    assert TransferManifest.from_json(_manifest().to_json()).base_version is None


def test_a_global_delta_round_trips_with_its_base_and_model_hash():
    manifest = _delta_manifest()
    back = TransferManifest.from_json(manifest.to_json())
    assert back == manifest and back.base_version == 4 and back.model_sha256 == "cd" * 32
    obj = _json(_manifest(codec="topk-int8-delta"))
    assert obj["codec"] == "topk-int8-delta"


def test_a_statistics_patch_completes_the_version_it_names():
    patch = _delta_manifest(codec="patch", base_version=5)
    assert TransferManifest.from_json(patch.to_json()).base_version == 5
    with pytest.raises(ProtocolError) as info:
        _delta_manifest(codec="patch", base_version=4).to_json()
    assert info.value.field == "base_version"
    statistics = _manifest(kind="statistics")  # a device's measured BatchNorm statistics
    assert TransferManifest.from_json(statistics.to_json()).kind == "statistics"


@pytest.mark.parametrize("overrides, field", [
    ({"base_version": 5}, "base_version"),  # not older than the version it builds (a patch aside)
    ({"base_version": None}, "base_version"),  # a compressed global model must say what it applies to
    ({"model_sha256": ""}, "model_sha256"),
    ({"model_sha256": "XY" * 32}, "model_sha256"),
    ({"codec": "safetensors"}, "base_version"),  # a full model names no base
    ({"kind": "update", "sender": "dev-1"}, "base_version"),  # only global transfers are deltas of a version
    ({"base_version": -1}, "base_version"),
])
def test_inconsistent_download_fields_are_refused(overrides, field):
    with pytest.raises(ProtocolError) as info:
        _delta_manifest(**overrides).to_json()
    assert info.value.field == field
