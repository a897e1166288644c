"""MqttLink against both brokers: the embedded amqtt (MQTT 3.1.1) and mosquitto (MQTT 5)."""

from __future__ import annotations

import logging
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from fedwire.broker import EmbeddedBroker, free_port
from fedwire.chunking import Reassembler, build_transfer
from fedwire.errors import ProtocolError
from fedwire.messages import DeviceStatus
from fedwire.mqtt import BrokerAddress, MqttLink, TlsFiles, parse_broker_url
from fedwire.topics import Topics

WAIT_S = 10.0


class Inbox:
    """Collects (topic, payload) from paho's thread, as real callers do."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.queue.put((topic, payload))

    def get(self, timeout: float = WAIT_S) -> tuple[str, bytes]:
        return self.queue.get(timeout=timeout)

    def wait_for(self, topic: str, timeout: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            got_topic, payload = self.get(max(deadline - time.monotonic(), 0.01))
            if got_topic == topic:
                return payload


@pytest.fixture
def links():
    """Factory for connected links that are closed after the test."""
    opened: list[MqttLink] = []

    def make(url: str, subscriptions: list[str], on_message=None, **kwargs) -> MqttLink:
        link = MqttLink(url, f"test-{uuid.uuid4().hex[:8]}", on_message or Inbox(), subscriptions, **kwargs)
        link.connect()
        opened.append(link)
        return link

    yield make
    for link in opened:
        link.close()


def test_connect_publish_and_receive(broker_url, links):
    inbox = Inbox()
    receiver = links(broker_url, ["t/+"], inbox)
    sender = links(broker_url, [])
    assert receiver.connected and sender.connected
    sender.publish("t/a", b"hello", qos=1)
    sender.publish("t/b", b"", qos=0)
    assert inbox.get() == ("t/a", b"hello")
    assert inbox.get() == ("t/b", b"")
    receiver.close()
    assert not receiver.connected


def test_retained_message_reaches_a_late_subscriber(broker_url, links):
    big = bytes(range(256)) * 1024  # 256 KiB: above the default chunk size
    sender = links(broker_url, [])
    sender.publish("r/big", big, retain=True)
    sender.publish("r/small", b"state", retain=True)
    inbox = Inbox()
    links(broker_url, ["r/#"], inbox)
    assert dict([inbox.get(), inbox.get()]) == {"r/big": big, "r/small": b"state"}


def test_only_subscribed_topics_reach_on_message(broker_url, links):
    # amqtt 0.12.1 pushes retained messages matching *other* clients' subscriptions to a new client.
    other = links(broker_url, ["x/#"])
    other.publish("x/retained", b"not for you", retain=True)
    inbox = Inbox()
    sender = links(broker_url, [])
    links(broker_url, ["y"], inbox)
    sender.publish("y", b"for you")
    assert inbox.get() == ("y", b"for you")
    assert inbox.queue.empty()


def test_resubscribe_delivers_retained_messages_again(broker_url, links):
    sender = links(broker_url, [])
    sender.publish("s/x", b"retained", retain=True)
    inbox = Inbox()
    receiver = links(broker_url, ["s/x"], inbox)
    assert inbox.wait_for("s/x") == b"retained"
    receiver.resubscribe("s/x")
    assert inbox.wait_for("s/x") == b"retained"


def test_chunked_transfer_of_3mb_between_two_links(broker_url, links):
    rng = np.random.default_rng(0)
    tensors = {
        "backbone.w": rng.standard_normal((600, 1000)).astype(np.float32),  # 2.4 MB
        "backbone.h": rng.standard_normal((300, 500)).astype(np.float16),   # 0.3 MB
        "steps": rng.integers(0, 2**60, size=(40000,), dtype=np.int64),      # 0.32 MB
    }
    manifest, chunks = build_transfer("update", "dev-1", 1, 0, tensors, num_samples=10, max_chunk_bytes=64 * 1024)
    assert len(chunks) > 40 and all(len(c) <= 64 * 1024 for c in chunks)
    topics = Topics("facefed/test")
    inbox = Inbox()
    links(broker_url, topics.aggregator_subscriptions(), inbox)
    sender = links(broker_url, [])
    sent = sender.publish_transfer(topics.update_manifest("dev-1"), lambda i: topics.update_chunk("dev-1", i),
                                   manifest, chunks)
    assert sent == sum(map(len, chunks)) + len(manifest.to_json())

    reassembler = Reassembler()
    completed = None
    while completed is None:
        topic, payload = inbox.get()
        parsed = topics.parse(topic)
        if parsed.kind == "update_chunk":
            completed = reassembler.add_chunk(parsed.device_id, payload, time.time())
        elif parsed.kind == "update_manifest":
            completed = reassembler.add_manifest(parsed.device_id, type(manifest).from_json(payload), time.time())
    assert completed.manifest == manifest
    for name, array in tensors.items():
        assert completed.tensors[name].dtype == array.dtype
        assert completed.tensors[name].tobytes() == array.tobytes()


def _hard_drop(link: MqttLink) -> None:
    """Cut the TCP connection without an MQTT DISCONNECT, as a crash or network loss would."""
    link._client.socket().shutdown(socket.SHUT_RDWR)


def test_last_will_on_hard_drop_then_reconnect_and_resubscribe(broker_url, links):
    topics = Topics()
    offline = DeviceStatus("dev-9", "offline", None, 1.0, "connection lost").to_json()
    watcher_inbox, device_inbox = Inbox(), Inbox()
    links(broker_url, [topics.aggregator_subscriptions()[2]], watcher_inbox)  # status/+
    device = links(broker_url, [topics.ack("dev-9")], device_inbox, will=(topics.status("dev-9"), offline, True))
    _hard_drop(device)
    assert watcher_inbox.wait_for(topics.status("dev-9")) == offline

    deadline = time.monotonic() + WAIT_S
    while not device.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert device.connected, "link did not reconnect after the drop"
    # Subscriptions were restored on reconnect (clean session), so the device still hears its acks.
    # `connected` turns true at CONNACK, a moment before the re-subscription is in place: publish
    # until it lands rather than racing it.
    sender = links(broker_url, [])
    received = None
    while received is None and time.monotonic() < deadline + WAIT_S:
        sender.publish(topics.ack("dev-9"), b"ack")
        try:
            received = device_inbox.wait_for(topics.ack("dev-9"), timeout=0.5)
        except queue.Empty:
            pass
    assert received == b"ack"
    # The will was retained, so a late subscriber sees the device as offline.
    late = Inbox()
    links(broker_url, [topics.status("dev-9")], late)
    assert late.wait_for(topics.status("dev-9")) == offline


def test_clean_close_does_not_fire_the_will(broker_url, links):
    watcher = Inbox()
    links(broker_url, ["w/+"], watcher)
    device = links(broker_url, [], will=("w/dev", b"offline", False))
    device.close()
    links(broker_url, []).publish("w/marker", b"m")
    assert watcher.get() == ("w/marker", b"m")


def test_publish_from_the_network_thread_is_refused(broker_url, links):
    errors: queue.Queue = queue.Queue()
    holder: list[MqttLink] = []

    def on_message(topic: str, payload: bytes) -> None:
        try:
            holder[0].publish("p/echo", payload)
        except RuntimeError as exc:
            errors.put(exc)

    holder.append(links(broker_url, ["p/in"], on_message))
    links(broker_url, []).publish("p/in", b"x")
    assert "deadlock" in str(errors.get(timeout=WAIT_S))


def test_publish_refused_by_the_broker_raises_under_mqtt5(mosquitto_acl_broker, links):
    link = links(mosquitto_acl_broker, [])
    link.publish("open/x", b"fine")
    with pytest.raises(ConnectionError, match="Not authorized"):
        link.publish("closed/x", b"refused")


def test_protocol_detection(embedded_broker, mosquitto_broker, links):
    assert links(mosquitto_broker, []).protocol_version == "5"
    assert links(embedded_broker, []).protocol_version == "3.1.1"
    assert links(mosquitto_broker, [], protocol="3.1.1").protocol_version == "3.1.1"
    with pytest.raises(ConnectionError, match="MQTT 5"):
        links(embedded_broker, [], protocol="5")


def test_first_connect_failure_raises_connection_error():
    url = f"mqtt://127.0.0.1:{free_port()}"
    link = MqttLink(url, "nobody-home", Inbox(), [])
    with pytest.raises(ConnectionError, match="cannot reach"):
        link.connect(timeout=2.0)
    assert not link.connected
    with pytest.raises(RuntimeError):
        link.protocol_version


def test_publish_before_connect_raises():
    with pytest.raises(ConnectionError, match="connect"):
        MqttLink("mqtt://127.0.0.1:1", "x", Inbox(), []).publish("a", b"b")


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker.local:1884", BrokerAddress("broker.local", 1884, False)),
    ("mqtt://10.0.0.2", BrokerAddress("10.0.0.2", 1883, False)),
    ("mqtts://broker.example.com", BrokerAddress("broker.example.com", 8883, True)),
    ("mqtts://[::1]:9000", BrokerAddress("::1", 9000, True)),
])
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h:x", "mqtt://h:0",
                                 "mqtt://u:p@h:1", "mqtt://h:1/path", "h:1883", ""])
def test_bad_broker_urls_raise_protocol_error(url):
    with pytest.raises(ProtocolError) as info:
        parse_broker_url(url)
    assert info.value.field == "url"


def test_link_argument_checks():
    with pytest.raises(ProtocolError, match="protocol"):
        MqttLink("mqtt://h:1", "x", Inbox(), [], protocol="4")
    with pytest.raises(ProtocolError, match="mqtts"):
        MqttLink("mqtt://h:1", "x", Inbox(), [], tls=TlsFiles(ca_cert="ca.pem"))


def test_mqtts_with_tls_files(mosquitto_tls_broker, tls_certificate, links):
    cert, _ = tls_certificate
    inbox = Inbox()
    link = links(mosquitto_tls_broker, ["tls/x"], inbox, tls=TlsFiles(ca_cert=str(cert)))
    link.publish("tls/x", b"secret")
    assert inbox.get() == ("tls/x", b"secret")
    untrusting = MqttLink(mosquitto_tls_broker, "no-ca", Inbox(), [])  # system CAs do not know this certificate
    with pytest.raises(ConnectionError, match="certificate"):
        untrusting.connect(timeout=5.0)


def test_embedded_broker_on_a_busy_port_fails_clearly(embedded_broker):
    port = parse_broker_url(embedded_broker).port
    with pytest.raises(RuntimeError, match="address already in use"):
        EmbeddedBroker(port=port).start()


def test_broker_cli_serves_until_sigterm(links):
    process = subprocess.Popen([sys.executable, "-m", "fedwire.broker", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = process.stdout.readline().strip()
        assert parse_broker_url(url).host == "127.0.0.1"
        link = links(url, [])
        assert link.protocol_version == "3.1.1"
        link.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_acks_after_handling_make_the_broker_hold_the_backlog(mosquitto_broker, links):
    """A consumer that has not acknowledged gets only the broker's in-flight window (mosquitto: 20)."""
    held: queue.Queue[tuple[str, object]] = queue.Queue()
    links(mosquitto_broker, ["bp/+"], lambda topic, payload, ack: held.put((topic, ack)),
          ack_after_handling=True, clean_session=False)
    sender = links(mosquitto_broker, [])
    for i in range(60):
        sender.publish(f"bp/{i}", b"x" * 1000, qos=1)
    time.sleep(1.0)
    first = [held.get_nowait() for _ in range(held.qsize())]
    assert 0 < len(first) < 60  # the rest wait at the broker
    for _, ack in first:
        ack()
    received = len(first)
    deadline = time.monotonic() + WAIT_S
    while received < 60 and time.monotonic() < deadline:
        try:
            _, ack = held.get(timeout=0.5)
        except queue.Empty:
            continue
        ack()
        received += 1
    assert received == 60  # acknowledging opens the window again, and nothing is lost


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_link_keeps_its_window_when_the_broker_does_not(mosquitto_broker, links, protocol):
    """Mosquitto 2.0.11 lets every PUBACK release up to a whole window of queued messages, so a consumer that
    acks one message at a time would get the whole backlog. The link stops reading instead: never more than
    max_unacked messages are handed over and not acknowledged, and nothing is lost or reordered."""
    held: queue.Queue[tuple[str, object]] = queue.Queue()
    consumer = links(mosquitto_broker, ["win/+"], lambda topic, payload, ack: held.put((topic, ack)),
                     ack_after_handling=True, clean_session=False, protocol=protocol, max_unacked=5)
    sender = links(mosquitto_broker, [])
    total = 120
    for i in range(total):
        sender.publish(f"win/{i}", b"x" * 1000, qos=1)
    topics, most_held = [], 0
    deadline = time.monotonic() + WAIT_S
    while len(topics) < total and time.monotonic() < deadline:
        try:
            topic, ack = held.get(timeout=0.5)
        except queue.Empty:
            continue
        time.sleep(0.002)  # a slow consumer: give the broker time to send whatever it would
        most_held = max(most_held, held.qsize() + 1)
        topics.append(topic)
        ack()
    assert topics == [f"win/{i}" for i in range(total)]
    assert most_held <= 5 and consumer.peak_unacked <= 5
    assert consumer.unacked == 0


