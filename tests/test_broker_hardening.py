"""The broker config of `facefed-aggregator broker-config`, run by a real mosquitto: each device
speaks only for itself, reads only what is meant for it, and only the aggregator publishes rounds
and global models.

"Never receives" is checked without sleeping: once the broker has handled the forbidden message
(its PUBACK came back), an allowed sentinel is published to the watching client. mosquitto handles
messages one at a time and delivers to each client in order, so once the sentinel is in, the
forbidden message would have been too.
"""

from __future__ import annotations

import queue
import re
import socket
import time

import numpy as np
import pytest

from aggregator import pki
from aggregator.broker_config import (
    render_acl,
    render_mosquitto_conf,
    write_broker_config,
)
from fedwire import pki_layout
from fedwire.chunking import build_transfer
from fedwire.messages import DeviceStatus
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics

WAIT_S = 10.0


class Client:
    """A connected MqttLink with the identity of a fleet certificate, and an inbox."""

    def __init__(self, broker, identity: str, subscriptions: list[str], client_id: str | None = None,
                 protocol: str = "5", will: tuple[str, bytes, bool] | None = None) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.received: list[tuple[str, bytes]] = []
        self.link = MqttLink(broker.url, client_id or f"test-{identity}", lambda t, p: self.inbox.put((t, p)),
                             subscriptions, will=will, protocol=protocol, tls=pki_layout.client_tls(broker.pki, identity))
        self.link.connect(timeout=WAIT_S)

    def wait_for(self, topic: str) -> bytes:
        """The payload of the next message on topic; everything received meanwhile stays in `received`."""
        deadline = time.monotonic() + WAIT_S
        while True:
            got = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            self.received.append(got)
            if got[0] == topic:
                return got[1]

    def wait_for_all(self, topics: set[str]) -> None:
        while not topics <= self.topics_received():
            self.wait_for(next(iter(topics - self.topics_received())))

    def topics_received(self) -> set[str]:
        return {topic for topic, _ in self.received}


@pytest.fixture
def clients(hardened_broker):
    opened: list[Client] = []

    def make(identity: str, subscriptions: list[str], **kwargs) -> Client:
        client = Client(hardened_broker, identity, subscriptions, **kwargs)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.link.close()


@pytest.fixture
def topics(hardened_broker) -> Topics:
    return Topics(hardened_broker.prefix)


def _status(device_id: str, state: str = "online") -> bytes:
    return DeviceStatus(device_id, state, None, 1.0).to_json()


# -- the files ----------------------------------------------------------------------------------


def test_config_requires_client_certificates_and_sets_listener_options_after_the_listener(tmp_path):
    conf = render_mosquitto_conf(tmp_path, 8883, "127.0.0.1")
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert "allow_anonymous false" in lines and "require_certificate true" in lines
    assert "use_identity_as_username true" in lines and f"acl_file {tmp_path.resolve() / 'acl'}" in lines
    listener = lines.index("listener 8883 127.0.0.1")
    # mosquitto 2.0.11 opens an extra plain listener on 0.0.0.0:1883 for a listener option set before it.
    assert {line.split()[0] for line in lines[:listener]} == {"per_listener_settings", "allow_anonymous", "acl_file"}


def test_acl_grants_exactly_the_protocol_topics():
    rules = [line for line in render_acl("fleet/eu").splitlines() if line and not line.startswith("#")]
    p = "fleet/eu"
    assert rules == [
        f"pattern write {p}/update/%u/manifest", f"pattern write {p}/update/%u/chunk/+",
        f"pattern write {p}/status/%u", f"pattern read {p}/ack/%u", f"pattern read {p}/round",
        f"pattern read {p}/global/manifest", f"pattern read {p}/global/chunk/+",
        f"pattern read {p}/global/full/manifest", f"pattern read {p}/global/full/chunk/+", f"pattern read {p}/summary",
        "user aggregator",
        f"topic read {p}/update/+/manifest", f"topic read {p}/update/+/chunk/+", f"topic read {p}/status/+",
        f"topic write {p}/round", f"topic write {p}/global/manifest", f"topic write {p}/global/chunk/+",
        f"topic write {p}/global/full/manifest", f"topic write {p}/global/full/chunk/+", f"topic write {p}/ack/+", f"topic write {p}/summary",
        "user dashboard", f"topic read {p}/status/+", f"topic read {p}/ack/+", f"topic read {p}/update/+/manifest",
    ]


