"""The aggregator's update handling, driven message by message, with a real embedded broker for its replies."""

import json
import time

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from fedwire.chunking import build_transfer
from fedwire.config import parse_config
from fedwire.messages import UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics


def _connected(broker: str, state_dir, **fields) -> AggregatorService:
    """A service with its initial model, connected to `broker`, round 1 open."""
    svc = AggregatorService(parse_config(AggregatorConfig, {"state_dir": str(state_dir), "broker": broker, **fields}))
    svc.start()
    return svc


@pytest.fixture
def service(embedded_broker, tmp_path):
    svc = _connected(embedded_broker, tmp_path / "state", rounds=2, min_clients=2, max_chunk_bytes=128 * 1024)
    yield svc
    svc.close()


def _send(svc, device, tensors, *, round_number=1, version=0, n=10, sender=None, corrupt_chunk=None,
          codec="safetensors", kind="update"):
    manifest, chunks = build_transfer(kind, sender or device, round_number, version, tensors,
                                      num_samples=n, max_chunk_bytes=128 * 1024, codec=codec)
    topics = Topics()
    for i, chunk in enumerate(chunks):
        if i == corrupt_chunk:
            chunk = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
        svc.handle_message(topics.update_chunk(device, i), chunk)
    svc.handle_message(topics.update_manifest(device), manifest.to_json())


def _shifted(svc, delta):
    return {k: (v + delta).astype(v.dtype) for k, v in svc.global_tensors.items()}


def _ack_recorder(url):
    acks = []
    link = MqttLink(url, client_id="ack-recorder", on_message=lambda t, p: acks.append(UpdateAck.from_json(p)),
                    subscriptions=["facefed/ack/+"])
    link.connect()
    return link, acks


def test_only_valid_fresh_updates_count_and_the_round_completes(service, embedded_broker):
    svc = service
    recorder, acks = _ack_recorder(embedded_broker)
    start = {k: v.copy() for k, v in svc.global_tensors.items()}
    a, g = _shifted(svc, 1.0), _shifted(svc, 0.5)

    _send(svc, "dev-a", a, n=30)
    assert svc.strategy.num_updates == 1
    _send(svc, "dev-a", _shifted(svc, 5.0), n=30)  # a second update from the same device
    _send(svc, "dev-b", a, round_number=0)  # stale round
    _send(svc, "dev-c", a, version=7)  # trained from a model we never published
    _send(svc, "dev-d", {**a, next(iter(a)): np.full_like(next(iter(a.values())), np.nan)})
    _send(svc, "dev-e", a, sender="dev-f")  # speaks for another device
    var_name = next(k for k in a if "running_var" in k)
    _send(svc, "dev-v", {**a, var_name: -np.abs(a[var_name]) - 1})  # e.g. a sign-flipped update
    name = next(iter(a))
    _send(svc, "dev-h", {**a, name: np.zeros((3, 3), np.float32)})  # wrong shape
    for garbage_topic in ("facefed/update/dev-i/manifest", "facefed/update/dev-i/chunk/0", "facefed/update/x y/manifest"):
        svc.handle_message(garbage_topic, b"\x00garbage")
    _send(svc, "dev-g", g, n=10, corrupt_chunk=1)  # transfer fault: dropped, never averaged
    assert svc.strategy.num_updates == 1
    assert svc.current.rejected == 6

    _send(svc, "dev-g", g, n=10)  # the retry
    assert svc.strategy.num_updates == 2
    svc.tick(time.time())

    assert svc.model_version == 1 and svc.current.number == 2
    for k, v in svc.global_tensors.items():
        if np.issubdtype(v.dtype, np.floating):
            expected = (30 * (start[k].astype(np.float64) + 1.0) + 10 * (start[k].astype(np.float64) + 0.5)) / 40
            np.testing.assert_allclose(v, expected.astype(np.float32), rtol=0, atol=1e-6)
    entry = json.loads(svc.state.log_path.read_text().splitlines()[-1])
    assert entry["round"] == 1 and entry["clients"] == 2 and entry["client_ids"] == ["dev-a", "dev-g"]
    assert entry["num_samples"] == 40 and entry["rejected"] == 6
    assert svc.state.checkpoint_path(1).exists()

    deadline = time.time() + 5
    while len([a for a in acks if a.device_id == "dev-g"]) < 2 and time.time() < deadline:
        time.sleep(0.05)
    recorder.close()
    g_acks = [a for a in acks if a.device_id == "dev-g"]
    assert [a.accepted for a in g_acks] == [False, True]
    assert g_acks[0].reason.startswith("transfer fault")  # the agent resends on exactly this
    reasons = {a.device_id: a.reason for a in acks if not a.accepted}
    assert "stale" in reasons["dev-b"] and "model version" in reasons["dev-c"]
    assert "NaN" in reasons["dev-d"] and "shape" in reasons["dev-h"]
    assert "negative BatchNorm variance" in reasons["dev-v"]


