"""Chunked transfers: header layout, reassembly, and every fault the wire can produce."""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np
import pytest

from fedwire.chunking import (
    CHUNK_HEADER_BYTES,
    DEFAULT_MAX_CHUNK_BYTES,
    ChunkHeader,
    CompletedTransfer,
    Reassembler,
    build_transfer,
    pack_chunk,
    unpack_chunk,
)
from fedwire.codec import sha256_hex
from fedwire.errors import ProtocolError, TransferError
from fedwire.messages import TensorSpec, TransferManifest

SMALL_CHUNK = 1024


def _tensors(scale: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((64 * scale, 33)).astype(np.float32),
        "h": rng.standard_normal(257).astype(np.float16),
        "n": rng.integers(-(2**40), 2**40, size=(31,), dtype=np.int64),
    }


def _transfer(max_chunk_bytes: int = SMALL_CHUNK, **kwargs) -> tuple[TransferManifest, list[bytes]]:
    return build_transfer("update", "dev-1", 3, 2, _tensors(), num_samples=40, max_chunk_bytes=max_chunk_bytes,
                          **kwargs)


def _feed(reassembler: Reassembler, manifest: TransferManifest, chunks: list[bytes], manifest_at: int = 0,
          now: float = 0.0) -> list[CompletedTransfer]:
    """Deliver chunks with the manifest inserted at position `manifest_at`; collect completions."""
    done = []
    for position, chunk in enumerate(chunks):
        if position == manifest_at:
            done.append(reassembler.add_manifest("dev-1", manifest, now))
        done.append(reassembler.add_chunk("dev-1", chunk, now))
    if manifest_at >= len(chunks):
        done.append(reassembler.add_manifest("dev-1", manifest, now))
    return [d for d in done if d is not None]


