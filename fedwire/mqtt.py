"""MQTT transport for the FaceFed protocol (the only module that uses paho-mqtt).

MqttLink wraps one paho client: blocking connect with MQTT 5 -> 3.1.1 fallback,
automatic reconnect with backoff, re-subscription after every (re)connect, and
publishes that wait for the broker's PUBACK.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import ProtocolError
from .messages import TransferManifest
from .topics import SHARE_PREFIX

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "3.1.1", "5")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
QOS = 1  # every FaceFed topic is subscribed at QoS 1
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30
SESSION_EXPIRY_S = 24 * 3600  # MQTT 5 only: how long the broker keeps a non-clean session
PROBE_TIMEOUT_S = 2.0  # "auto": wait this long for an MQTT 5 CONNACK before falling back to 3.1.1
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # paho maps a 3.1.1 broker's CONNACK code 1 to this reason


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mqtts://; None uses the system CA store / no client certificate."""

    ca_cert: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether host:port answers a TLS ClientHello with a TLS record (a handshake or an alert): a TLS listener.
    Only the first 5 bytes of the reply are read; no certificate is checked and nothing else is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        context.wrap_bio(incoming, outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is written and the handshake waits for the server: what we want
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(outgoing.read())
            reply = sock.recv(5)
    except OSError:
        return False
    # A TLS record header: content type 22 (handshake) or 21 (alert), then protocol major version 3.
    return len(reply) >= 2 and reply[0] in (21, 22) and reply[1] == 3


def parse_broker_url(url: str) -> BrokerAddress:
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError) as exc:
        raise ProtocolError("url", f"{url!r} is not a broker url: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ProtocolError("url", f"{url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ProtocolError("url", f"{url!r} has no host")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProtocolError("url", f"{url!r}: only scheme://host:port is supported")
    if port == 0:
        raise ProtocolError("url", f"{url!r}: port 0 is not a broker port")
    return BrokerAddress(parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")


RECEIVE_MAXIMUM = 20  # unacknowledged messages in flight to a consumer that acks after handling (mosquitto's default)
# Mosquitto 2.0.11 does not keep to that window: every PUBACK it gets releases up to a whole window of queued
# messages, so a consumer that acks one at a time receives the backlog anyway (tests/test_fedwire_mqtt.py).
# MqttLink therefore keeps its own window: with ack_after_handling, at most max_unacked messages are handed to
# on_message and not yet acknowledged; beyond that paho's network thread stops reading the socket, and TCP
# flow control makes the broker hold the rest.


def unshared(topic_filter: str) -> str:
    """`$share/<group>/<filter>` matches what `<filter>` matches (MQTT 5 section 4.8.2)."""
    if topic_filter.startswith(SHARE_PREFIX):
        return topic_filter.split("/", 2)[2]
    return topic_filter


@dataclass
class _Attempt:
    """Outcome of one connection attempt, filled in by the paho callbacks."""

    connack: threading.Event = field(default_factory=threading.Event)
    refusal: str | None = None  # None once accepted
    protocol_refused: bool = False  # the broker does not speak the protocol version we offered


class HeldAck:
    """The ack of a message handed over with ack_after_handling. Calling it (from any thread) sends the PUBACK
    and frees the message's place in the link's window; release() frees the place alone."""

    def __init__(self, link: MqttLink, send_puback: Callable[[], None]) -> None:
        self._link = link
        self._send_puback = send_puback
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._link._release()

    def __call__(self) -> None:
        self.release()
        self._send_puback()


class MqttLink:
    """One MQTT connection. Callbacks (`on_message`) run on paho's network thread:
    push work onto a queue there and never call publish() from it (it would wait forever
    for a PUBACK that only that thread can read)."""

    def __init__(
        self,
        url: str,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        subscriptions: Sequence[str],
        will: tuple[str, bytes, bool] | None = None,
        protocol: str = "auto",
        keepalive: int = 30,
        tls: TlsFiles | None = None,
        clean_session: bool = True,
        ack_after_handling: bool = False,
        max_unacked: int = RECEIVE_MAXIMUM,
        admit: Callable[[str, bytes], bool] | None = None,
    ) -> None:
        """ack_after_handling: on_message(topic, payload, ack) gets a third argument, a callable that sends the
        QoS 1 PUBACK; call it (from any thread) once the message is handled. The broker sends only a few
        unacknowledged messages at a time (MQTT 5: RECEIVE_MAXIMUM; 3.1.1: the broker's setting, mosquitto's
        max_inflight_messages, 20), so a slow consumer makes the
        broker hold the backlog instead of this process, and with a persistent session a message not yet
        acknowledged when the process dies is delivered again.

        Brokers do not always keep to that window (mosquitto 2.0.11 does not), so the link enforces it too: once
        max_unacked messages (of any QoS) were handed to on_message and not acknowledged, the network thread
        waits before handing over the next one and reads nothing meanwhile, so the backlog stays at the broker
        whatever it does. It reads on while a call of this link waits for the broker (a PUBACK, a SUBACK), since
        that answer may sit behind the backlog, and once per keepalive/2, so the connection stays alive.

        admit(topic, payload), if given, runs on the network thread before a message takes a place in the
        window: a message it refuses is acknowledged at once and never handed to on_message. It must be cheap
        (no parsing): it is how a consumer keeps one flooding sender from filling the window, which would stop
        the reading and leave the broker to queue, and drop, everyone's messages behind the flood."""
        if protocol not in PROTOCOLS:
            raise ProtocolError("protocol", f"{protocol!r} is not one of {PROTOCOLS}")
        self.address = parse_broker_url(url)
        if tls is not None and not self.address.tls:
            raise ProtocolError("url", f"TLS files given but {url!r} is not mqtts://")
        self.url = url
        self.client_id = client_id
        self.keepalive = keepalive
        self._on_message_cb = on_message
        self._subscriptions = list(subscriptions)
        self._will = will
        self._requested_protocol = protocol
        self._tls = tls
        self._clean_session = clean_session
        self._ack_after_handling = ack_after_handling
        self._admit = admit
        if max_unacked < 1:
            raise ValueError(f"max_unacked must be >= 1, not {max_unacked}")
        self.max_unacked = max_unacked
        self._window = threading.Condition()  # guards the three counters below
        self._unacked = 0  # messages handed to on_message (ack_after_handling) and not acknowledged yet
        self._awaiting_broker = 0  # calls of this link now waiting for an answer from the broker
        self._closing = False
        self.peak_unacked = 0  # the most messages ever held at once: the bound this link kept
        self._lock = threading.Lock()  # guards _subscriptions, _pubacks and _unawaited
        # mid -> PUBACK outcome ("" or an MQTT 5 failure reason) not claimed yet by the publish that sent it:
        # a PUBACK can arrive before publish()/publish_nowait() returns from paho.
        self._pubacks: dict[int, str] = {}
        # mid -> (topic, on_acked) of publish_nowait() messages not acknowledged yet
        self._unawaited: dict[int, tuple[str, Callable[[], None] | None]] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # SUBACK for the current connection's subscriptions
        self._pending_subscribe: tuple[int, list[str]] | None = None  # (mid, topics) awaiting SUBACK
        self._refused_topics: list[str] = []
        self._attempt = _Attempt()
        self._in_callback = threading.local()
        self._protocol_version: str | None = None
        self._client: paho.Client | None = None
        self._connections = 0  # accepted CONNACKs so far, reconnections included

    # -- public API ---------------------------------------------------------

    @property
    def protocol_version(self) -> str:
        if self._protocol_version is None:
            raise RuntimeError("protocol version is known only after connect()")
        return self._protocol_version

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connections(self) -> int:
        """How many times the broker accepted this link (1 after connect(), +1 per reconnection).

        An owner that sees it change knows the link was re-established: the broker may have
        restarted and lost what it held (retained messages, queued or half-sent publishes)."""
        return self._connections

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe, blocking until the broker acknowledged both."""
        if self._client is not None:
            raise RuntimeError("already connected; create a new MqttLink to reconnect")
        try:
            self._connect(timeout)
        except ConnectionError:
            # A TLS listener drops a plain CONNECT without a word: find out why before reporting a vague failure.
            if not self.address.tls and speaks_tls(self.address.host, self.address.port):
                raise ConnectionError(f"broker {self.url}: this port speaks TLS: use "
                                      f"mqtts://{self.address.host}:{self.address.port}") from None
            raise

    def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        versions = ["5", "3.1.1"] if self._requested_protocol == "auto" else [self._requested_protocol]
        for version in versions:
            can_fall_back = version != versions[-1]
            attempt = self._start_attempt(version, deadline, probe=can_fall_back)
            if attempt.refusal is None:
                self._protocol_version = version
                self._wait_subscribed(deadline)
                log.info("connected to %s as %s (MQTT %s)", self.url, self.client_id, version)
                return
            self._stop_client()
            if not (attempt.protocol_refused and can_fall_back):
                raise ConnectionError(f"broker {self.url} refused {self.client_id} (MQTT {version}): {attempt.refusal}")
            log.info("broker %s did not accept MQTT %s (%s), falling back", self.url, version, attempt.refusal)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30.0) -> None:
        """Publish and wait until the broker has it (PUBACK at QoS 1); raises on failure or timeout."""
        deadline = time.monotonic() + timeout
        client = self._ready_client(deadline)
        self._await_published(topic, client.publish(topic, payload, qos=qos, retain=retain), deadline)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                       on_acked: Callable[[], None] | None = None) -> None:
        """Hand a publish to the network thread and return: paho sends it, and sends it again after a
        reconnection until the broker acknowledges it. For messages whose loss the protocol tolerates (an
        update ack: a device that gets none resends). A consumer with ack_after_handling needs it for
        what it publishes while handling a message: waiting for a PUBACK opens the window (see __init__).
        A broker's refusal (MQTT 5 PUBACK reason) is logged. on_acked, if given, runs once the broker has
        answered (QoS 0: at once), on the network thread or this one: it must not wait for the broker."""
        client = self._client
        if client is None:
            raise ConnectionError(f"{self.client_id}: not connected (call connect() first)")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: queued for the reconnection
            raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            outcome: str | None = ""
        else:
            with self._lock:
                outcome = self._pubacks.pop(info.mid, None)  # the PUBACK may already be in
                if outcome is None:
                    self._unawaited[info.mid] = (topic, on_acked)
        if outcome is not None:
            self._published_nowait(topic, outcome, on_acked)

    def _published_nowait(self, topic: str, failure: str, on_acked: Callable[[], None] | None) -> None:
        if failure:
            log.warning("%s: broker %s refused publish to %s: %s", self.client_id, self.url, topic, failure)
        if on_acked is not None:
            on_acked()

    def publish_transfer(
        self,
        manifest_topic: str,
        chunk_topic: Callable[[int], str],
        manifest: TransferManifest,
        chunks: Sequence[bytes],
        retain: bool = False,
        timeout: float = 120.0,
    ) -> int:
        """Publish all chunks (pipelined), then the manifest; returns the payload bytes sent.

        The manifest goes last so that whoever sees it, live or retained, can already get every chunk.
        """
        deadline = time.monotonic() + timeout
        client = self._ready_client(deadline)
        pending = []
        for index, chunk in enumerate(chunks):
            topic = chunk_topic(index)
            pending.append((topic, client.publish(topic, chunk, qos=QOS, retain=retain)))
        for topic, info in pending:
            self._await_published(topic, info, deadline)
        manifest_json = manifest.to_json()
        remaining = max(deadline - time.monotonic(), 1.0)
        self.publish(manifest_topic, manifest_json, qos=QOS, retain=retain, timeout=remaining)
        return sum(len(chunk) for chunk in chunks) + len(manifest_json)

    def resubscribe(self, topic: str) -> None:
        """Unsubscribe and subscribe again so the broker re-sends retained messages.

        Does not wait for the SUBACK, so it is safe to call from on_message."""
        with self._lock:
            if topic not in self._subscriptions:
                self._subscriptions.append(topic)
        if self._client is not None:
            self._client.unsubscribe(topic)
            self._client.subscribe(topic, qos=QOS)

    def close(self) -> None:
        """Disconnect cleanly; the broker then does NOT publish the will."""
        self._stop_client()
        log.info("disconnected %s from %s", self.client_id, self.url)

    # -- connection handling ------------------------------------------------

    def _new_client(self, version: str) -> paho.Client:
        v5 = version == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else self._clean_session,  # MQTT 5 uses clean_start at connect()
            manual_ack=self._ack_after_handling,
        )
        if self.address.tls:
            tls = self._tls or TlsFiles()
            client.tls_set(ca_certs=tls.ca_cert, certfile=tls.certfile, keyfile=tls.keyfile)
        if self._will is not None:
            will_topic, will_payload, will_retain = self._will
            client.will_set(will_topic, will_payload, qos=QOS, retain=will_retain)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    def _connect_options(self, version: str) -> dict:
        if version != "5":
            return {}
        properties = Properties(PacketTypes.CONNECT)
        if not self._clean_session:
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        if self._ack_after_handling:
            # MQTT 5 lets the client set the window; without it the broker may send 65,535 unacknowledged messages.
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        return {"clean_start": self._clean_session, "properties": properties}

    def _start_attempt(self, version: str, deadline: float, probe: bool) -> _Attempt:
        """Open the socket, send CONNECT and run the network loop in this thread until the CONNACK.

        The background loop (which reconnects on its own) starts only once the broker accepted,
        so a refused attempt leaves no thread behind. A probe (MQTT 5 in "auto" mode) that gets no
        answer counts as a protocol refusal: amqtt misparses MQTT 5 CONNECTs that carry a will or
        properties and then waits for bytes that never come instead of answering."""
        self._attempt = attempt = _Attempt()
        with self._window:
            self._closing = False  # a refused attempt before this one stopped its client
        client = self._client = self._new_client(version)
        try:
            client.connect(self.address.host, self.address.port, self.keepalive, **self._connect_options(version))
        except OSError as exc:
            self._client = None
            raise ConnectionError(f"cannot reach broker {self.url} as {self.client_id}: {exc}") from exc
        until = min(deadline, time.monotonic() + PROBE_TIMEOUT_S) if probe else deadline
        while not attempt.connack.is_set() and time.monotonic() < until:
            client.loop(timeout=0.05)  # a lost connection ends up in _handle_disconnect
        if attempt.connack.is_set():
            if attempt.refusal is None:
                client.loop_start()
            return attempt
        if probe:
            return _Attempt(refusal=f"no CONNACK within {PROBE_TIMEOUT_S:.0f} s", protocol_refused=True)
        self._stop_client()
        raise ConnectionError(f"no CONNACK from {self.url} for {self.client_id} (MQTT {version}) in time")

    def _wait_subscribed(self, deadline: float) -> None:
        with self._waiting_for_broker():
            subscribed = self._subscribed.wait(max(deadline - time.monotonic(), 0.0))
        if not subscribed:
            self._stop_client()
            raise ConnectionError(f"no SUBACK from {self.url} for {self.client_id} in time")
        if self._refused_topics:
            self._stop_client()
            raise ConnectionError(f"broker {self.url} refused subscriptions {self._refused_topics}")

    def _stop_client(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()  # first, so the disconnect callback does not report a lost connection
        with self._window:  # a network thread waiting for the window must not hold up loop_stop()
            self._closing = True
            self._window.notify_all()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _ready_client(self, deadline: float) -> paho.Client:
        """The client to publish with, once connected; raises instead of publishing into the void."""
        if getattr(self._in_callback, "active", False):
            raise RuntimeError("publish() called from on_message would deadlock; hand the work to another thread")
        client = self._client
        if client is None:
            raise ConnectionError(f"{self.client_id}: not connected (call connect() first)")
        # During a reconnect, wait for the link instead of failing at once.
        with self._waiting_for_broker():
            connected = self._connected.wait(max(deadline - time.monotonic(), 0.0))
        if not connected:
            raise ConnectionError(f"{self.client_id}: not connected to {self.url}")
        return client

    def _await_published(self, topic: str, info: paho.MQTTMessageInfo, deadline: float) -> None:
        try:
            with self._waiting_for_broker():
                info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
        except (RuntimeError, ValueError) as exc:
            raise ConnectionError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise TimeoutError(f"no acknowledgement from {self.url} for {topic}")
        with self._lock:
            failure = self._pubacks.pop(info.mid, "")
        if failure:
            raise ConnectionError(f"broker {self.url} rejected publish to {topic}: {failure}")

    # -- paho callbacks (network thread) ------------------------------------

    def _handle_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                        reason: ReasonCode, properties: Properties | None) -> None:
        attempt = self._attempt
        if reason.is_failure and not attempt.connack.is_set():
            attempt.refusal = str(reason)  # connect() decides: fall back or raise
            attempt.protocol_refused = reason.value == UNSUPPORTED_PROTOCOL_VERSION
            attempt.connack.set()
            return
        if reason.is_failure:
            log.warning("%s: broker %s refused reconnection: %s", self.client_id, self.url, reason)
            return
        self._subscribe_all(client)
        self._connections += 1
        if self._connections > 1:
            log.info("%s: reconnected to %s (session %s)", self.client_id, self.url,
                     "resumed" if flags.session_present else "new")
        self._connected.set()
        attempt.connack.set()

    def _subscribe_all(self, client: paho.Client) -> None:
        # Clean sessions forget subscriptions, so every (re)connect subscribes again.
        self._subscribed.clear()
        self._refused_topics = []
        with self._lock:
            topics = list(self._subscriptions)
        if not topics:
            self._subscribed.set()
            return
        _, mid = client.subscribe([(topic, QOS) for topic in topics])
        self._pending_subscribe = (mid, topics)

    def _handle_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                           reason: ReasonCode, properties: Properties | None) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        attempt = self._attempt
        if not attempt.connack.is_set():
            # Some 3.1.1-only brokers hang up on an MQTT 5 CONNECT instead of answering it.
            attempt.refusal = f"connection closed before CONNACK ({reason})"
            attempt.protocol_refused = True
            attempt.connack.set()
        elif was_connected:
            log.warning("%s: lost connection to %s (%s); reconnecting", self.client_id, self.url, reason)

    def _handle_subscribe(self, client: paho.Client, userdata: object, mid: int,
                          reasons: list[ReasonCode], properties: Properties | None) -> None:
        if self._pending_subscribe is None or mid != self._pending_subscribe[0]:
            return  # a resubscribe() nobody waits for
        topics = self._pending_subscribe[1]
        self._refused_topics = [topic for topic, reason in zip(topics, reasons) if reason.is_failure]
        if self._refused_topics:
            log.error("%s: broker %s refused subscriptions %s", self.client_id, self.url, self._refused_topics)
        self._subscribed.set()

    def _is_subscribed(self, topic: str) -> bool:
        with self._lock:
            return any(paho.topic_matches_sub(unshared(pattern), topic) for pattern in self._subscriptions)

    def _handle_publish(self, client: paho.Client, userdata: object, mid: int,
                        reason: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            unawaited = self._unawaited.pop(mid, None)
            failure = str(reason) if reason.is_failure else ""  # only MQTT 5 PUBACKs carry failure reasons
            if unawaited is None:
                self._pubacks[mid] = failure
        if unawaited is not None:
            self._published_nowait(unawaited[0], failure, unawaited[1])

    def _handle_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        ack = self._acknowledger(client, message)
        if not self._is_subscribed(message.topic):
            # amqtt 0.12.1 sends a new client the retained messages of *every* client's subscriptions.
            log.debug("%s: dropped %s, not subscribed", self.client_id, message.topic)
            ack()
            return
        if self._admit is not None and not self._admit(message.topic, message.payload):
            ack()
            return
        if self._ack_after_handling:
            ack = self._hold(ack)
        self._in_callback.active = True
        try:
            if self._ack_after_handling:
                self._on_message_cb(message.topic, message.payload, ack)
            else:
                self._on_message_cb(message.topic, message.payload)
        except Exception:  # an exception here would kill paho's network thread
            log.exception("%s: on_message failed for %s", self.client_id, message.topic)
            ack()
        finally:
            self._in_callback.active = False

    @contextmanager
    def _waiting_for_broker(self) -> Iterator[None]:
        """While a caller waits for the broker, the network thread reads past the window: the answer may
        sit behind messages that would not be handed over otherwise."""
        with self._window:
            self._awaiting_broker += 1
            self._window.notify_all()
        try:
            yield
        finally:
            with self._window:
                self._awaiting_broker -= 1

    def _hold(self, ack: Callable[[], None]) -> HeldAck:
        """Network thread: wait until the window has room, count the message in it, and return its ack."""
        with self._window:
            while self._unacked >= self.max_unacked and not self._awaiting_broker and not self._closing:
                if not self._window.wait(timeout=max(self.keepalive / 2, 0.5)):
                    break  # let one through: paho's loop then sends PUBACKs and PINGREQs, and the broker keeps us
            self._unacked += 1
            self.peak_unacked = max(self.peak_unacked, self._unacked)
        return HeldAck(self, ack)

    def _release(self) -> None:
        with self._window:
            self._unacked -= 1
            self._window.notify_all()

    @property
    def unacked(self) -> int:
        """Messages handed to on_message (ack_after_handling) and not acknowledged yet."""
        return self._unacked

    def _acknowledger(self, client: paho.Client, message: paho.MQTTMessage) -> Callable[[], None]:
        """The PUBACK for `message` (a no-op unless acks are manual and it is QoS 1 or 2)."""
        if not self._ack_after_handling or message.qos == 0:
            return lambda: None
        connection = self._connections

        def ack() -> None:
            # A packet id belongs to one connection: after a reconnection the broker resends the message
            # under a new id, and acking the old one could acknowledge some other message.
            if self._connections == connection:
                client.ack(message.mid, message.qos)
        return ack
