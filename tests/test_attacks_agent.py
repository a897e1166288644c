"""Issue 14 items 3 and 5: agents trust nothing the aggregator's key signed unless it is also sane and current.

End to end on a real broker (the embedded amqtt one: MQTT 3.1.1 only), the "aggregator" here is an attacker
holding the fleet's signing key and a publish right on the aggregator's topics: it publishes a validly signed
all-Inf model, replays older signed models and rounds, and sends an expired announcement. The honest agent is
the real EdgeAgent with the real LocalTrainer, running in a thread.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file
from test_signing import _write_keys

from aggregator.config import AggregatorConfig
from edge_agent import refusals
from edge_agent.agent import EdgeAgent
from edge_agent.config import load_agent_config
from edge_agent.trainer import LocalTrainer, TrainingDiverged
from fedwire.chunking import Reassembler, build_transfer
from fedwire.config import ConfigError, parse_config
from fedwire.errors import ProtocolError
from fedwire.messages import DeviceStatus, RoundAnnouncement, TrainSettings, TransferManifest, UpdateAck
from fedwire.mqtt import MqttLink, speaks_tls
from fedwire.signing import load_signing_key, sign
from fedwire.topics import Topics
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import shared_tensors
from model_zoo.data import FaceDataset

MODEL = {"arch": "mobilefacenet", "act": "relu", "embedding_size": 128}
FEDERATION = 1.7e9
pytestmark = pytest.mark.timeout(180)


def _faces() -> FaceDataset:
    rng = np.random.default_rng(0)
    return FaceDataset(rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8), np.array([0, 0, 1, 1]), ["a", "b"])


def _initial() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return shared_tensors(build_backbone("mobilefacenet"))


def _all_inf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, np.inf) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def _finite_file(path) -> bool:
    from safetensors.numpy import load_file

    return all(np.isfinite(v).all() for v in load_file(str(path)).values())


def _announcement(round_number: int, version: int, state: str = "open", expires_in: float | None = 600.0,
                  federation: float = FEDERATION) -> RoundAnnouncement:
    now = time.time()
    return RoundAnnouncement(round_number, version, state, f"{round_number:02d}{version:02d}".ljust(32, "0"), now + 60,
                             1, TrainSettings(local_epochs=1, lr=0.01, model=MODEL),
                             expires=None if expires_in is None else now + expires_in, federation=federation)


# ---- typed train settings (issue 15 item 5) ----------------------------------

def test_train_settings_parse_strictly_with_the_field_named():
    settings = TrainSettings(lr=0.1, codec="topk-int8-delta", codec_topk=0.2, model=MODEL)
    assert TrainSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    # What earlier aggregators sent (no download_codec, no codec_topk) reads with the one set of defaults.
    old = {"local_epochs": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "margin": 0.5, "proximal_mu": 0.0,
           "l2sp_alpha": 0.0, "negative_anchors": 0, "anchor_seed": 0, "codec": "safetensors", "model": MODEL}
    assert TrainSettings.from_dict(old) == TrainSettings(local_epochs=2, model=MODEL)
    assert TrainSettings.from_dict({}) == TrainSettings()
    for bad, field in (({"augment": True}, "train.augment"), ({"lr": "fast"}, "train.lr"),
                       ({"local_epochs": 1.5}, "train.local_epochs"), ({"local_epochs": 0}, "train.local_epochs"),
                       ({"codec": "zip"}, "train.codec"), ({"model": []}, "train.model"),
                       ({"codec_topk": 2.0}, "train.codec_topk")):
        with pytest.raises(ProtocolError) as info:
            TrainSettings.from_dict(bad)
        assert info.value.field == field, bad
    wire = json.loads(_announcement(3, 2).to_json())
    wire["train"]["dp_noise"] = 1.0  # a setting this agent does not know: it must not train without it
    with pytest.raises(ProtocolError, match="train.dp_noise: unknown setting"):
        RoundAnnouncement.from_json(json.dumps(wire).encode())


@dataclasses.dataclass
class _Privacy:
    noise_multiplier: float = 0.0


@dataclasses.dataclass
class _ExtendedSettings(TrainSettings):
    """How a later setting group (differential privacy, say) joins: a nested dataclass, read the same strict way."""

    privacy: _Privacy = dataclasses.field(default_factory=_Privacy)


def test_a_nested_settings_group_is_parsed_strictly_too():
    settings = _ExtendedSettings(privacy=_Privacy(1.1))
    assert _ExtendedSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    for bad, field in (({"privacy": {"clip": 1}}, "train.privacy.clip"),
                       ({"privacy": {"noise_multiplier": "x"}}, "train.privacy.noise_multiplier")):
        with pytest.raises(ProtocolError) as info:
            _ExtendedSettings.from_dict(bad)
        assert info.value.field == field


def test_aggregator_yaml_train_section_is_the_same_dataclass(tmp_path):
    config = parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "train": {"lr": 0.2, "local_epochs": 3}})
    assert isinstance(config.train, TrainSettings) and (config.train.lr, config.train.local_epochs) == (0.2, 3)
    for train, field in (({"lr": 0}, "train.lr"), ({"codec": "int8-delta"}, "train.codec"),
                         ({"momentum": "high"}, "train.momentum")):
        with pytest.raises(ConfigError) as info:
            parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "train": train})
        assert info.value.field == field, train


# ---- freshness rules and the files they live in -------------------------------

def test_freshness_orders_federation_round_and_version_and_expiry():
    mark = refusals.after_announcement(refusals.Watermark(), _announcement(5, 4))
    assert refusals.announcement_refusal(mark, _announcement(5, 4), time.time(), 0) is None  # announced again
    assert refusals.announcement_refusal(mark, _announcement(6, 5), time.time(), 0) is None
    assert "older than round 5" in refusals.announcement_refusal(mark, _announcement(4, 3), time.time(), 0)
    assert "earlier federation" in refusals.announcement_refusal(
        mark, _announcement(9, 9, federation=FEDERATION - 1), time.time(), 0)
    expired = _announcement(6, 5, expires_in=-7200)
    assert "expired" in refusals.announcement_refusal(mark, expired, time.time(), 3600)
    assert refusals.announcement_refusal(mark, expired, time.time(), 3 * 3600) is None  # within the clock's error
    assert refusals.announcement_refusal(mark, _announcement(6, 5, expires_in=None), time.time() + 1e6, 0) is None
    # A global model older than the announced one is refused; a newer federation starts its versions over.
    assert "older than v4" in refusals.global_refusal(mark, 3)
    assert refusals.global_refusal(mark, 4) is None and refusals.global_refusal(mark, 5) is None
    later = refusals.after_announcement(refusals.after_global(mark, 9), _announcement(1, 0, federation=FEDERATION + 1))
    assert later.global_floor == 0 and refusals.global_refusal(later, 0) is None


def test_watermark_is_persisted_atomically_and_a_bad_file_is_survived(tmp_path, caplog):
    mark = refusals.Watermark(FEDERATION, 7, 6, 6)
    refusals.save_watermark(tmp_path, mark)
    assert refusals.load_watermark(tmp_path) == mark
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / refusals.FRESHNESS_FILE).write_text('{"round": ')  # truncated
    assert refusals.load_watermark(tmp_path) == refusals.Watermark()
    assert "unreadable" in caplog.text
    assert refusals.load_watermark(tmp_path / "none") == refusals.Watermark()


# ---- the device's own files: the head never becomes non-finite ---------------

def test_a_diverged_round_keeps_the_last_good_head_and_a_bad_stored_head_is_rebuilt(tmp_path, caplog):
    trainer = LocalTrainer(_faces(), tmp_path, batch_size=4, augment=False, seed=0)
    good = _initial()
    settings = TrainSettings(lr=0.01, model=MODEL)
    assert np.isfinite(trainer.train_round(1, good, settings).result.loss)
    kept = trainer.head_path.read_bytes()
    with pytest.raises(TrainingDiverged, match="NaN or Inf|loss is nan"):
        trainer.train_round(2, _all_inf(good), settings)
    assert trainer.head_path.read_bytes() == kept  # not stored: the last good head
    for damage in ("truncated", "non-finite"):
        if damage == "truncated":
            trainer.head_path.write_bytes(kept[: len(kept) // 2])
        else:
            save_file({"weight": np.full((2, 128), np.inf, np.float32)}, str(trainer.head_path))
        caplog.clear()
        result = trainer.train_round(3, good, settings)  # no crash, no manual clean-up
        assert np.isfinite(result.result.loss)
        assert "discarded, a new one is built" in caplog.text, damage
        assert _finite_file(trainer.head_path)  # rebuilt, finite, readable


# ---- TLS-port detection ---------------------------------------------------------

def test_a_plain_url_against_a_tls_port_says_use_mqtts(mosquitto_tls_broker, embedded_broker):
    plain = mosquitto_tls_broker.replace("mqtts://", "mqtt://")
    link = MqttLink(plain, "plain-to-tls", lambda t, p: None, [])
    with pytest.raises(ConnectionError, match="this port speaks TLS: use mqtts://127.0.0.1:"):
        link.connect(timeout=5.0)
    host, port = embedded_broker.removeprefix("mqtt://").split(":")
    assert not speaks_tls(host, int(port))  # a plain MQTT listener is not mistaken for TLS


# ---- end to end: a real broker, the real agent, an attacker with the signing key --------

class Fleet:
    """The aggregator's side, played by whoever holds the signing key: publishes retained signed messages,
    acknowledges updates, and records the device's updates and statuses."""

    def __init__(self, url: str, key) -> None:
        self.topics = Topics()
        self.key = key
        self.updates: queue.Queue[tuple[TransferManifest, dict]] = queue.Queue()
        self.statuses: list[DeviceStatus] = []
        self.reassembler = Reassembler()
        self.link = MqttLink(url, "test-attacker", self._on, self.topics.aggregator_subscriptions())
        self.link.connect()

    def _on(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed.kind == "status":
            self.statuses.append(DeviceStatus.from_json(payload))
            return
        if parsed.kind == "update_manifest":
            done = self.reassembler.add_manifest(parsed.device_id, TransferManifest.from_json(payload), time.time())
        else:
            done = self.reassembler.add_chunk(parsed.device_id, payload, time.time())
        if done is not None:
            m = done.manifest
            self.link.publish_nowait(self.topics.ack(m.sender), UpdateAck(m.sender, m.round, m.transfer_id, True).to_json())
            self.updates.put((m, done.tensors))

    def publish_global(self, version: int, tensors) -> tuple[TransferManifest, list[bytes]]:
        manifest, chunks = build_transfer("global", "aggregator", version, version, tensors)
        signed = sign(manifest, self.key)
        self.republish_global(signed, chunks)
        return signed, chunks

    def republish_global(self, manifest, chunks) -> None:
        self.link.publish_transfer(self.topics.global_manifest, self.topics.global_chunk, manifest, chunks, retain=True)

    def announce(self, ann: RoundAnnouncement) -> RoundAnnouncement:
        signed = sign(ann, self.key)
        self.link.publish(self.topics.round, signed.to_json(), retain=True)
        return signed

    def wait_for_status(self, text: str, timeout: float = 30.0) -> DeviceStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in list(self.statuses):
                if text in status.detail:
                    return status
            time.sleep(0.05)
        raise AssertionError(f"no status with {text!r}; got {[s.detail for s in self.statuses]}")

    def next_update(self, timeout: float = 60.0):
        return self.updates.get(timeout=timeout)


def _start_agent(tmp_path, url, public) -> tuple[EdgeAgent, threading.Thread]:
    (tmp_path / "faces").mkdir(exist_ok=True)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"device_id": "cam-01", "data": "faces", "state_dir": "state", "broker": url,
                                   "protocol": "3.1.1", "aggregator_key": str(public), "exit_when_finished": True}))
    config = load_agent_config(cfg)
    agent = EdgeAgent(config, LocalTrainer(_faces(), config.state_dir, 4, False, 0))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def _stop(fleet: Fleet, agent: EdgeAgent, thread: threading.Thread, round_number: int, version: int) -> None:
    fleet.announce(_announcement(round_number, version, state="finished", expires_in=None))
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_agent_survives_a_signed_inf_model_and_refuses_replays_across_a_restart(embedded_broker, tmp_path):
    private, public = _write_keys(tmp_path)
    fleet = Fleet(embedded_broker, load_signing_key(private))
    agent, thread = _start_agent(tmp_path, embedded_broker, public)
    try:
        good = _initial()
        old_model = fleet.publish_global(1, good)
        old_round = fleet.announce(_announcement(2, 1))
        manifest, _ = fleet.next_update()
        assert (manifest.round, manifest.model_version) == (2, 1)

        # A validly signed model of all Inf (what n_k = 10^308 did to the aggregator in issue 14).
        fleet.publish_global(2, _all_inf(good))
        fleet.announce(_announcement(3, 2))
        status = fleet.wait_for_status("refused global model v2")
        assert "NaN or Inf" in status.detail and "keeping v1" in status.detail
        time.sleep(1.0)
        assert thread.is_alive() and agent.global_model.version == 1 and fleet.updates.empty()

        # The next good model is trained on.
        fleet.publish_global(3, {k: v * 0.99 if np.issubdtype(v.dtype, np.floating) else v for k, v in good.items()})
        fleet.announce(_announcement(4, 3))
        manifest, tensors = fleet.next_update()
        assert (manifest.round, manifest.model_version) == (4, 3)
        assert all(np.isfinite(t).all() for t in tensors.values())

        # Replays of older, validly signed messages; then an expired announcement.
        fleet.republish_global(*old_model)
        fleet.wait_for_status("global model v1 is older than v3 already accepted")
        fleet.link.publish(fleet.topics.round, old_round.to_json(), retain=True)
        fleet.wait_for_status("round 2 (model v1) is older than round 4 (model v3)")
        fleet.announce(_announcement(5, 3, expires_in=-2 * 86400))
        fleet.wait_for_status("round 5 announcement expired")
        time.sleep(1.0)
        assert fleet.updates.empty() and agent.global_model.version == 3
        _stop(fleet, agent, thread, 4, 3)

        # Restarted, the agent still knows what it accepted: the retained replay is refused again.
        fleet.link.publish(fleet.topics.round, old_round.to_json(), retain=True)
        fleet.statuses.clear()
        agent, thread = _start_agent(tmp_path, embedded_broker, public)
        fleet.wait_for_status("round 2 (model v1) is older than round 4 (model v3)")
        fleet.wait_for_status("global model v1 is older than v3 already accepted")
        assert fleet.updates.empty() and agent.global_model is None
        _stop(fleet, agent, thread, 4, 3)
        assert _finite_file(agent.trainer.head_path)
    finally:
        if thread.is_alive():
            agent.finished = True
            agent.config.exit_when_finished = True
            thread.join(timeout=10)
        fleet.link.close()
