"""What one device may send the aggregator in a round: a budget of messages, bytes and update transfers,
and the devices whose certificates were revoked. Pure book-keeping (no I/O, no MQTT), safe to call from
the MQTT network thread: the aggregator asks before it parses or queues anything, so a flooding device
costs a dictionary lookup per message and its messages never stand in the queue in front of the honest
devices' updates.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedwire.chunking import CHUNK_HEADER_BYTES, CHUNK_MAGIC

STATUS_MESSAGES = 64  # statuses and spare manifests a device may send in a round beyond its transfers' messages
SPARE_BYTES = 1 << 20  # manifests and statuses, beyond the transfers' chunk bytes


@dataclass(frozen=True)
class BudgetLimits:
    """Per device and round."""

    messages: int
    bytes: int
    transfers: int  # distinct update transfers (transfer ids in chunk headers)

    @classmethod
    def derive(cls, update_bytes: int, chunk_bytes: int, transfers: int, messages: int | None = None,
               max_bytes: int | None = None) -> BudgetLimits:
        """Limits that an honest device stays well inside: `transfers` uploads of a whole float32 update
        (`update_bytes`) in chunks of at most `chunk_bytes`, each with its manifest, plus statuses."""
        chunks = math.ceil(update_bytes / max(chunk_bytes - CHUNK_HEADER_BYTES, 1))
        derived_messages = transfers * (chunks + 1) + STATUS_MESSAGES
        derived_bytes = transfers * (update_bytes + chunks * CHUNK_HEADER_BYTES) + SPARE_BYTES
        return cls(messages if messages is not None else derived_messages,
                   max_bytes if max_bytes is not None else derived_bytes, transfers)


@dataclass
class _Spent:
    messages: int = 0
    bytes: int = 0
    transfers: set[bytes] = field(default_factory=set)
    over: str | None = None  # why the device is dropped for the rest of the round
    dropped: int = 0  # messages dropped since


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str = ""
    first_drop: bool = False  # the first message dropped for this reason in this round: log it


ADMITTED = Verdict(True)


class DeviceBudget:
    """Counts what each device sent in the current round. A device over any limit is dropped for the rest
    of the round (all its messages, so it cannot finish a half-sent transfer either); a revoked device
    always."""

    def __init__(self, limits: BudgetLimits, revoked: Iterable[str] = ()) -> None:
        self.limits = limits
        self._revoked = frozenset(revoked)
        self._spent: dict[str, _Spent] = {}
        self._revoked_dropped: dict[str, int] = {}
        self._lock = threading.Lock()  # admit() runs on the network thread, the rest on the service's

    @property
    def revoked(self) -> frozenset[str]:
        return self._revoked

    def set_revoked(self, device_ids: Iterable[str]) -> None:
        self._revoked = frozenset(device_ids)

    def admit(self, device_id: str, payload: bytes) -> Verdict:
        if device_id in self._revoked:
            with self._lock:
                count = self._revoked_dropped[device_id] = self._revoked_dropped.get(device_id, 0) + 1
            return Verdict(False, f"{device_id}'s certificate is revoked", count == 1)
        with self._lock:
            spent = self._spent.setdefault(device_id, _Spent())
            if spent.over is None:
                spent.messages += 1
                spent.bytes += len(payload)
                if payload[:len(CHUNK_MAGIC)] == CHUNK_MAGIC:
                    spent.transfers.add(payload[len(CHUNK_MAGIC):len(CHUNK_MAGIC) + 16])
                spent.over = self._over(spent)
                if spent.over is None:
                    return ADMITTED
            spent.dropped += 1
            return Verdict(False, spent.over, spent.dropped == 1)

    def _over(self, spent: _Spent) -> str | None:
        limits = self.limits
        if spent.messages > limits.messages:
            return f"over its budget of {limits.messages} messages this round"
        if spent.bytes > limits.bytes:
            return f"over its budget of {limits.bytes} bytes this round"
        if len(spent.transfers) > limits.transfers:
            return f"over its budget of {limits.transfers} update transfers this round"
        return None

    def new_round(self) -> dict[str, tuple[str, int]]:
        """Start counting afresh; returns device -> (reason, messages dropped) of the round that ended."""
        with self._lock:
            dropped = {d: (s.over, s.dropped) for d, s in self._spent.items() if s.over is not None}
            dropped.update({d: (f"{d}'s certificate is revoked", n) for d, n in self._revoked_dropped.items()})
            self._spent.clear()
            self._revoked_dropped.clear()
        return dropped


def sender(prefix: str, topic: str) -> str | None:
    """The device id of `{prefix}/update/{dev}/...` or `{prefix}/status/{dev}`; None for other topics.
    No validation: the topic parser does that later, for the messages admitted."""
    if not topic.startswith(prefix) or topic[len(prefix):len(prefix) + 1] != "/":
        return None
    parts = topic[len(prefix) + 1:].split("/", 2)
    if len(parts) >= 2 and parts[0] in ("update", "status"):
        return parts[1]
    return None