def test_deadline_closes_a_round_with_what_arrived_or_reannounces_an_empty_one(service):
    svc = service
    first_announcement = svc.current.announcement.announce_id
    svc.tick(svc.current.announcement.deadline + 1)
    assert svc.model_version == 0 and svc.current.number == 1
    assert svc.current.announcement.announce_id != first_announcement  # announced again
    _send(svc, "dev-a", _shifted(svc, 1.0))
    svc.tick(svc.current.announcement.deadline + 1)
    assert svc.model_version == 1  # one of two clients was enough once the deadline passed


def test_measured_statistics_replace_the_averaged_ones_before_the_round_closes(embedded_broker, tmp_path):
    svc = _connected(embedded_broker, tmp_path / "state", rounds=2, min_clients=2, bn_statistics="measured")
    try:
        _send(svc, "dev-a", _shifted(svc, 1.0), n=30)
        _send(svc, "dev-b", _shifted(svc, 0.5), n=10)
        svc.tick(time.time())
        # Weights averaged and published as v1; round 1 is not closed until the statistics are in.
        phase = svc.current
        assert (phase.number, phase.kind, phase.announcement.state, svc.model_version) == (1, "statistics", "statistics", 1)
        assert not svc.state.checkpoint_path(1).exists()
        weights = {k: v.copy() for k, v in svc.global_tensors.items()}
        stats = {k: v for k, v in weights.items() if k.endswith((".running_mean", ".running_var"))}
        _send(svc, "dev-c", _shifted(svc, 2.0), n=10, version=1)  # a training update now: wrong kind
        _send(svc, "dev-c", {**stats, "extra": np.ones(2, np.float32)}, n=10, version=1, kind="statistics")
        assert phase.rejected == 2 and phase.statistics.count == 0
        _send(svc, "dev-a", {k: np.full_like(v, 3.0) for k, v in stats.items()}, n=30, version=1, kind="statistics")
        _send(svc, "dev-b", {k: np.full_like(v, 1.0) for k, v in stats.items()}, n=10, version=1, kind="statistics")
        svc.tick(time.time())
        assert svc.current.number == 2 and svc.current.kind == "update"
        for name, value in svc.global_tensors.items():
            expected = np.full_like(value, 2.5) if name in stats else weights[name]  # (30 * 3 + 10 * 1) / 40
            np.testing.assert_array_equal(value, expected)
        entry = json.loads(svc.state.log_path.read_text().splitlines()[-1])
        assert entry["round"] == 1 and entry["rejected"] == 2 and svc.state.checkpoint_path(1).exists()
        # Round 2: no statistics by the deadline; the averaged ones stay and the federation finishes.
        _send(svc, "dev-a", _shifted(svc, 1.0), round_number=2, version=1)
        _send(svc, "dev-b", _shifted(svc, 1.0), round_number=2, version=1)
        svc.tick(time.time())
        averaged = {k: v.copy() for k, v in svc.global_tensors.items()}
        svc.tick(svc.current.announcement.deadline + 1)
        assert svc.current is None and svc.model_version == 2 and svc.state.checkpoint_path(2).exists()
        assert all(np.array_equal(svc.global_tensors[k], v) for k, v in averaged.items())
    finally:
        svc.close()


