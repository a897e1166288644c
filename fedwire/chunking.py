"""Splitting a tensor payload into MQTT-sized chunks and reassembling it.

Chunk payload = 28-byte header + data:
    b"FWC1" | transfer_id (16 raw bytes) | index (u32 BE) | count (u32 BE) | data
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .codec import decode_tensors, encode_tensors, sha256_hex, tensor_specs
from .errors import ProtocolError, TransferError
from .messages import TransferManifest

log = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
CHUNK_MAGIC = b"FWC1"
_HEADER = struct.Struct(">4s16sII")
CHUNK_HEADER_BYTES = _HEADER.size  # 28


@dataclass(frozen=True)
class ChunkHeader:
    transfer_id: str  # 32 lowercase hex, as in the manifest
    index: int
    count: int


def pack_chunk(header: ChunkHeader, data: bytes) -> bytes:
    return _HEADER.pack(CHUNK_MAGIC, bytes.fromhex(header.transfer_id), header.index, header.count) + data


def unpack_chunk(payload: bytes) -> tuple[ChunkHeader, bytes]:
    if len(payload) < CHUNK_HEADER_BYTES:
        raise TransferError("chunk", f"{len(payload)} bytes is shorter than the {CHUNK_HEADER_BYTES}-byte header")
    magic, raw_id, index, count = _HEADER.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise TransferError("chunk", f"bad magic {magic!r}")
    if index >= count:
        raise TransferError("chunk", f"index {index} out of range for {count} chunks")
    return ChunkHeader(raw_id.hex(), index, count), bytes(payload[CHUNK_HEADER_BYTES:])


def build_transfer(
    kind: str,
    sender: str,
    round: int,
    model_version: int,
    tensors: Mapping[str, np.ndarray],
    *,
    num_samples: int = 0,
    metrics: Mapping[str, float] | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    codec: str = "safetensors",
) -> tuple[TransferManifest, list[bytes]]:
    """Encode tensors and split them; every returned chunk is at most max_chunk_bytes long."""
    if max_chunk_bytes <= CHUNK_HEADER_BYTES:
        reason = f"{max_chunk_bytes} leaves no room after the {CHUNK_HEADER_BYTES}-byte header"
        raise ProtocolError("max_chunk_bytes", reason)
    payload = encode_tensors(tensors)
    chunk_size = max_chunk_bytes - CHUNK_HEADER_BYTES
    pieces = [payload[start:start + chunk_size] for start in range(0, len(payload), chunk_size)]
    manifest = TransferManifest(
        kind=kind,
        transfer_id=secrets.token_hex(16),
        sender=sender,
        round=round,
        model_version=model_version,
        num_samples=num_samples,
        tensors=tensor_specs(tensors),
        payload_bytes=len(payload),
        payload_sha256=sha256_hex(payload),
        chunk_size=chunk_size,
        chunk_sha256=[sha256_hex(piece) for piece in pieces],
        metrics=dict(metrics or {}),
        codec=codec,
    )
    manifest = TransferManifest.from_json(manifest.to_json())  # validated and normalised, as a receiver sees it
    chunks = [pack_chunk(ChunkHeader(manifest.transfer_id, i, len(pieces)), piece) for i, piece in enumerate(pieces)]
    return manifest, chunks


@dataclass
class CompletedTransfer:
    manifest: TransferManifest
    tensors: dict[str, np.ndarray]
    payload_bytes: int


@dataclass(frozen=True)
class _Spilled:
    """Where a chunk's data lies in its transfer's spool file."""

    offset: int
    length: int


@dataclass
class _Pieces:
    """Chunk data of one transfer received so far, keyed by index: in memory, or (once the reassembler's
    memory budget is spent) in an unnamed temporary file of this transfer, its spool."""

    transfer_id: str
    count: int
    last_activity: float
    data: dict[int, bytes | _Spilled] = field(default_factory=dict)
    nbytes: int = 0  # all chunk data received, in memory or spilled
    memory_bytes: int = 0  # the part held in memory
    spool: BinaryIO | None = None
    spool_end: int = 0

    def get(self, index: int) -> bytes | None:
        item = self.data.get(index)
        if isinstance(item, _Spilled):
            data = os.pread(self.spool.fileno(), item.length, item.offset)
            if len(data) != item.length:
                raise TransferError("chunk", f"spool of transfer {self.transfer_id} is truncated")
            return data
        return item

    def check(self, header: ChunkHeader, data: bytes) -> None:
        if header.count != self.count:
            reason = f"count {header.count} disagrees with {self.count} for transfer {self.transfer_id}"
            raise TransferError("chunk", reason)
        if header.index in self.data and self.get(header.index) != data:
            raise TransferError("chunk", f"index {header.index} received twice with different data")

    def store(self, index: int, data: bytes, now: float, spill_dir: Path | None = None) -> None:
        """Keep a checked chunk (in the spool when spill_dir is given); exact duplicates are no-ops (MQTT QoS 1
        is at-least-once)."""
        if index not in self.data:
            if spill_dir is None:
                self.data[index] = data
                self.memory_bytes += len(data)
            else:
                if self.spool is None:
                    self.spool = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115 (kept open; close() ends it)
                written = os.pwrite(self.spool.fileno(), data, self.spool_end)
                if written != len(data):
                    raise OSError(f"short write to the spool of transfer {self.transfer_id}")
                self.data[index] = _Spilled(self.spool_end, len(data))
                self.spool_end += len(data)
            self.nbytes += len(data)
        self.last_activity = now

    def close(self) -> None:
        """Release the chunk data (the spool file at once, the memory as soon as nothing refers to it)."""
        self.data = {}
        self.memory_bytes = 0
        if self.spool is not None:
            self.spool.close()
            self.spool = None


@dataclass
class _Transfer:
    manifest: TransferManifest
    pieces: _Pieces

    def verify(self, index: int, data: bytes) -> None:
        if sha256_hex(data) != self.manifest.chunk_sha256[index]:
            raise TransferError("chunk", f"sha256 of chunk {index} does not match the manifest")

    @property
    def complete(self) -> bool:
        return len(self.pieces.data) == self.manifest.chunk_count


class Reassembler:
    """Rebuilds transfers from manifests and chunks; pure (the caller passes `now`), not thread-safe.

    `stream` names the sender (a device id, or "global"); each stream has at most one transfer in
    flight and at most one set of chunks waiting for their manifest. Chunks normally arrive
    before their manifest (senders publish the manifest last), so up to max_payload_bytes of
    them are buffered per stream.

    Memory: with memory_budget_bytes and spill_dir, chunk data beyond memory_budget_bytes (over all streams)
    goes to an unnamed temporary file per transfer in spill_dir instead of memory. Many devices uploading at
    once interleave their chunks, and each one's must be kept until its manifest arrives: without a budget
    that is up to one payload per concurrent upload in memory; with one, it is the budget, whatever the
    number of uploads. A completed payload is read back whole (one payload at a time).
    """

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, timeout_s: float = 120.0,
                 memory_budget_bytes: int | None = None, spill_dir: str | Path | None = None) -> None:
        if (memory_budget_bytes is None) != (spill_dir is None):
            raise ValueError("memory_budget_bytes and spill_dir go together")
        self.max_payload_bytes = max_payload_bytes
        self.timeout_s = timeout_s
        self.memory_budget_bytes = memory_budget_bytes
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.peak_memory_bytes = 0  # the most chunk data held in memory at once
        self.spilled_bytes = 0  # chunk data written to spool files so far
        self._active: dict[str, _Transfer] = {}
        self._early: dict[str, _Pieces] = {}  # chunks whose manifest has not arrived yet
        self._finished: dict[str, str] = {}  # stream -> last completed transfer id, to ignore redeliveries

    def add_manifest(self, stream: str, manifest: TransferManifest, now: float) -> CompletedTransfer | None:
        if manifest.transfer_id == self._finished.get(stream):
            return None
        active = self._active.get(stream)
        if active is not None and active.manifest.transfer_id == manifest.transfer_id:
            if active.manifest != manifest:
                self._drop(stream)
                reason = f"transfer {manifest.transfer_id} announced twice with different manifests"
                raise TransferError("manifest", reason)
            return None
        early = self._early.get(stream)
        if early is not None and early.transfer_id == manifest.transfer_id:
            del self._early[stream]
        else:
            early = None
        if manifest.payload_bytes > self.max_payload_bytes:
            if early is not None:
                early.close()
            reason = f"{manifest.payload_bytes} exceeds the limit of {self.max_payload_bytes}"
            raise TransferError("payload_bytes", reason)
        if active is not None:
            log.info("stream %s: transfer %s replaced by %s before completing",
                     stream, active.manifest.transfer_id, manifest.transfer_id)
            active.pieces.close()
        if early is not None:
            transfer = self._active[stream] = _Transfer(manifest, early)
            self._adopt(stream, transfer, now)
        else:
            pieces = _Pieces(manifest.transfer_id, manifest.chunk_count, now)
            transfer = self._active[stream] = _Transfer(manifest, pieces)
        return self._finish_if_complete(stream, transfer)

    @property
    def memory_bytes(self) -> int:
        """Chunk data held in memory now, over all streams."""
        return (sum(t.pieces.memory_bytes for t in self._active.values())
                + sum(p.memory_bytes for p in self._early.values()))

    def _spill_dir_for(self, nbytes: int) -> Path | None:
        """None (keep it in memory) while the budget allows `nbytes` more, else the spill folder."""
        if self.spill_dir is None:
            return None
        held = self.memory_bytes
        if held + nbytes <= self.memory_budget_bytes:
            self.peak_memory_bytes = max(self.peak_memory_bytes, held + nbytes)
            return None
        self.spilled_bytes += nbytes
        return self.spill_dir

    def add_chunk(self, stream: str, data: bytes, now: float) -> CompletedTransfer | None:
        if not data:
            return None  # an empty retained publish clears a topic; it carries no chunk
        header, body = unpack_chunk(data)
        if header.transfer_id == self._finished.get(stream):
            return None
        transfer = self._active.get(stream)
        if transfer is None or transfer.manifest.transfer_id != header.transfer_id:
            self._buffer_early(stream, header, body, now)
            return None
        self._add_checked(stream, transfer, header, body, now)
        return self._finish_if_complete(stream, transfer)

    def expire(self, now: float) -> list[str]:
        """Drop transfers with no progress for timeout_s; returns their transfer ids."""
        stale_active = [s for s, t in self._active.items() if now - t.pieces.last_activity > self.timeout_s]
        stale_early = [s for s, p in self._early.items() if now - p.last_activity > self.timeout_s]
        dropped = []
        for stream in stale_active:
            transfer = self._active.pop(stream)
            transfer.pieces.close()
            dropped.append(transfer.manifest.transfer_id)
        for stream in stale_early:
            pieces = self._early.pop(stream)
            pieces.close()
            dropped.append(pieces.transfer_id)
        return dropped

    def _adopt(self, stream: str, transfer: _Transfer, now: float) -> None:
        """The transfer takes over the chunks that came before its manifest, each checked against it."""
        pieces = transfer.pieces
        try:
            if pieces.count != transfer.manifest.chunk_count:
                reason = (f"count {pieces.count} disagrees with {transfer.manifest.chunk_count} for transfer "
                          f"{pieces.transfer_id}")
                raise TransferError("chunk", reason)
            for index in sorted(pieces.data):
                transfer.verify(index, pieces.get(index))
        except TransferError:
            self._drop(stream)
            raise
        pieces.last_activity = now

    def _buffer_early(self, stream: str, header: ChunkHeader, body: bytes, now: float) -> None:
        early = self._early.get(stream)
        if early is None or early.transfer_id != header.transfer_id:
            if early is not None:
                log.info("stream %s: early chunks of %s replaced by %s", stream, early.transfer_id, header.transfer_id)
                early.close()
            early = self._early[stream] = _Pieces(header.transfer_id, header.count, now)
        try:
            early.check(header, body)
            if header.index not in early.data and early.nbytes + len(body) > self.max_payload_bytes:
                raise TransferError("chunk", f"more than {self.max_payload_bytes} bytes buffered before the manifest")
        except TransferError:
            del self._early[stream]
            early.close()
            raise
        early.store(header.index, body, now, self._spill_dir_for(len(body)))

    def _add_checked(self, stream: str, transfer: _Transfer, header: ChunkHeader, body: bytes, now: float) -> None:
        """Add a chunk; on a fault drop the whole transfer so a bad one can never complete."""
        pieces = transfer.pieces
        try:
            pieces.check(header, body)
            transfer.verify(header.index, body)
        except TransferError:
            self._drop(stream)
            raise
        if header.index in pieces.data:
            pieces.last_activity = now  # an exact duplicate (QoS 1 is at-least-once)
        else:
            pieces.store(header.index, body, now, self._spill_dir_for(len(body)))

    def _finish_if_complete(self, stream: str, transfer: _Transfer) -> CompletedTransfer | None:
        if not transfer.complete:
            return None
        del self._active[stream]
        try:
            result = _assemble(transfer)
        finally:
            transfer.pieces.close()
        self._finished[stream] = transfer.manifest.transfer_id
        return result

    def _drop(self, stream: str) -> None:
        transfer = self._active.pop(stream, None)
        if transfer is not None:
            transfer.pieces.close()


def _assemble(transfer: _Transfer) -> CompletedTransfer:
    manifest = transfer.manifest
    payload = b"".join(transfer.pieces.get(i) for i in range(manifest.chunk_count))
    if len(payload) != manifest.payload_bytes or sha256_hex(payload) != manifest.payload_sha256:
        raise TransferError("payload_sha256", f"reassembled payload of transfer {manifest.transfer_id} does not match")
    tensors = decode_tensors(payload)
    received = tensor_specs(tensors)
    announced = sorted(manifest.tensors, key=lambda spec: spec.name)
    if received != announced:
        raise TransferError("tensors", f"payload holds {received}, manifest announced {announced}")
    return CompletedTransfer(manifest, tensors, len(payload))
