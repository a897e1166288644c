"""What the aggregator publishes over MQTT: signed announcements, the retained global model (in full, as a
delta or as a statistics patch), round summaries and update acks; all of it again after a reconnection."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedwire.chunking import build_transfer
from fedwire.compression import PATCH, as_global_delta
from fedwire.messages import RoundAnnouncement, RoundSummary, TransferManifest, UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.signing import sign
from fedwire.topics import Topics

from aggregator.rounds import GlobalModel

log = logging.getLogger("facefed.aggregator")

PUBLISH_RETRY_S = 1.0  # pause between attempts to publish retained state while the broker is away


class MqttPublisher:
    """The engine's Publisher on a connected MqttLink (set `link` before the first publish)."""

    def __init__(self, topics: Topics, max_chunk_bytes: int, signing_key=None) -> None:
        self.topics = topics
        self.max_chunk_bytes = max_chunk_bytes
        self.signing_key = signing_key
        self.link: MqttLink | None = None
        self._global_transfer: tuple[TransferManifest, list[bytes]] | None = None
        # download_codec int8-delta (PROTOCOL.md 5.2): the full model, retained apart for devices without the base
        self._full_transfer: tuple[TransferManifest, list[bytes]] | None = None
        self._chunks_retained: dict[str, int] = {}  # a transfer's chunk-0 topic -> chunks retained there by us
        self._retained: dict[str, bytes] = {}  # topic -> last retained message (round, summary)
        self.global_bytes = 0

    def signed(self, message):
        return sign(message, self.signing_key) if self.signing_key is not None else message

    def announce(self, announcement: RoundAnnouncement) -> None:
        self.publish_retained(self.topics.round, self.signed(announcement).to_json())

    def publish_summary(self, summary: RoundSummary) -> None:
        self.publish_retained(self.topics.round_summary, summary.to_json())

    def publish_global(self, model: GlobalModel) -> int:
        """Publish global model v (retained); returns the bytes a device downloads."""
        self._global_transfer, self._full_transfer = global_transfers(model, self.max_chunk_bytes, self.signed)
        self._publish_global_transfer()
        manifest, chunks = self._global_transfer
        log.debug("published global model v%d (%s, %d bytes in %d chunks)", model.version, manifest.codec,
                  self.global_bytes, len(chunks))
        return self.global_bytes

    def _publish_global_transfer(self) -> None:
        manifest, chunks = self._global_transfer
        full = self._full_transfer

        def publish() -> None:
            if full is not None:  # first: a device told by the delta to fall back finds the full model retained
                self.link.publish_transfer(self.topics.global_full_manifest, self.topics.global_full_chunk,
                                           full[0], full[1], retain=True)
                self._clear_stale_chunks(self.topics.global_full_chunk, len(full[1]))
            self.global_bytes = self.link.publish_transfer(self.topics.global_manifest, self.topics.global_chunk,
                                                           manifest, chunks, retain=True)
            self._clear_stale_chunks(self.topics.global_chunk, len(chunks))

        self._until_published(f"global model v{manifest.model_version}", publish)

    def _clear_stale_chunks(self, chunk_topic: Callable[[int], str], count: int) -> None:
        """A shorter transfer (a delta after a full model) leaves higher chunk indices retained: clear them."""
        key = chunk_topic(0)
        for index in range(count, self._chunks_retained.get(key, 0)):
            self.link.publish(chunk_topic(index), b"", retain=True)
        self._chunks_retained[key] = count

    def publish_retained(self, topic: str, payload: bytes) -> None:
        self._retained[topic] = payload
        self._until_published(topic, lambda: self.link.publish(topic, payload, retain=True))

    def _until_published(self, what: str, publish: Callable[[], None]) -> None:
        """Retained state must reach the broker: retry while the link reconnects (it does so forever)."""
        while True:
            try:
                publish()
                return
            except (ConnectionError, TimeoutError) as exc:
                log.warning("could not publish %s (%s); retrying", what, exc)
                time.sleep(PUBLISH_RETRY_S)

    def republish(self) -> None:
        """After a reconnection: the broker may have restarted without our retained messages (persistence off,
        or saved before they were published), so publish them again. The bytes are identical, so agents see
        the same announce id and transfer id and ignore them."""
        if self._global_transfer is not None:
            self._publish_global_transfer()
        for topic, payload in self._retained.items():
            self.publish_retained(topic, payload)

    def ack(self, ack: UpdateAck) -> None:
        # Not waiting for the broker's PUBACK: while a publish of ours waits, the link reads past its window of
        # unhandled messages (fedwire/mqtt.py), and an upload burst would pile up in the event queue. paho
        # delivers the ack, again after a reconnection if need be.
        try:
            self.link.publish_nowait(self.topics.ack(ack.device_id), ack.to_json(), qos=1)
        except (ConnectionError, TimeoutError) as exc:
            # Whatever we decided is already recorded; the device resends after a reconnect and is answered again.
            log.warning("ack for %s's update %s not delivered: %s", ack.device_id, ack.transfer_id, exc)


Transfer = tuple[TransferManifest, list[bytes]]


def global_transfers(model: GlobalModel, max_chunk_bytes: int, signed=lambda manifest: manifest
                     ) -> tuple[Transfer, Transfer | None]:
    """(what the global topics carry, the full model retained apart or None): global model v in full, as a
    delta against v - 1 or as a patch of v (its measured BatchNorm statistics, for devices that hold v with
    averaged ones). Manifests pass through `signed`."""
    v = model.version
    manifest, chunks = build_transfer("global", "aggregator", v, v, model.tensors, max_chunk_bytes=max_chunk_bytes)
    full = (signed(manifest), chunks) if model.full_apart else None
    if model.patch is not None:
        patch_manifest, patch_chunks = build_transfer("global", "aggregator", v, v, model.patch,
                                                      max_chunk_bytes=max_chunk_bytes)
        manifest, chunks = as_global_delta(patch_manifest, v, manifest.payload_sha256, PATCH), patch_chunks
    elif model.delta is not None:
        # Devices holding v - 1 rebuild v from the delta; manifest.payload_sha256 is the full model's hash.
        delta, delta_chunks = build_transfer("global", "aggregator", v, v, model.delta, max_chunk_bytes=max_chunk_bytes)
        manifest, chunks = as_global_delta(delta, v - 1, manifest.payload_sha256), delta_chunks
    return (signed(manifest), chunks), full


def transfer_bytes(transfer: Transfer) -> int:
    """What a transfer puts on the wire: every chunk (header included) and the manifest JSON
    (as MqttLink.publish_transfer counts it)."""
    manifest, chunks = transfer
    return sum(len(chunk) for chunk in chunks) + len(manifest.to_json())