def test_a_fraction_of_online_devices_is_sampled_and_others_are_refused(embedded_broker, tmp_path):
    from fedwire.messages import DeviceStatus

    svc = _connected(embedded_broker, tmp_path / "s", min_clients=3, fraction_fit=0.5, strategy="fedavgm")
    try:
        for device in ("d1", "d2", "d3", "d4", "d5"):
            state = "offline" if device == "d5" else "online"
            svc.handle_message(Topics().status(device), DeviceStatus(device, state, None, time.time()).to_json())
        svc.engine.open_round(1)  # announced again, now sampling from the devices seen online
        chosen = svc.current.announcement.participants
        assert len(chosen) == 2 and set(chosen) <= {"d1", "d2", "d3", "d4"}  # ceil(0.5 * 4 online)
        assert svc.current.quorum == 2 and svc.current.announcement.min_clients == 2
        outsider = sorted({"d1", "d2", "d3", "d4"} - set(chosen))[0]
        _send(svc, outsider, _shifted(svc, 1.0))
        assert svc.strategy.num_updates == 0 and svc.current.rejected == 1
        for device in chosen:
            _send(svc, device, _shifted(svc, 1.0))
        svc.tick(time.time())
        assert svc.model_version == 1
        assert svc.state.load_optimizer_state(1)  # the momentum survives a restart
        assert svc.state.load_optimizer_state(0) == {}
    finally:
        svc.close()


def test_a_replayed_update_is_ignored_in_its_round_and_refused_in_the_next(service):
    svc = service
    manifest, chunks = build_transfer("update", "dev-a", 1, 0, _shifted(svc, 1.0), num_samples=10,
                                      max_chunk_bytes=128 * 1024)
    topics = Topics()
    recorded = [(topics.update_chunk("dev-a", i), c) for i, c in enumerate(chunks)]
    recorded.append((topics.update_manifest("dev-a"), manifest.to_json()))
    for topic, payload in recorded:
        svc.handle_message(topic, payload)
    for topic, payload in recorded:  # the same bytes again, as an attacker or a QoS 1 redelivery would
        svc.handle_message(topic, payload)
    assert svc.strategy.num_updates == 1
    _send(svc, "dev-b", _shifted(svc, 1.0))
    svc.tick(time.time())
    assert svc.current.number == 2
    rejected = svc.current.rejected
    for topic, payload in recorded:  # replayed into round 2
        svc.handle_message(topic, payload)
    assert svc.strategy.num_updates == 0 and svc.current.rejected == rejected + 1


def test_each_round_is_exported_for_inference_only_devices(embedded_broker, tmp_path):
    svc = _connected(embedded_broker, tmp_path / "s", min_clients=1, export={"formats": ["onnx"]})
    try:
        _send(svc, "dev-a", _shifted(svc, 0.1))
        svc.tick(time.time())
    finally:
        svc.close()
    exported = sorted(p.name for p in (tmp_path / "s" / "exports").iterdir())
    assert exported == ["facefed-v1-onnx.json", "facefed-v1-onnx.onnx"]
    card = json.loads((tmp_path / "s" / "exports" / "facefed-v1-onnx.json").read_text())
    assert card["model_version"] == 1


def test_int8_export_needs_calibration_faces(tmp_path):
    from fedwire.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "export": {"formats": ["onnx-int8"]}})
    assert info.value.field == "export.calibration"
    with pytest.raises(ConfigError) as info:
        parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "export": {"formats": ["gguf"]}})
    assert info.value.field == "export.formats[0]"


def test_int8_delta_updates_are_decoded_against_the_round_model(service):
    from fedwire.compression import INT8_DELTA, decode_int8_delta, encode_int8_delta

    svc = service
    start = {k: v.copy() for k, v in svc.global_tensors.items()}
    rng = np.random.default_rng(0)
    update = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01) for k, v in start.items()}
    wire, residual = encode_int8_delta(update, start)
    plain_size = sum(v.nbytes for v in update.values())
    assert sum(v.nbytes for v in wire.values()) * 3.5 < plain_size  # int8 + one scale per tensor
    _send(svc, "dev-a", wire, codec=INT8_DELTA)
    _send(svc, "dev-b", {k: v[..., :1] for k, v in wire.items() if v.ndim}, codec=INT8_DELTA)  # wrong shapes
    _send(svc, "dev-c", update)  # plain float32 still accepted
    assert svc.strategy.num_updates == 2 and svc.current.rejected == 1
    svc.tick(time.time())
    decoded = decode_int8_delta(wire, start)
    for k, v in svc.global_tensors.items():
        np.testing.assert_allclose(v, ((decoded[k].astype(np.float64) + update[k]) / 2).astype(v.dtype), atol=1e-6)
        if k in residual:  # quantized: the error is what the device keeps for the next round
            assert np.abs(decoded[k] - update[k]).max() <= np.abs(residual[k]).max() + 1e-7
        else:  # vectors travel exactly
            np.testing.assert_array_equal(decoded[k], update[k])