def _assert_exact(tensors: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(tensors) == sorted(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype and tensors[name].shape == array.shape
        assert tensors[name].tobytes() == array.tobytes()


def _with_data(chunk: bytes, data: bytes) -> bytes:
    return chunk[:CHUNK_HEADER_BYTES] + data


# -- building -----------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_bytes", [CHUNK_HEADER_BYTES + 1, 100, SMALL_CHUNK, 4096, DEFAULT_MAX_CHUNK_BYTES])
def test_round_trip_is_exact_and_every_chunk_fits(max_chunk_bytes):
    manifest, chunks = _transfer(max_chunk_bytes)
    assert all(len(chunk) <= max_chunk_bytes for chunk in chunks)
    assert len(chunks) == manifest.chunk_count
    assert sum(len(c) - CHUNK_HEADER_BYTES for c in chunks) == manifest.payload_bytes
    [done] = _feed(Reassembler(), manifest, chunks, manifest_at=len(chunks))
    _assert_exact(done.tensors, _tensors())
    assert done.manifest == manifest and done.payload_bytes == manifest.payload_bytes


def test_manifest_describes_the_transfer():
    manifest, chunks = _transfer(metrics={"train_loss": np.float32(0.5)})
    assert manifest.kind == "update" and manifest.sender == "dev-1"
    assert (manifest.round, manifest.model_version, manifest.num_samples) == (3, 2, 40)
    assert manifest.tensors == [TensorSpec("h", (257,), "F16"), TensorSpec("n", (31,), "I64"),
                                TensorSpec("w", (64, 33), "F32")]
    assert manifest.chunk_size == SMALL_CHUNK - CHUNK_HEADER_BYTES
    assert manifest.metrics == {"train_loss": 0.5} and type(manifest.metrics["train_loss"]) is float
    assert TransferManifest.from_json(manifest.to_json()) == manifest
    assert _transfer()[0].transfer_id != manifest.transfer_id


def test_chunk_header_layout():
    manifest, chunks = _transfer()
    for index, chunk in enumerate(chunks):
        magic, raw_id, chunk_index, count = struct.unpack(">4s16sII", chunk[:28])
        assert magic == b"FWC1"
        assert raw_id.hex() == manifest.transfer_id
        assert (chunk_index, count) == (index, len(chunks))
    header, data = unpack_chunk(chunks[1])
    assert header == ChunkHeader(manifest.transfer_id, 1, len(chunks))
    assert pack_chunk(header, data) == chunks[1]


def test_chunk_size_too_small_for_the_header_is_refused():
    with pytest.raises(ProtocolError, match="max_chunk_bytes"):
        _transfer(CHUNK_HEADER_BYTES)


def test_invalid_manifest_fields_are_refused_at_build_time():
    with pytest.raises(ProtocolError, match="sender"):
        build_transfer("update", "bad/id", 0, 0, _tensors())
    with pytest.raises(ProtocolError, match="round"):
        build_transfer("update", "dev-1", -1, 0, _tensors())


# -- orderings ------------------------------------------------------------------


@pytest.mark.parametrize("manifest_at", [0, 5, "last"])
def test_reordered_chunks_still_reassemble_exactly(manifest_at):
    manifest, chunks = _transfer()
    shuffled = chunks[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != chunks
    position = len(chunks) if manifest_at == "last" else manifest_at
    [done] = _feed(Reassembler(), manifest, shuffled, manifest_at=position)
    _assert_exact(done.tensors, _tensors())


def test_streams_are_independent():
    reassembler = Reassembler()
    first, first_chunks = _transfer()
    second, second_chunks = _transfer()
    done = []
    for a, b in zip(first_chunks, second_chunks):
        done += [reassembler.add_chunk("dev-1", a, 0.0), reassembler.add_chunk("dev-2", b, 0.0)]
    done += [reassembler.add_manifest("dev-2", second, 0.0), reassembler.add_manifest("dev-1", first, 0.0)]
    completed = [d for d in done if d is not None]
    assert [c.manifest.transfer_id for c in completed] == [second.transfer_id, first.transfer_id]


# -- faults -------------------------------------------------------------------


def test_missing_chunk_never_completes_and_expires():
    manifest, chunks = _transfer()
    reassembler = Reassembler(timeout_s=10.0)
    assert _feed(reassembler, manifest, chunks[:3] + chunks[4:], now=100.0) == []
    assert reassembler.expire(105.0) == []
    assert reassembler.expire(111.0) == [manifest.transfer_id]
    assert reassembler.add_chunk("dev-1", chunks[3], 112.0) is None  # too late: the transfer is gone


def test_expiry_counts_from_the_last_progress():
    manifest, chunks = _transfer()
    reassembler = Reassembler(timeout_s=10.0)
    reassembler.add_manifest("dev-1", manifest, 0.0)
    for step, chunk in enumerate(chunks[:-1]):
        reassembler.add_chunk("dev-1", chunk, 8.0 * step)
        assert reassembler.expire(8.0 * step + 9.0) == []
    assert reassembler.add_chunk("dev-1", chunks[-1], 8.0 * len(chunks)) is not None


def test_early_chunks_without_manifest_expire():
    _, chunks = _transfer()
    reassembler = Reassembler(timeout_s=10.0)
    reassembler.add_chunk("dev-1", chunks[0], 0.0)
    assert reassembler.expire(11.0) == [unpack_chunk(chunks[0])[0].transfer_id]


def test_identical_duplicate_chunks_are_ignored():
    manifest, chunks = _transfer()
    doubled = [chunk for chunk in chunks for _ in range(2)]
    reassembler = Reassembler()
    [done] = _feed(reassembler, manifest, doubled, manifest_at=4)
    _assert_exact(done.tensors, _tensors())
    # QoS 1 redelivery after completion is ignored, not restarted.
    assert reassembler.add_chunk("dev-1", chunks[0], 1.0) is None
    assert reassembler.add_manifest("dev-1", manifest, 1.0) is None
    assert reassembler.expire(1e9) == []


@pytest.mark.parametrize("manifest_first", [True, False])
def test_conflicting_duplicate_chunk_is_a_transfer_error(manifest_first):
    manifest, chunks = _transfer()
    header, data = unpack_chunk(chunks[2])
    conflicting = _with_data(chunks[2], bytes([data[0] ^ 1]) + data[1:])
    reassembler = Reassembler()
    if manifest_first:
        reassembler.add_manifest("dev-1", manifest, 0.0)
    reassembler.add_chunk("dev-1", chunks[2], 0.0)
    with pytest.raises(TransferError, match="index 2"):
        reassembler.add_chunk("dev-1", conflicting, 0.0)


def test_corrupted_chunk_is_a_transfer_error_and_never_yields_a_model():
    manifest, chunks = _transfer()
    header, data = unpack_chunk(chunks[1])
    corrupted = _with_data(chunks[1], data[:-1] + bytes([data[-1] ^ 0x80]))
    reassembler = Reassembler()
    reassembler.add_manifest("dev-1", manifest, 0.0)
    reassembler.add_chunk("dev-1", chunks[0], 0.0)
    with pytest.raises(TransferError, match="sha256"):
        reassembler.add_chunk("dev-1", corrupted, 0.0)
    # The transfer was dropped: the remaining good chunks cannot complete it.
    assert [reassembler.add_chunk("dev-1", chunk, 0.0) for chunk in chunks] == [None] * len(chunks)


def test_corrupted_chunk_before_manifest_fails_when_the_manifest_arrives():
    manifest, chunks = _transfer()
    header, data = unpack_chunk(chunks[0])
    reassembler = Reassembler()
    reassembler.add_chunk("dev-1", _with_data(chunks[0], data[:-1] + b"\x00"), 0.0)
    for chunk in chunks[1:]:
        reassembler.add_chunk("dev-1", chunk, 0.0)
    with pytest.raises(TransferError, match="chunk 0"):
        reassembler.add_manifest("dev-1", manifest, 0.0)


def test_truncated_chunk_data_is_a_transfer_error():
    manifest, chunks = _transfer()
    reassembler = Reassembler()
    reassembler.add_manifest("dev-1", manifest, 0.0)
    with pytest.raises(TransferError):
        reassembler.add_chunk("dev-1", chunks[0][:-10], 0.0)


@pytest.mark.parametrize("mangle", [
    lambda c: c[:CHUNK_HEADER_BYTES - 1],                                  # shorter than the header
    lambda c: b"XXXX" + c[4:],                                             # bad magic
    lambda c: c[:20] + struct.pack(">II", 9, 9) + c[28:],                  # index == count
    lambda c: c[:20] + struct.pack(">II", 0, 0) + c[28:],                  # zero chunks
])
def test_malformed_chunk_header_is_a_transfer_error(mangle):
    _, chunks = _transfer()
    with pytest.raises(TransferError):
        Reassembler().add_chunk("dev-1", mangle(chunks[0]), 0.0)


def test_chunk_count_disagreeing_with_manifest_is_a_transfer_error():
    manifest, chunks = _transfer()
    header, data = unpack_chunk(chunks[0])
    lying = pack_chunk(dataclasses.replace(header, count=header.count + 1), data)
    reassembler = Reassembler()
    reassembler.add_manifest("dev-1", manifest, 0.0)
    with pytest.raises(TransferError, match="count"):
        reassembler.add_chunk("dev-1", lying, 0.0)


def test_payload_larger_than_the_limit_is_rejected_at_the_manifest():
    manifest, chunks = _transfer()
    reassembler = Reassembler(max_payload_bytes=manifest.payload_bytes - 1)
    reassembler.add_chunk("dev-1", chunks[0], 0.0)  # chunks come first and are buffered
    with pytest.raises(TransferError) as info:
        reassembler.add_manifest("dev-1", manifest, 0.0)
    assert info.value.field == "payload_bytes"
    assert reassembler.expire(1e9) == []  # nothing of the refused transfer is kept


def test_chunks_before_manifest_are_buffered_but_bounded():
    manifest, chunks = _transfer()
    reassembler = Reassembler(max_payload_bytes=3 * manifest.chunk_size)
    for chunk in chunks[:3]:
        assert reassembler.add_chunk("dev-1", chunk, 0.0) is None
    with pytest.raises(TransferError, match="before the manifest"):
        reassembler.add_chunk("dev-1", chunks[3], 0.0)
    assert reassembler.expire(1e9) == []  # the buffer was released


def test_new_manifest_replaces_an_unfinished_transfer():
    old, old_chunks = _transfer()
    new, new_chunks = _transfer()
    reassembler = Reassembler()
    reassembler.add_manifest("dev-1", old, 0.0)
    reassembler.add_chunk("dev-1", old_chunks[0], 0.0)
    reassembler.add_manifest("dev-1", new, 0.0)
    assert all(reassembler.add_chunk("dev-1", chunk, 0.0) is None for chunk in old_chunks[1:])
    [done] = [d for d in (reassembler.add_chunk("dev-1", c, 0.0) for c in new_chunks) if d is not None]
    assert done.manifest.transfer_id == new.transfer_id


def test_same_transfer_id_with_a_different_manifest_is_a_transfer_error():
    manifest, _ = _transfer()
    reassembler = Reassembler()
    reassembler.add_manifest("dev-1", manifest, 0.0)
    with pytest.raises(TransferError, match="different manifests"):
        reassembler.add_manifest("dev-1", dataclasses.replace(manifest, num_samples=41), 0.0)


def test_manifest_tensor_list_disagreeing_with_payload_is_a_transfer_error():
    manifest, chunks = _transfer()
    for lie in (
        [TensorSpec("h", (257,), "F16"), TensorSpec("n", (31,), "I64"), TensorSpec("w", (33, 64), "F32")],
        [TensorSpec("h", (257,), "F32"), TensorSpec("n", (31,), "I64"), TensorSpec("w", (64, 33), "F32")],
        [TensorSpec("n", (31,), "I64"), TensorSpec("w", (64, 33), "F32")],
    ):
        with pytest.raises(TransferError) as info:
            _feed(Reassembler(), dataclasses.replace(manifest, tensors=lie), chunks)
        assert info.value.field == "tensors"


def test_payload_hash_mismatch_is_a_transfer_error():
    manifest, chunks = _transfer()
    lying = dataclasses.replace(manifest, payload_sha256="0" * 64)
    with pytest.raises(TransferError, match="payload"):
        _feed(Reassembler(), lying, chunks)


def test_chunks_that_are_not_safetensors_are_a_transfer_error():
    manifest, _ = _transfer()
    junk = b"\xff" * 100
    chunk = pack_chunk(ChunkHeader(manifest.transfer_id, 0, 1), junk)
    lying = dataclasses.replace(manifest, payload_bytes=100, chunk_size=100,
                                payload_sha256=sha256_hex(junk), chunk_sha256=[sha256_hex(junk)])
    with pytest.raises(TransferError, match="safetensors"):
        _feed(Reassembler(), lying, [chunk])


def test_empty_payload_is_a_cleared_retained_topic_and_ignored():
    assert Reassembler().add_chunk("global", b"", 0.0) is None


def test_interleaved_uploads_beyond_the_memory_budget_spill_to_disk_and_stay_exact(tmp_path):
    """Many senders at once, manifests last (as publish_transfer sends them): everything before a manifest
    must be kept. Memory holds at most the budget; the rest goes to unnamed spool files, and every
    transfer still reassembles bit for bit."""
    senders = 12
    transfers = {f"dev-{i}": build_transfer("update", f"dev-{i}", 3, 2, _tensors(scale=i + 1), num_samples=i + 1,
                                            max_chunk_bytes=SMALL_CHUNK) for i in range(senders)}
    budget = 6 * SMALL_CHUNK
    reassembler = Reassembler(memory_budget_bytes=budget, spill_dir=tmp_path)
    queues = {dev: list(chunks) for dev, (_, chunks) in transfers.items()}
    done = {}
    while queues:  # round robin: every sender's chunks interleaved with everyone else's
        for dev in list(queues):
            if queues[dev]:
                assert reassembler.add_chunk(dev, queues[dev].pop(0), 0.0) is None
                assert reassembler.memory_bytes <= budget
            else:
                del queues[dev]
                done[dev] = reassembler.add_manifest(dev, transfers[dev][0], 0.0)
    total = sum(len(chunk) - CHUNK_HEADER_BYTES for _, chunks in transfers.values() for chunk in chunks)
    assert reassembler.peak_memory_bytes <= budget
    assert reassembler.spilled_bytes > total // 2  # most of it: memory frees only as transfers complete
    for i in range(senders):
        _assert_exact(done[f"dev-{i}"].tensors, _tensors(scale=i + 1))
    assert reassembler.memory_bytes == 0
    assert list(tmp_path.iterdir()) == []  # spool files have no name and are closed once used


def test_a_spilled_transfer_that_fails_or_expires_leaves_nothing_behind(tmp_path):
    manifest, chunks = _transfer()
    reassembler = Reassembler(memory_budget_bytes=SMALL_CHUNK, spill_dir=tmp_path)
    _, data = unpack_chunk(chunks[3])
    for chunk in chunks[:3] + [_with_data(chunks[3], data[:-1] + bytes([data[-1] ^ 1]))] + chunks[4:]:
        reassembler.add_chunk("dev-1", chunk, 0.0)
    assert reassembler.spilled_bytes > 0
    with pytest.raises(TransferError, match="chunk 3"):  # checked against the manifest when it arrives
        reassembler.add_manifest("dev-1", manifest, 0.0)
    assert reassembler.memory_bytes == 0
    other, other_chunks = _transfer()
    for chunk in other_chunks[:-1]:
        reassembler.add_chunk("dev-2", chunk, 0.0)
    assert reassembler.expire(1e9) == [other.transfer_id]
    assert reassembler.memory_bytes == 0 and list(tmp_path.iterdir()) == []


def test_memory_budget_needs_a_spill_folder():
    with pytest.raises(ValueError):
        Reassembler(memory_budget_bytes=1 << 20)
