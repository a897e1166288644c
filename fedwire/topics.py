"""MQTT topic names of the FaceFed protocol and their parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ProtocolError

DEVICE_ID_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_DEVICE_ID = re.compile(DEVICE_ID_RE)
# Canonical decimal only, so every chunk has exactly one topic name.
_CHUNK_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
MAX_CHUNK_INDEX = 2**32 - 1  # the chunk header stores indices as u32
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")


def validate_device_id(device_id: object, field: str = "device_id") -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(field, f"{device_id!r} is not a device id (expected {DEVICE_ID_RE})")
    return device_id


def _parse_chunk_index(text: str) -> int:
    if not _CHUNK_INDEX.fullmatch(text) or int(text) > MAX_CHUNK_INDEX:
        raise ProtocolError("topic", f"{text!r} is not a chunk index")
    return int(text)


@dataclass(frozen=True)
class ParsedTopic:
    kind: str
    device_id: str | None = None
    chunk_index: int | None = None


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (one prefix = one federation)."""

    prefix: str = "facefed"

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not all(_PREFIX_LEVEL.fullmatch(level) for level in levels):
            raise ProtocolError("prefix", f"{self.prefix!r} must be non-empty '/'-separated levels of [A-Za-z0-9_.-]")

    @property
    def round(self) -> str:
        return f"{self.prefix}/round"

    @property
    def global_manifest(self) -> str:
        return f"{self.prefix}/global/manifest"

    def global_chunk(self, index: int) -> str:
        return f"{self.prefix}/global/chunk/{index}"

    @property
    def global_full_manifest(self) -> str:
        """Where the full global model stays retained while the global topics carry a delta (PROTOCOL.md 5.2)."""
        return f"{self.prefix}/global/full/manifest"

    def global_full_chunk(self, index: int | str) -> str:
        return f"{self.prefix}/global/full/chunk/{index}"

    def update_manifest(self, device_id: str) -> str:
        return f"{self.prefix}/update/{validate_device_id(device_id)}/manifest"

    def update_chunk(self, device_id: str, index: int) -> str:
        return f"{self.prefix}/update/{validate_device_id(device_id)}/chunk/{index}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/status/{validate_device_id(device_id)}"

    def ack(self, device_id: str) -> str:
        return f"{self.prefix}/ack/{validate_device_id(device_id)}"

    @property
    def round_summary(self) -> str:
        return f"{self.prefix}/summary"

    def aggregator_subscriptions(self) -> list[str]:
        p = self.prefix
        return [f"{p}/update/+/manifest", f"{p}/update/+/chunk/+", f"{p}/status/+"]

    def agent_subscriptions(self, device_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}/round", f"{p}/global/manifest", f"{p}/global/chunk/+", self.ack(device_id)]

    def parse(self, topic: str) -> ParsedTopic:
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError("topic", f"{topic!r} is not under prefix {self.prefix!r}")
        match topic[len(head):].split("/"):
            case ["round"]:
                return ParsedTopic("round")
            case ["summary"]:
                return ParsedTopic("summary")
            case ["global", "manifest"]:
                return ParsedTopic("global_manifest")
            case ["global", "chunk", index]:
                return ParsedTopic("global_chunk", chunk_index=_parse_chunk_index(index))
            case ["update", device, "manifest"]:
                return ParsedTopic("update_manifest", validate_device_id(device, "topic"))
            case ["update", device, "chunk", index]:
                return ParsedTopic("update_chunk", validate_device_id(device, "topic"), _parse_chunk_index(index))
            case ["status", device]:
                return ParsedTopic("status", validate_device_id(device, "topic"))
            case ["ack", device]:
                return ParsedTopic("ack", validate_device_id(device, "topic"))
        raise ProtocolError("topic", f"{topic!r} is not a FaceFed topic")


# MQTT 5 shared subscriptions: "$share/{group}/{filter}" hands each matching message to one member of the group.
SHARE_PREFIX = "$share/"
SHARE_GROUP = "facefed-aggregators"  # the sharded aggregator's workers (aggregator/sharded.py)


@dataclass(frozen=True)
class ShardTopics:
    """The topics between workers and reducer, under the federation prefix."""

    prefix: str

    @property
    def close(self) -> str:
        return f"{self.prefix}/shard/close"

    def accepted(self, worker: int) -> str:
        return f"{self.prefix}/shard/accepted/{worker}"

    def worker_status(self, worker: int) -> str:
        return f"{self.prefix}/shard/worker/{worker}"

    def report(self, worker: int) -> str:
        return f"{self.prefix}/shard/report/{worker}"

    def partial_manifest(self, worker: int) -> str:
        return f"{self.prefix}/shard/partial/{worker}/manifest"

    def partial_chunk(self, worker: int, index: int) -> str:
        return f"{self.prefix}/shard/partial/{worker}/chunk/{index}"

    def route(self, worker: int, update_topic: str) -> str:
        """Where a worker forwards another owner's update message: the same topic under shard/route/{owner}."""
        return f"{self.prefix}/shard/route/{worker}/{update_topic[len(self.prefix) + 1:]}"

    def unroute(self, topic: str, worker: int) -> str | None:
        """The device's original topic of a message forwarded to `worker`, or None."""
        head = f"{self.prefix}/shard/route/{worker}/"
        return f"{self.prefix}/{topic[len(head):]}" if topic.startswith(head) else None

    def parse(self, topic: str) -> tuple[str, int] | None:
        """(kind, worker) of a reducer-side topic: accepted, report, partial_manifest, partial_chunk."""
        head = f"{self.prefix}/shard/"
        if not topic.startswith(head):
            return None
        match topic[len(head):].split("/"):
            case ["worker", w] if w.isdigit():
                return "worker", int(w)
            case ["accepted", w] if w.isdigit():
                return "accepted", int(w)
            case ["report", w] if w.isdigit():
                return "report", int(w)
            case ["partial", w, "manifest"] if w.isdigit():
                return "partial_manifest", int(w)
            case ["partial", w, "chunk", i] if w.isdigit() and i.isdigit():
                return "partial_chunk", int(w)
        return None

    def worker_subscriptions(self, worker: int) -> list[str]:
        p = self.prefix
        shared = f"{SHARE_PREFIX}{SHARE_GROUP}/{p}/update/+"
        routed = f"{p}/shard/route/{worker}/update/+"
        return [f"{shared}/manifest", f"{shared}/chunk/+", f"{routed}/manifest", f"{routed}/chunk/+",
                f"{p}/round", f"{p}/global/manifest", f"{p}/global/chunk/+", self.close]

    def reducer_subscriptions(self) -> list[str]:
        p = self.prefix
        return [f"{p}/status/+", f"{p}/shard/worker/+", f"{p}/shard/accepted/+", f"{p}/shard/report/+",
                f"{p}/shard/partial/+/manifest", f"{p}/shard/partial/+/chunk/+"]