def test_write_broker_config_checks_its_inputs(tmp_path):
    with pytest.raises(pki.PkiError, match="ca init"):
        write_broker_config(tmp_path / "no-pki", tmp_path / "out")
    with pytest.raises(ValueError, match="port"):
        write_broker_config(tmp_path / "no-pki", tmp_path / "out", port=0)


def test_broker_listens_only_where_configured(hardened_broker):
    port = int(hardened_broker.url.rsplit(":", 1)[1])
    opened = re.findall(r"Opening \S+ listen socket on port (\d+)", hardened_broker.log.read_text())
    assert opened == [str(port)]


# -- what a device may do -----------------------------------------------------------------------


def test_device_update_and_status_reach_the_aggregator(clients, topics):
    aggregator = clients(pki.AGGREGATOR_IDENTITY, topics.aggregator_subscriptions())
    device = clients("cam-a", topics.agent_subscriptions("cam-a"))
    manifest, chunks = build_transfer("update", "cam-a", 0, 0, {"w": np.ones(3, np.float32)}, num_samples=5)
    device.link.publish_transfer(topics.update_manifest("cam-a"), lambda i: topics.update_chunk("cam-a", i),
                                 manifest, chunks)
    device.link.publish(topics.status("cam-a"), _status("cam-a"), retain=True)
    aggregator.wait_for_all({topics.update_manifest("cam-a"), topics.update_chunk("cam-a", 0), topics.status("cam-a")})
    assert (topics.update_manifest("cam-a"), manifest.to_json()) in aggregator.received


@pytest.mark.parametrize("victim_topic", ["update/cam-b/manifest", "update/cam-b/chunk/0", "status/cam-b"])
def test_device_cannot_publish_as_another_device(clients, topics, victim_topic):
    aggregator = clients(pki.AGGREGATOR_IDENTITY, topics.aggregator_subscriptions())
    device = clients("cam-a", [])
    with pytest.raises(ConnectionError, match="Not authorized"):
        device.link.publish(f"{topics.prefix}/{victim_topic}", b"forged")
    device.link.publish(topics.status("cam-a"), _status("cam-a"))  # sentinel
    aggregator.wait_for(topics.status("cam-a"))
    assert aggregator.topics_received() == {topics.status("cam-a")}


@pytest.mark.parametrize("topic", ["round", "global/manifest", "global/chunk/0", "summary", "ack/cam-b"])
def test_device_cannot_publish_what_only_the_aggregator_publishes(clients, topics, topic):
    public = topics.agent_subscriptions("cam-b") + [topics.round_summary]  # ends with ack/cam-b, the sentinel
    other = clients("cam-b", public)
    device = clients("cam-a", [])
    with pytest.raises(ConnectionError, match="Not authorized"):
        device.link.publish(f"{topics.prefix}/{topic}", b"forged", retain=True)
    aggregator = clients(pki.AGGREGATOR_IDENTITY, [])
    aggregator.link.publish(topics.ack("cam-b"), b"sentinel", retain=True)
    assert other.wait_for(topics.ack("cam-b")) == b"sentinel"
    assert other.received == [(topics.ack("cam-b"), b"sentinel")]
    # A device connecting later finds no retained forgery either.
    other.link.close()  # one connection per certificate: the broker would hand the session over
    late = clients("cam-b", public)
    assert late.wait_for(topics.ack("cam-b")) == b"sentinel"
    assert late.received == [(topics.ack("cam-b"), b"sentinel")]