def test_publish_nowait_leaves_the_window_shut(mosquitto_broker, links):
    """What a consumer publishes while handling (the aggregator's update acks) must not open its window: a
    publish() waits for a PUBACK that sits behind the backlog and reads past the window meanwhile;
    publish_nowait() returns at once and is sent as soon as the network thread runs again."""
    held: queue.Queue[object] = queue.Queue()
    consumer = links(mosquitto_broker, ["full/+"], lambda topic, payload, ack: held.put(ack),
                     ack_after_handling=True, clean_session=False, max_unacked=2)
    inbox = Inbox()
    links(mosquitto_broker, ["reply"], inbox)
    sender = links(mosquitto_broker, [])
    for i in range(10):
        sender.publish(f"full/{i}", b"y" * 1000, qos=1)
    deadline = time.monotonic() + WAIT_S
    while consumer.unacked < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert consumer.unacked == 2  # window full: the network thread waits and reads nothing
    start = time.monotonic()
    consumer.publish_nowait("reply", b"ok")
    assert time.monotonic() - start < 1.0
    time.sleep(0.2)
    assert consumer.unacked == 2 and held.qsize() == 2  # still shut
    for _ in range(10):
        held.get(timeout=WAIT_S)()
    assert inbox.wait_for("reply") == b"ok"
    assert consumer.unacked == 0 and consumer.peak_unacked == 2


def test_a_consumer_slower_than_amqtts_puback_wait_loses_nothing_and_logs_no_error(embedded_broker, links, caplog):
    """amqtt stops waiting for a PUBACK after 5 s and logs an ERROR with a traceback; the message has been
    delivered all the same. An aggregator busy for longer (it acks after handling) must not fill the console."""
    held: queue.Queue[tuple[str, object]] = queue.Queue()
    links(embedded_broker, ["slow/+"], lambda topic, payload, ack: held.put((topic, ack)), ack_after_handling=True)
    sender = links(embedded_broker, [])
    for i in range(3):
        sender.publish(f"slow/{i}", b"z" * 100, qos=1)
    with caplog.at_level(logging.DEBUG, logger="fedwire.broker"):
        time.sleep(6.5)  # past amqtt's 5 s wait, nothing acknowledged
        sender.publish("slow/3", b"z", qos=1)  # amqtt looks at its finished deliveries when it routes the next one
        got = [held.get(timeout=WAIT_S) for _ in range(4)]
        for _, ack in got:
            ack()
        time.sleep(0.5)
    assert [topic for topic, _ in got] == ["slow/0", "slow/1", "slow/2", "slow/3"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("took over 5 s to acknowledge" in r.getMessage() for r in caplog.records)
