"""Feeds FleetState from the outside only: the broker's public and retained topics as an MQTT client
of its own, and the aggregator's rounds.jsonl, tailed. Nothing here touches the round loop."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedwire.errors import ProtocolError
from fedwire.messages import DeviceStatus, RoundAnnouncement, RoundSummary, TransferManifest, UpdateAck
from fedwire.mqtt import MqttLink, TlsFiles
from fedwire.signing import SignatureError, verify
from fedwire.topics import Topics

from .state import FleetState

log = logging.getLogger("facefed.dashboard")

ROUNDS_LOG = "rounds.jsonl"  # in state_dir, written by aggregator/state.py
LOG_POLL_S = 0.5
CONNECT_RETRY_S = 1.0


def dashboard_subscriptions(topics: Topics) -> list[str]:
    """Read-only: what the hardened broker's `dashboard` identity may read (aggregator/broker_config.py)."""
    p = topics.prefix
    return [topics.round, topics.global_manifest, topics.round_summary, f"{p}/status/+", f"{p}/ack/+",
            f"{p}/update/+/manifest"]


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, first 16 hex digits (as the docs and the page show it)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class FleetFeed:
    """Routes broker messages into a FleetState; anything malformed is logged and dropped."""

    def __init__(self, state: FleetState, topics: Topics, verify_key: Ed25519PublicKey | None = None) -> None:
        self.state = state
        self.topics = topics
        self.verify_key = verify_key
        self.dropped = 0

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        try:
            parsed = self.topics.parse(topic)
            if not payload:
                return  # a cleared retained topic
            if parsed.kind == "status":
                status = DeviceStatus.from_json(payload)
                if status.device_id != parsed.device_id:
                    raise ProtocolError("device_id", f"{status.device_id!r} on {parsed.device_id}'s status topic")
                self.state.on_status(status)
            elif parsed.kind == "ack":
                self.state.on_ack(UpdateAck.from_json(payload), now)
            elif parsed.kind == "round":
                self.state.on_announcement(RoundAnnouncement.from_json(payload), now)
            elif parsed.kind == "global_manifest":
                manifest = TransferManifest.from_json(payload)
                self.state.on_global_manifest(manifest, self._verified(manifest), now)
            elif parsed.kind == "update_manifest":
                self.state.on_update_manifest(TransferManifest.from_json(payload))
            elif parsed.kind == "summary":
                self.state.on_summary(RoundSummary.from_json(payload))
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)

    def _verified(self, manifest: TransferManifest) -> bool | None:
        if self.verify_key is None:
            return None
        try:
            verify(manifest, self.verify_key)
        except SignatureError:
            return False
        return True


class RoundsLogTail:
    """Reads rounds.jsonl from where it left off; a line still being written waits for its newline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:  # replaced or truncated: read it again from the start
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        entries = []
        for line in lines:
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("skipped a line of %s that is not JSON: %s", self.path, exc)
        return entries


class DashboardFeeds:
    """The two feeds as daemon threads: the MQTT client (connecting until the broker is up) and the log tail."""

    def __init__(self, state: FleetState, feed: FleetFeed, broker_url: str, state_dir: Path,
                 client_id: str = "facefed-dashboard", protocol: str = "auto", tls: TlsFiles | None = None) -> None:
        self.state = state
        self.feed = feed
        self.broker_url = broker_url
        self.client_id = client_id
        self.protocol = protocol
        self.tls = tls
        self.tail = RoundsLogTail(Path(state_dir) / ROUNDS_LOG)
        self._stop = threading.Event()
        self._link: MqttLink | None = None
        self._threads = [threading.Thread(target=self._mqtt_loop, name="dashboard-mqtt", daemon=True),
                         threading.Thread(target=self._tail_loop, name="dashboard-log", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._link is not None:
            self._link.close()

    def _tail_loop(self) -> None:
        while not self._stop.is_set():
            try:
                entries = self.tail.read_new()
            except OSError as exc:
                log.warning("cannot read %s: %s", self.tail.path, exc)
                entries = []
            if entries:
                self.state.on_log_entries(entries)
            self._stop.wait(LOG_POLL_S)

    def _mqtt_loop(self) -> None:
        """Connect (retrying: the aggregator may start its embedded broker after us), then watch the link."""
        while not self._stop.is_set() and self._link is None:
            link = MqttLink(self.broker_url, client_id=self.client_id, on_message=self.feed.handle,
                            subscriptions=dashboard_subscriptions(self.feed.topics), protocol=self.protocol,
                            tls=self.tls, clean_session=True)
            try:
                link.connect()
            except (ConnectionError, TimeoutError, OSError) as exc:
                link.close()
                log.debug("dashboard: broker %s not reachable yet: %s", self.broker_url, exc)
                self._stop.wait(CONNECT_RETRY_S)
                continue
            self._link = link
            log.info("dashboard: reading the fleet from %s", self.broker_url)
        while not self._stop.is_set():
            if self._link.connected != self.state.connected:
                self.state.set_connected(self._link.connected)
            self._stop.wait(1.0)
