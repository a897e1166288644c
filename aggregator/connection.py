"""The aggregator's broker connection: the embedded broker when none is configured, the MQTT link with its
event queue, and the per-device budget and revocation list the link's `admit` hook applies."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from aggregator.budget import BudgetLimits, DeviceBudget, sender
from aggregator.config import AggregatorConfig
from aggregator.pki import PkiError, load_revoked
from fedwire.broker import EmbeddedBroker
from fedwire.mqtt import MqttLink

log = logging.getLogger("facefed.aggregator")

STREAM_POLL_S = 0.2
REVOKED_POLL_S = 1.0  # how often the revoked_devices file is checked for changes

Event = tuple[str, bytes, Callable[[], None]]  # (topic, payload, ack): acked once handled


def handle(event: Event, handler: Callable[[str, bytes], None]) -> None:
    """Hand one event's message to `handler`, then acknowledge it, whatever happened."""
    topic, payload, ack = event
    try:
        handler(topic, payload)
    finally:
        ack()


class Connection:
    def __init__(self, config: AggregatorConfig, update_bytes: int) -> None:
        self.config = config
        budget = config.device_budget
        self.budget = DeviceBudget(BudgetLimits.derive(update_bytes, budget.min_chunk_bytes, budget.transfers,
                                                       budget.messages, budget.bytes))
        # Acked once handled, so the broker, not this process, holds any backlog.
        self.events: queue.Queue[Event] = queue.Queue()
        self.link: MqttLink | None = None
        self._broker: EmbeddedBroker | None = None
        self._seen_connections = 0  # the link's connection count when the caller last asked `reconnected`
        self._revoked_checked = 0.0
        self._revoked_mtime: float | None = None

    def connect(self, subscriptions: list[str]) -> MqttLink:
        self.reload_revoked(force=True)
        url = self.config.broker
        if url is None:
            self._broker = EmbeddedBroker(port=self.config.embedded_port)
            url = self._broker.start()
            log.info("embedded broker listening at %s", url)
        self.link = MqttLink(
            url,
            client_id=self.config.client_id,
            on_message=lambda topic, payload, ack: self.events.put((topic, payload, ack)),
            subscriptions=subscriptions,
            protocol=self.config.protocol,
            tls=self.config.tls.files() if url.startswith("mqtts://") else None,
            clean_session=False,  # the broker queues updates (QoS 1) for us while we are down
            ack_after_handling=True,
            admit=self._admit,
        )
        self.link.connect()
        self._seen_connections = self.link.connections
        log.info("connected to %s (MQTT %s)", url, self.link.protocol_version)
        return self.link

    def next_event(self) -> Event | None:
        """The next inbound message, if one arrives within STREAM_POLL_S."""
        try:
            return self.events.get(timeout=STREAM_POLL_S)
        except queue.Empty:
            return None

    def reconnected(self) -> bool:
        """Whether the link connected again since the last call (retained state may need publishing again)."""
        if self.link.connections == self._seen_connections:
            return False
        self._seen_connections = self.link.connections
        return True

    def reload_revoked(self, force: bool = False) -> None:
        """Read revoked_devices at start and whenever the file changed (checked every REVOKED_POLL_S)."""
        path = self.config.revoked_devices
        now = time.monotonic()
        if path is None or (not force and now - self._revoked_checked < REVOKED_POLL_S):
            return
        self._revoked_checked = now
        try:
            mtime = path.stat().st_mtime
            if mtime == self._revoked_mtime:
                return
            revoked = load_revoked(path)
        except (OSError, PkiError) as exc:  # a bad edit keeps the list we have
            log.error("revoked devices not re-read: %s", exc)
            return
        self._revoked_mtime = mtime
        if revoked != self.budget.revoked:
            log.info("revoked devices (%s): %s", path, ", ".join(sorted(revoked)) or "none")
        self.budget.set_revoked(revoked)

    def _admit(self, topic: str, payload: bytes) -> bool:
        """Network thread, before anything is parsed or queued: a revoked device, or one over its budget for
        the round, is dropped here (acknowledged, never queued), so a flood does not wait in front of the
        other devices' updates."""
        device_id = sender(self.config.topics.prefix, topic)
        if device_id is None:
            return True
        verdict = self.budget.admit(device_id, payload)
        if verdict.first_drop:
            log.warning("dropping every message from %s for the rest of the round: %s", device_id, verdict.reason)
        return verdict.admitted

    def new_round(self) -> None:
        """Every device's budget starts again; say what was dropped in the round before."""
        for device_id, (reason, count) in sorted(self.budget.new_round().items()):
            log.warning("dropped %d message(s) from %s (%s)", count, device_id, reason)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
