"""The fleet dashboard against a real broker and real HTTP: what the fleet publishes shows up in the API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, DashboardConfig, load_aggregator_config
from aggregator.dashboard import Dashboard
from aggregator.dashboard.feed import RoundsLogTail
from fedwire.broker import EmbeddedBroker
from fedwire.chunking import build_transfer
from fedwire.config import ConfigError
from fedwire.messages import DeviceStatus, RoundAnnouncement, RoundSummary, TrainSettings, UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics

import numpy as np

PREFIX = "facefed/dash"
TOPICS = Topics(PREFIX)


def _get(url: str, token: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def broker():
    with EmbeddedBroker() as b:
        yield b.url


@pytest.fixture
def dashboard(broker, tmp_path):
    config = AggregatorConfig(state_dir=tmp_path / "state", broker=broker, topic_prefix=PREFIX)
    (tmp_path / "state").mkdir()
    board = Dashboard(config, "127.0.0.1:0")
    board.start()
    _wait_for(lambda: board.state.connected, what="the dashboard's broker connection")  # acks are not retained
    yield board
    board.stop()


def _publisher(url: str) -> MqttLink:
    link = MqttLink(url, client_id="test-fleet", on_message=lambda t, p: None, subscriptions=[])
    link.connect()
    return link


def test_dashboard_shows_devices_rounds_refusals_and_models(broker, dashboard, tmp_path):
    fleet = _publisher(broker)
    now = time.time()
    try:
        fleet.publish(TOPICS.status("cam-01"), DeviceStatus("cam-01", "training", 1, now, profile="rpi4",
                                                            model_version=0, train_window="open").to_json(), retain=True)
        fleet.publish(TOPICS.status("cam-02"), DeviceStatus("cam-02", "offline", None, now, "connection lost")
                      .to_json(), retain=True)
        fleet.publish(TOPICS.status("cam-03"), DeviceStatus(
            "cam-03", "idle", 1, now, "refused facefed/dash/round: signature: message is unsigned").to_json(), retain=True)
        fleet.publish(TOPICS.status("bogus"), b"{not json")  # logged and dropped; the dashboard carries on
        manifest, chunks = build_transfer("global", "aggregator", 0, 0, {"w": np.ones(4, np.float32)})
        fleet.publish(TOPICS.global_manifest, manifest.to_json(), retain=True)
        announcement = RoundAnnouncement(1, 0, "open", "ab" * 16, now + 300, 2, TrainSettings())
        fleet.publish(TOPICS.round, announcement.to_json(), retain=True)
        update, _ = build_transfer("update", "cam-01", 1, 0, {"w": np.ones(4, np.float32)}, num_samples=5)
        fleet.publish(TOPICS.update_manifest("cam-01"), update.to_json())
        fleet.publish(TOPICS.ack("cam-01"), UpdateAck("cam-01", 1, update.transfer_id, True).to_json())
        fleet.publish(TOPICS.ack("cam-03"), UpdateAck("cam-03", 1, "cd" * 16, False, "shape mismatch on w").to_json())
        base = dashboard.url

        status = _wait_for(lambda: (s := _get(base + "api/status"))["current"] and s["current"]["rejected"] and s,
                           what="the round with its refusal")
        devices = {d["device_id"]: d for d in status["devices"]}
        assert devices["cam-01"]["online"] and devices["cam-01"]["state"] == "training"
        assert devices["cam-01"]["profile"] == "rpi4" and devices["cam-01"]["model_version"] == 0
        assert devices["cam-01"]["last_contributed"] == 1
        assert not devices["cam-02"]["online"] and devices["cam-02"]["state"] == "offline"
        assert devices["cam-03"]["last_refusal"] == "shape mismatch on w"
        assert devices["cam-03"]["reported_refusals"] == ["refused facefed/dash/round: signature: message is unsigned"]
        assert "bogus" not in devices
        current = status["current"]
        assert status["round"] == 1 and current["state"] == "training" and current["quorum"] == 2
        assert current["accepted_devices"] == ["cam-01"] and current["bytes_in"] == update.payload_bytes
        assert current["refusals"][0]["reason"] == "shape mismatch on w"
        assert 290 < current["seconds_left"] <= 300
        assert status["models"][0]["sha256"] == manifest.payload_sha256 and not status["models"][0]["signed"]

        # History: rounds.jsonl lines, and a summary before its line is written.
        log_path = tmp_path / "state" / "rounds.jsonl"
        log_path.write_text(json.dumps({"round": 0, "model_version": 0, "clients": 0, "val_accuracy": 0.7}) + "\n"
                            + '{"round": 1, "partial')
        fleet.publish(TOPICS.round_summary, RoundSummary(1, 1, ["cam-01"], 5, 100, 200, 0.5, {"eer": 0.2}, 3.0)
                      .to_json(), retain=True)
        rounds = _wait_for(lambda: len(r := _get(base + "api/rounds")["rounds"]) == 2 and r, what="two rounds")
        assert rounds[0]["val_accuracy"] == 0.7 and rounds[1]["eer"] == 0.2
        device = _get(base + "api/devices/cam-03")
        assert device["events"][0]["reason"] == "shape mismatch on w" and not device["events"][0]["accepted"]
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(base + "api/devices/nobody")
        assert missing.value.code == 404
        assert len(_get(base + "api/devices")["devices"]) == 3
    finally:
        fleet.close()


def test_event_stream_sends_a_snapshot(dashboard):
    with urllib.request.urlopen(dashboard.url + "events", timeout=5) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.readline() == b"event: status\n"
        data = stream.readline()
    assert data.startswith(b"data: ") and "devices" in json.loads(data[6:])


def test_token_is_required_when_configured(broker, tmp_path):
    token = "s3cret-token-0123456789"
    config = AggregatorConfig(state_dir=tmp_path, broker=broker, topic_prefix=PREFIX,
                              dashboard=DashboardConfig(listen="127.0.0.1:0", token=token))
    board = Dashboard(config)
    board.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(board.url + "api/status")
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            _get(board.url + "api/status", token="wrong-token-0123456789")
        assert "devices" in _get(board.url + "api/status", token=token)
        assert "devices" in _get(board.url + f"api/status?token={token}")
    finally:
        board.stop()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aggregator.yaml"
    path.write_text("state_dir: state\n" + text)
    return path


def test_dashboard_config_is_validated_with_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"dashboard\.listen: 0\.0\.0\.0 is beyond loopback"):
        load_aggregator_config(_write(tmp_path, "dashboard: {listen: '0.0.0.0:8080'}\n"))
    with pytest.raises(ConfigError, match=r"dashboard\.listen: .* is not HOST:PORT"):
        load_aggregator_config(_write(tmp_path, "dashboard: {listen: 'here'}\n"))
    with pytest.raises(ConfigError, match=r"dashboard\.token: must be at least 16"):
        load_aggregator_config(_write(tmp_path, "dashboard: {listen: '127.0.0.1:1', token: short}\n"))
    with pytest.raises(ConfigError, match=r"dashboard: needs the broker's address"):
        load_aggregator_config(_write(tmp_path, "embedded_port: 0\ndashboard: {listen: '127.0.0.1:8080'}\n"))
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match=r"dashboard\.token_file: must hold a token of at least 16"):
        load_aggregator_config(_write(tmp_path, "dashboard: {listen: '0.0.0.0:8080', token_file: token}\n"))
    (tmp_path / "token").write_text("a-long-enough-token-123\n")
    config = load_aggregator_config(_write(tmp_path, "dashboard: {listen: '0.0.0.0:8080', token_file: token}\n"))
    assert config.dashboard.bearer_token() == "a-long-enough-token-123"


def test_serve_refuses_a_dashboard_beyond_loopback_without_a_token(tmp_path, capsys):
    from aggregator.cli import main

    assert main(["serve", "--config", str(_write(tmp_path, "")), "--dashboard", "0.0.0.0:8080"]) == 2
    assert "dashboard.listen: 0.0.0.0 is beyond loopback: set token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(_write(tmp_path, "")), "--dashboard", "no-port"])
    assert "is not HOST:PORT" in capsys.readouterr().err


def test_rounds_log_tail_waits_for_whole_lines(tmp_path):
    path = tmp_path / "rounds.jsonl"
    tail = RoundsLogTail(path)
    assert tail.read_new() == []
    path.write_text('{"round": 0}\n{"round": 1')
    assert tail.read_new() == [{"round": 0}]
    with path.open("a") as handle:
        handle.write('}\nnot json\n')
    assert tail.read_new() == [{"round": 1}]
    path.write_text('{"round": 0}\n')  # replaced (shorter): read again from the start
    assert tail.read_new() == [{"round": 0}]


def test_dashboard_identity_reads_the_fleet_on_the_hardened_broker(hardened_broker, tmp_path):
    """mosquitto with broker-config's ACL: the `dashboard` certificate sees statuses and every device's acks,
    and may not publish what only the aggregator does."""
    from aggregator import pki
    from fedwire.config import TlsConfig
    from fedwire.pki_layout import ca_files, client_tls, device_files

    pki.issue_device_cert(hardened_broker.pki, "dashboard")
    own, ca = device_files(hardened_broker.pki, "dashboard"), ca_files(hardened_broker.pki).cert
    topics = Topics(hardened_broker.prefix)
    config = AggregatorConfig(state_dir=tmp_path, broker=hardened_broker.url, topic_prefix=hardened_broker.prefix,
                              dashboard=DashboardConfig(mqtt_tls=TlsConfig(ca, own.cert, own.key)))
    # One connection per certificate (the broker makes its CN the client id): try the forgery before the dashboard.
    forger = MqttLink(hardened_broker.url, "test-dashboard", lambda t, p: None, [],
                      tls=client_tls(hardened_broker.pki, "dashboard"))
    forger.connect()
    try:
        with pytest.raises(ConnectionError, match="Not authorized"):
            forger.publish(topics.round, b"forged", retain=True)
    finally:
        forger.close()
    board = Dashboard(config, "127.0.0.1:0")
    board.start()
    _wait_for(lambda: board.state.connected, what="the dashboard's broker connection")
    links = []
    try:
        for identity in ("cam-a", pki.AGGREGATOR_IDENTITY):
            link = MqttLink(hardened_broker.url, f"test-{identity}", lambda t, p: None, [],
                            tls=client_tls(hardened_broker.pki, identity))
            link.connect()
            links.append(link)
        device, aggregator = links
        device.publish(topics.status("cam-a"), DeviceStatus("cam-a", "online", None, time.time()).to_json(), retain=True)
        aggregator.publish(topics.ack("cam-b"), UpdateAck("cam-b", 1, "ef" * 16, False, "late").to_json())
        status = _wait_for(lambda: len((s := _get(board.url + "api/status"))["devices"]) == 2 and s,
                           what="cam-a's status and cam-b's ack")
        devices = {d["device_id"]: d for d in status["devices"]}
        assert devices["cam-a"]["online"] and devices["cam-b"]["last_refusal"] == "late"
    finally:
        for link in links:
            link.close()
        board.stop()


def test_round_state_follows_quorum_deadline_reannouncement_and_phase():
    from aggregator.dashboard.state import FleetState

    state, now = FleetState(), 1000.0
    state.on_announcement(RoundAnnouncement(4, 3, "open", "ab" * 16, now + 60, 2, TrainSettings()), now)
    state.on_ack(UpdateAck("cam-1", 4, "01" * 16, True), now)
    state.on_ack(UpdateAck("cam-1", 4, "01" * 16, True), now)  # acked again (a resend): counted once
    assert state.round_view(now)["state"] == "training" and state.round_view(now)["accepted"] == 1
    assert state.round_view(now + 61)["state"] == "closing"  # deadline passed, summary not in yet
    # The same round announced again (an aggregator restart): what was accepted stays, the deadline moves.
    state.on_announcement(RoundAnnouncement(4, 3, "open", "cd" * 16, now + 120, 2, TrainSettings()), now)
    assert state.round_view(now + 61)["state"] == "training" and state.round_view(now)["accepted"] == 1
    state.on_ack(UpdateAck("cam-2", 4, "02" * 16, True), now)
    assert state.round_view(now)["state"] == "closing"  # quorum reached
    state.on_announcement(RoundAnnouncement(4, 4, "statistics", "ef" * 16, now + 60, 2, TrainSettings()), now)
    view = state.round_view(now)
    assert (view["state"], view["accepted"], view["model_version"]) == ("statistics", 0, 4)
    assert len(state.device("cam-1")["events"]) == 1 and state.device("cam-1")["last_contributed"] == 4


def test_status_fields_for_the_dashboard_are_optional_and_left_out_when_unset():
    from fedwire.errors import ProtocolError

    plain = DeviceStatus("cam-1", "idle", 3, 10.0, "ok")
    assert plain.to_json() == (b'{"detail":"ok","device_id":"cam-1","protocol":1,"round":3,"state":"idle",'
                               b'"timestamp":10.0}')  # what earlier versions sent, byte for byte
    full = DeviceStatus("cam-1", "idle", 3, 10.0, "ok", profile="rpi4", model_version=0, train_window="open")
    assert DeviceStatus.from_json(full.to_json()) == full
    with pytest.raises(ProtocolError, match="model_version"):
        DeviceStatus.from_json(full.to_json().replace(b'"model_version":0', b'"model_version":-1'))


def test_model_versions_show_the_signature_check_and_key_fingerprint():
    import dataclasses

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from aggregator.dashboard.feed import FleetFeed, key_fingerprint
    from aggregator.dashboard.state import FleetState
    from fedwire.signing import sign

    key = Ed25519PrivateKey.generate()
    fingerprint = key_fingerprint(key.public_key())
    state = FleetState(fingerprint)
    feed = FleetFeed(state, TOPICS, key.public_key())
    for version in (1, 2):
        manifest, _ = build_transfer("global", "aggregator", version, version, {"w": np.full(4, version, np.float32)})
        signed = sign(manifest, key)
        if version == 2:  # altered after signing: the page must say so
            signed = dataclasses.replace(signed, round=7)
        feed.handle(TOPICS.global_manifest, signed.to_json())
    good, forged = state.status()["models"]
    assert len(fingerprint) == 16 and (good["signature_valid"], good["key_fingerprint"]) == (True, fingerprint)
    assert (forged["signed"], forged["signature_valid"], forged["key_fingerprint"]) == (True, False, "")
    feed.handle(TOPICS.global_manifest, b"\x00garbage")  # dropped with a log line, counted
    assert feed.dropped == 1 and len(state.status()["models"]) == 2
