"""Issue 14's attacks by one device on the broker and the aggregator, end to end on a real Mosquitto with
broker-config's limits: an oversize message, a flood of tiny messages, a revoked device (TLS, CRL)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from aggregator import pki
from aggregator.broker_config import BrokerLimits, install_crl, render_limits
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from fedwire import pki_layout
from fedwire.broker import MosquittoBroker, free_port, loopback_config
from fedwire.chunking import build_transfer
from fedwire.config import parse_config
from fedwire.messages import UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics
from bench import faults  # importable from the repo root: pyproject's pytest `pythonpath`

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
WAIT_S = 30.0


@pytest.fixture
def limited_broker(tmp_path, mosquitto_broker):  # mosquitto_broker: skips where mosquitto is missing
    with MosquittoBroker(tmp_path / "limited", loopback_config(free_port(), render_limits(BrokerLimits()))) as broker:
        yield broker


def _wait(predicate, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class RunningAggregator:
    """AggregatorService.run() in a thread, on a real broker; the test plays the devices."""

    def __init__(self, url: str, state_dir: Path, tls: dict | None = None, **fields) -> None:
        config = {"state_dir": str(state_dir), "broker": url, "rounds": 1, "min_clients": 1,
                  "round_timeout_s": 60, **({"tls": tls} if tls else {}), **fields}
        self.service = AggregatorService(parse_config(AggregatorConfig, config))
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        _wait(lambda: self.service.current is not None, "round 1 to open")

    def update(self, device_id: str, delta: float) -> tuple:
        tensors = {k: (v + delta).astype(v.dtype) for k, v in self.service.global_tensors.items()}
        return build_transfer("update", device_id, 1, 0, tensors, num_samples=10)


def _upload(link: MqttLink, device_id: str, transfer, prefix: str = "facefed") -> None:
    topics = Topics(prefix)
    manifest, chunks = transfer
    link.publish_transfer(topics.update_manifest(device_id), lambda i: topics.update_chunk(device_id, i), manifest,
                          chunks)


def _mqtt_connect_packet(client_id: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id.encode()
    return b"\x10" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_a_200_mb_message_is_refused_by_the_broker_and_the_aggregator_keeps_serving(limited_broker, tmp_path,
                                                                                   caplog):
    caplog.set_level(logging.INFO)
    agg = RunningAggregator(limited_broker.url, tmp_path / "state")
    # A raw MQTT client announces a 200 MB PUBLISH: mosquitto disconnects it before it has read 1% of it.
    topic = b"facefed/update/big/chunk/0"
    header = b"\x30" + _varint(2 + len(topic) + 200 * 2**20) + len(topic).to_bytes(2, "big") + topic
    sent = 0
    with socket.create_connection(("127.0.0.1", limited_broker.port), timeout=10) as sock:
        sock.sendall(_mqtt_connect_packet("big"))
        assert sock.recv(4)[:2] == b"\x20\x02"  # CONNACK
        sock.sendall(header)
        block = bytes(1 << 20)
        with pytest.raises(OSError):
            while sent < 200 * 2**20:
                sock.sendall(block)
                sent += len(block)
            sock.recv(1)  # everything was sent: the broker must at least have hung up by now
            raise ConnectionResetError("the broker read the whole message")
    assert sent < 32 * 2**20, f"the broker read {sent} bytes of the oversize message"  # socket buffers only
    assert "disconnected due to oversize packet" in limited_broker.log_text()
    # A message just over the size limit is dropped: an MQTT 3.1.1 sender gets its PUBACK and stays connected
    # (mosquitto 2.0.11 disconnects an MQTT 5 one, "protocol error").
    over = MqttLink(limited_broker.url, "over", lambda t, p: None, [], protocol="3.1.1")
    over.connect()
    over.publish("facefed/update/over/chunk/0", bytes(BrokerLimits().message_size_limit + 1))
    assert over.connected
    over.close()
    link = MqttLink(limited_broker.url, "honest", lambda t, p: None, [])
    link.connect()
    _upload(link, "honest", agg.update("honest", 0.5))
    agg.thread.join(WAIT_S)
    link.close()
    assert not agg.thread.is_alive(), "the aggregator did not finish its round"
    assert agg.service.model_version == 1
    assert "round 1: update from honest accepted" in caplog.text
    for sender in ("big", "over"):  # nothing of theirs reached the aggregator
        assert f"from {sender}" not in caplog.text and f"update/{sender}" not in caplog.text


def test_a_flood_of_tiny_messages_leaves_the_honest_updates_in_the_same_round(tmp_path, mosquitto_broker):
    verdict = faults.scenario_message_flood(tmp_path, devices=2, messages=20_000)
    print(verdict.report())
    assert verdict.passed, verdict.report()


def test_a_revoked_device_is_refused_by_the_broker_and_by_the_aggregator(hardened_broker, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pki_dir, prefix = hardened_broker.pki, hardened_broker.prefix
    identity = pki_layout.aggregator_files(pki_dir)
    revoked_list = pki.ensure_crl(pki_dir).with_name("revoked.txt")
    agg = RunningAggregator(hardened_broker.url, tmp_path / "state", topic_prefix=prefix, min_clients=2,
                            revoked_devices=str(revoked_list),
                            tls={"ca_cert": str(pki_layout.ca_files(pki_dir).cert),
                                 "certfile": str(identity.client.cert), "keyfile": str(identity.client.key)})
    acks: list[UpdateAck] = []

    announced = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == Topics(prefix).round:
            announced.set()
        else:
            acks.append(UpdateAck.from_json(payload))

    def device(device_id: str) -> MqttLink:
        link = MqttLink(hardened_broker.url, device_id, on_message, [Topics(prefix).ack(device_id), Topics(prefix).round],
                        tls=pki_layout.client_tls(pki_dir, device_id))
        link.connect()
        return link

    pki.issue_device_cert(pki_dir, "cam-c")
    cam_a, cam_b = device("cam-a"), device("cam-b")  # cam-b connects before it is revoked
    written = pki.revoke_device(pki_dir, "cam-b")
    assert written == [pki.crl_file(pki_dir), revoked_list] and pki.load_revoked(revoked_list) == {"cam-b"}
    install_crl(pki_dir, pki.crl_file(pki_dir).parent.parent / "broker")  # the broker-config folder
    hardened_broker.broker.reload()
    # The aggregator re-reads the list; the broker still carries cam-b's open connection: it "lets one through".
    _wait(lambda: "cam-b" in agg.service.connection.budget.revoked, "the aggregator to re-read the revoked list")
    _upload(cam_b, "cam-b", agg.update("cam-b", 9.0), prefix)
    _upload(cam_a, "cam-a", agg.update("cam-a", 0.5), prefix)
    _wait(lambda: any(a.device_id == "cam-a" and a.accepted for a in acks), "cam-a's update to be accepted")
    assert "dropping every message from cam-b for the rest of the round: cam-b's certificate is revoked" in caplog.text
    assert not any(a.device_id == "cam-b" and a.accepted for a in acks)
    assert set(agg.service.current.accepted) == {"cam-a"}  # the round waits for a second honest device
    # A new TLS connection with the revoked certificate is refused (mosquitto re-read the CRL on SIGHUP) ...
    with pytest.raises(ConnectionError):
        MqttLink(hardened_broker.url, "cam-b-again", lambda t, p: None, [],
                 tls=pki_layout.client_tls(pki_dir, "cam-b")).connect(timeout=5)
    # ... and so after a restart, while the other devices connect as before.
    cam_b.close()
    hardened_broker.broker.stop()
    hardened_broker.broker.start()
    with pytest.raises(ConnectionError):
        MqttLink(hardened_broker.url, "cam-b", lambda t, p: None, [], tls=pki_layout.client_tls(pki_dir, "cam-b"),
                 protocol="3.1.1").connect(timeout=5)
    probe = MqttLink(hardened_broker.url, "cam-a-probe", lambda t, p: None, [],
                     tls=pki_layout.client_tls(pki_dir, "cam-a"))
    probe.connect()
    probe.close()
    assert "certificate verify failed" in hardened_broker.broker.log_text()
    # The round closes with the honest devices only.
    announced.clear()
    cam_c = device("cam-c")
    # The broker restarted empty (no persistence): the round is there again once the aggregator, resubscribed,
    # has published it again.
    _wait(announced.is_set, "the aggregator to reconnect and announce the round again")
    _upload(cam_c, "cam-c", agg.update("cam-c", 0.25), prefix)
    agg.thread.join(WAIT_S)
    for link in (cam_a, cam_c):
        link.close()
    assert not agg.thread.is_alive() and agg.service.model_version == 1
    entry = agg.service.state.log_path.read_text().splitlines()[-1]
    assert '"client_ids": ["cam-a", "cam-c"]' in entry


def test_revoke_and_broker_config_commands(tmp_path, capsys):
    from aggregator.cli import main

    pki_dir = tmp_path / "pki"
    assert main(["ca", "init", "--dir", str(pki_dir)]) == 0
    assert main(["provision", "cam-01", "--dir", str(pki_dir)]) == 0
    out = tmp_path / "broker"
    assert main(["broker-config", "--pki", str(pki_dir), "--out", str(out), "--max-chunk-bytes", "131072",
                 "--max-queued-mb", "512"]) == 0
    conf = (out / "mosquitto.conf").read_text()
    assert f"crlfile {out.resolve() / 'crl.pem'}" in conf and "message_size_limit 196608" in conf
    assert "max_packet_size 197632" in conf and f"max_queued_bytes {512 << 20}" in conf
    capsys.readouterr()
    assert main(["revoke", "cam-02", "--dir", str(pki_dir)]) == 1
    assert "no certificate for 'cam-02'" in capsys.readouterr().err
    assert main(["revoke", "cam-01", "--dir", str(pki_dir), "--broker-dir", str(out)]) == 0
    assert pki.load_revoked(pki.revoked_file(pki_dir)) == {"cam-01"}
    assert (out / "crl.pem").read_bytes() == pki.crl_file(pki_dir).read_bytes()
    from cryptography import x509

    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    cert = x509.load_pem_x509_certificate(pki_layout.device_files(pki_dir, "cam-01").cert.read_bytes())
    assert [entry.serial_number for entry in crl] == [cert.serial_number]
    assert main(["revoke", "cam-01", "--dir", str(pki_dir)]) == 0  # twice: still one entry
    assert len(x509.load_pem_x509_crl(pki.crl_file(pki_dir).read_bytes())) == 1


def test_budget_and_revoked_list_config_errors_name_the_field(tmp_path):
    from fedwire.config import ConfigError

    with pytest.raises(ConfigError, match="device_budget.transfers"):
        parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "device_budget": {"transfers": 0}})
    with pytest.raises(ConfigError, match="revoked_devices"):
        parse_config(AggregatorConfig, {"state_dir": str(tmp_path), "revoked_devices": str(tmp_path / "none.txt")})