def test_mqtt311_device_gets_no_error_but_its_forged_publish_is_dropped(clients, topics):
    # MQTT 3.1.1 PUBACKs carry no reason code: the publish "succeeds" and the broker drops it.
    aggregator = clients(pki.AGGREGATOR_IDENTITY, topics.aggregator_subscriptions())
    other = clients("cam-b", topics.agent_subscriptions("cam-b"))
    device = clients("cam-a", [], protocol="3.1.1")
    device.link.publish(topics.update_manifest("cam-b"), b"forged")
    device.link.publish(topics.global_manifest, b"forged", retain=True)
    device.link.publish(topics.status("cam-a"), _status("cam-a"))  # sentinel
    aggregator.wait_for(topics.status("cam-a"))
    assert aggregator.topics_received() == {topics.status("cam-a")}
    aggregator.link.publish(topics.ack("cam-b"), b"sentinel")
    other.wait_for(topics.ack("cam-b"))
    assert other.received == [(topics.ack("cam-b"), b"sentinel")]


def test_device_reads_only_its_own_acks_and_no_updates(clients, topics):
    snoop = clients("cam-a", [f"{topics.prefix}/#", topics.ack("cam-b"), f"{topics.prefix}/update/+/manifest"])
    victim = clients("cam-b", topics.agent_subscriptions("cam-b"))
    aggregator = clients(pki.AGGREGATOR_IDENTITY, [])
    victim.link.publish(topics.update_manifest("cam-b"), b"update of cam-b")
    victim.link.publish(topics.status("cam-b"), _status("cam-b"))
    aggregator.link.publish(topics.ack("cam-b"), b"ack for cam-b")
    aggregator.link.publish(topics.ack("cam-a"), b"ack for cam-a")  # sentinel
    assert victim.wait_for(topics.ack("cam-b")) == b"ack for cam-b"
    assert snoop.wait_for(topics.ack("cam-a")) == b"ack for cam-a"
    assert snoop.topics_received() == {topics.ack("cam-a")}


def _drop(client: Client) -> None:
    """Cut the connection without DISCONNECT, as a crash would: the broker then sends the will."""
    client.link._client.socket().shutdown(socket.SHUT_RDWR)
    client.link.close()  # before the link reconnects


def test_device_cannot_publish_through_its_last_will(clients, topics):
    watcher = clients(pki.AGGREGATOR_IDENTITY, [topics.global_manifest, topics.status("cam-a")])
    _drop(clients("cam-a", [], will=(topics.global_manifest, b"forged will", True)))
    _drop(clients("cam-a", [], will=(topics.status("cam-a"), _status("cam-a", "offline"), True)))
    assert watcher.wait_for(topics.status("cam-a")) == _status("cam-a", "offline")  # sentinel: wills do work
    assert watcher.topics_received() == {topics.status("cam-a")}


def test_device_cannot_take_over_another_devices_session(clients, topics, hardened_broker):
    # The broker replaces the client id with the certificate CN, so reusing cam-b's id does not kick cam-b.
    victim = clients("cam-b", topics.agent_subscriptions("cam-b"), client_id="facefed-agent-cam-b")
    clients("cam-a", [], client_id="facefed-agent-cam-b")
    clients(pki.AGGREGATOR_IDENTITY, []).link.publish(topics.ack("cam-b"), b"still here")
    assert victim.wait_for(topics.ack("cam-b")) == b"still here"
    assert victim.link.connected
    log = hardened_broker.log.read_text()
    assert "already connected, closing old connection" not in log
    assert re.search(r"New client connected from \S+ as cam-a ", log)


# -- what the aggregator may do -----------------------------------------------------------------


def test_aggregator_publishes_round_global_model_and_summary_to_devices(clients, topics):
    aggregator = clients(pki.AGGREGATOR_IDENTITY, [])
    manifest, chunks = build_transfer("global", "aggregator", 0, 1, {"w": np.zeros(4, np.float32)})
    aggregator.link.publish_transfer(topics.global_manifest, topics.global_chunk, manifest, chunks, retain=True)
    aggregator.link.publish(topics.round, b"round 0", retain=True)
    aggregator.link.publish(topics.round_summary, b"summary", retain=True)
    # A device that connects afterwards gets the retained round, model and summary.
    device = clients("cam-a", topics.agent_subscriptions("cam-a") + [topics.round_summary])
    device.wait_for_all({topics.round, topics.global_manifest, topics.global_chunk(0), topics.round_summary})
    assert (topics.global_manifest, manifest.to_json()) in device.received
    assert (topics.round, b"round 0") in device.received
