"""Device messages in: status reports and chunked uploads, reassembled and handed to the round engine, whose
verdict goes back to the device as an ack. Anything malformed is logged and dropped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aggregator.rounds import RoundEngine, Verdict
from fedwire.chunking import CompletedTransfer, Reassembler, unpack_chunk
from fedwire.errors import ProtocolError
from fedwire.messages import DeviceStatus, TransferManifest, UpdateAck
from fedwire.topics import Topics

log = logging.getLogger("facefed.aggregator")

# Chunk data of uploads in progress kept in memory; beyond it, on disk (fedwire.chunking.Reassembler). Chunks come
# before their manifest, so each upload in progress holds up to a whole payload until then: without a budget the
# memory would grow with the number of devices uploading at the same moment.
REASSEMBLY_MEMORY_BYTES = 32 * 2**20


class Intake:
    def __init__(self, engine: RoundEngine, topics: Topics, send_ack: Callable[[UpdateAck], None],
                 revoked: Callable[[str], bool], on_verdict: Callable[[Verdict], None] | None = None) -> None:
        config = engine.config
        self.engine = engine
        self.topics = topics
        self.send_ack = send_ack
        self.revoked = revoked
        self.on_verdict = on_verdict  # a shard worker tells the reducer of each acceptance
        self.reassembler = Reassembler(max_payload_bytes=config.max_update_bytes, timeout_s=config.round_timeout_s,
                                       memory_budget_bytes=REASSEMBLY_MEMORY_BYTES, spill_dir=engine.state.root)

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Route one device message; anything malformed is logged and dropped."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "update_manifest":
                self._on_manifest(parsed.device_id, payload)
            elif parsed.kind == "update_chunk":
                self._on_chunk(parsed.device_id, payload)
            elif parsed.kind == "status":
                self._on_status(parsed.device_id, payload)
        except ProtocolError as exc:
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)

    def expire(self, now: float) -> None:
        for dropped in self.reassembler.expire(now):
            log.warning("dropped incomplete transfer %s (chunks missing past timeout)", dropped)

    def _on_status(self, device_id: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        status = DeviceStatus.from_json(payload)
        self.engine.device_state(device_id, status.state, status.detail)

    def _on_manifest(self, device_id: str, payload: bytes) -> None:
        manifest = TransferManifest.from_json(payload)
        self.engine.received_bytes(len(payload))
        verdict = self.engine.screen(device_id, manifest, revoked=self.revoked(device_id))
        if verdict is not None:
            self._answer(verdict)
            return
        try:
            completed = self.reassembler.add_manifest(device_id, manifest, time.time())
        except ProtocolError as exc:
            self._transfer_fault(device_id, manifest.transfer_id, exc)
            return
        self._complete(device_id, completed)

    def _on_chunk(self, device_id: str, payload: bytes) -> None:
        self.engine.received_bytes(len(payload))
        try:
            completed = self.reassembler.add_chunk(device_id, payload, time.time())
        except ProtocolError as exc:
            try:
                transfer_id = unpack_chunk(payload)[0].transfer_id
            except ProtocolError:
                transfer_id = None  # not even a chunk header: nothing the device could resend
            self._transfer_fault(device_id, transfer_id, exc)
            return
        self._complete(device_id, completed)

    def _transfer_fault(self, device_id: str, transfer_id: str | None, exc: ProtocolError) -> None:
        """A chunk went missing or bad in transit: drop it and tell the device, which resends."""
        log.warning("dropped update transfer from %s: %s", device_id, exc)
        current = self.engine.current
        if current is not None and transfer_id is not None:
            self.send_ack(UpdateAck(device_id, current.number, transfer_id, False, f"transfer fault: {exc}"))

    def _complete(self, device_id: str, completed: CompletedTransfer | None) -> None:
        if completed is not None:
            verdict = self.engine.accept(device_id, completed)
            if verdict is not None:
                self._answer(verdict)

    def _answer(self, verdict: Verdict) -> None:
        self.send_ack(verdict.ack)
        if self.on_verdict is not None:
            self.on_verdict(verdict)
