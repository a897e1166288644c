"""What the dashboard knows about the fleet, built only from what the fleet already publishes.

`FleetState` is fed parsed wire messages (fedwire.messages) and rounds.jsonl entries and answers
with plain JSON-able dicts for the API and the page. It does no I/O; `feed.py` brings the messages.
One lock guards it: the MQTT thread and the log tailer write, the web server reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from fedwire.messages import DeviceStatus, RoundAnnouncement, RoundSummary, TransferManifest, UpdateAck

DEVICE_EVENTS_KEPT = 100  # per device: its accepted and refused uploads, newest last
ROUND_REFUSALS_KEPT = 200  # refused uploads listed for the current round
REPORTED_REFUSALS_KEPT = 10  # signature / freshness refusals a device reported in its status
# An agent reports a message it refused (bad or missing signature, stale announcement) in its status detail
# starting with this word (edge_agent/agent.py), and a round its training window made it skip with the other.
REFUSAL_DETAIL = "refused "
SKIPPED_DETAIL = "skipped round: "
ROUND_STATES = {"open": "training", "statistics": "statistics", "finished": "finished"}


@dataclass
class DeviceView:
    device_id: str
    state: str = "unknown"  # DeviceStatus.state; "unknown" until its first status arrives
    status_round: int | None = None
    last_seen: float | None = None  # the device's own timestamp of its latest status
    detail: str = ""
    profile: str = ""  # optional DeviceStatus fields (PROTOCOL.md 4.3); "" / None from older agents
    model_version: int | None = None
    train_window: str = ""  # "open", or why the device may not train now
    last_contributed: int | None = None  # the latest round that accepted its update
    last_refusal: str = ""  # the aggregator's reason, from the device's latest refused ack
    last_refusal_round: int | None = None
    reported_refusals: list[str] = field(default_factory=list)  # what the device itself refused
    events: deque = field(default_factory=lambda: deque(maxlen=DEVICE_EVENTS_KEPT))

    @property
    def online(self) -> bool:
        return self.state not in ("offline", "unknown")

    def summary(self) -> dict[str, Any]:
        """Everything but the upload events (the device page's), as plain values."""
        view = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "events"}
        view["reported_refusals"] = list(self.reported_refusals)
        view["online"] = self.online
        return view


@dataclass
class CurrentRound:
    number: int
    model_version: int
    phase: str  # announcement state: open | statistics | finished
    deadline: float
    quorum: int
    participants: list[str]
    announced: float  # when the dashboard saw the announcement (the aggregator's clock is not on the wire)
    accepted: dict[str, float] = field(default_factory=dict)  # device -> time of its accepted ack
    refused: deque = field(default_factory=lambda: deque(maxlen=ROUND_REFUSALS_KEPT))
    refused_count: int = 0
    update_bytes: dict[str, int] = field(default_factory=dict)  # transfer id -> payload bytes of update manifests

    def state(self, now: float) -> str:
        """training / statistics while collecting; closing once quorum or deadline is reached."""
        if self.phase == "finished":
            return "finished"
        if len(self.accepted) >= self.quorum or now >= self.deadline:
            return "closing"
        return ROUND_STATES[self.phase]


class FleetState:
    def __init__(self, key_fingerprint: str = "") -> None:
        """key_fingerprint: of the aggregator's signing key, shown with every model version signed by it
        ("" when the dashboard has no key: versions then show only whether they were signed)."""
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change; the event stream sends a snapshot when it moves
        self.key_fingerprint = key_fingerprint
        self.devices: dict[str, DeviceView] = {}
        self.current: CurrentRound | None = None
        self.rounds: dict[int, dict[str, Any]] = {}  # round -> rounds.jsonl entry (or summary until logged)
        self.models: dict[int, dict[str, Any]] = {}  # model version -> hash, codec, signature
        self.connected = False

    # ---- writers -----------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1

    def _device(self, device_id: str) -> DeviceView:
        view = self.devices.get(device_id)
        if view is None:
            view = self.devices[device_id] = DeviceView(device_id)
        return view

    def set_connected(self, connected: bool) -> None:
        with self._lock:
            self.connected = connected
            self._bump()

    def on_status(self, status: DeviceStatus) -> None:
        with self._lock:
            view = self._device(status.device_id)
            view.state, view.status_round, view.last_seen = status.state, status.round, status.timestamp
            view.detail = status.detail
            view.profile = status.profile or view.profile
            if status.model_version is not None:
                view.model_version = status.model_version
            if status.train_window:
                view.train_window = status.train_window
            elif status.detail.startswith(SKIPPED_DETAIL):
                view.train_window = status.detail[len(SKIPPED_DETAIL):]
            if status.detail.startswith(REFUSAL_DETAIL) and status.detail not in view.reported_refusals:
                view.reported_refusals = (view.reported_refusals + [status.detail])[-REPORTED_REFUSALS_KEPT:]
            self._bump()

    def on_announcement(self, ann: RoundAnnouncement, now: float) -> None:
        with self._lock:
            current = self.current
            same = current is not None and (current.number, current.phase) == (ann.round, ann.state)
            if same:  # announced again (a restart, a redelivery): same round, what was counted stays
                current.deadline, current.quorum, current.participants = ann.deadline, ann.min_clients, ann.participants
            else:
                self.current = CurrentRound(ann.round, ann.model_version, ann.state, ann.deadline, ann.min_clients,
                                            list(ann.participants), now)
            self._bump()

    def on_ack(self, ack: UpdateAck, now: float) -> None:
        with self._lock:
            view = self._device(ack.device_id)
            current = self.current
            in_round = current is not None and ack.round == current.number
            if ack.accepted:
                view.last_contributed = max(ack.round, view.last_contributed or 0)
                if in_round:
                    current.accepted.setdefault(ack.device_id, now)
            else:
                view.last_refusal, view.last_refusal_round = ack.reason, ack.round
                if in_round:
                    current.refused.append({"device_id": ack.device_id, "reason": ack.reason, "time": now})
                    current.refused_count += 1
            if not view.events or view.events[-1]["transfer_id"] != ack.transfer_id \
                    or view.events[-1]["accepted"] != ack.accepted:
                view.events.append({"round": ack.round, "transfer_id": ack.transfer_id, "accepted": ack.accepted,
                                    "reason": ack.reason, "time": now})
            self._bump()

    def on_update_manifest(self, manifest: TransferManifest) -> None:
        with self._lock:
            current = self.current
            if current is not None and manifest.round == current.number:
                current.update_bytes[manifest.transfer_id] = manifest.payload_bytes
                self._bump()

    def on_global_manifest(self, manifest: TransferManifest, signed_by_key: bool | None, now: float) -> None:
        """signed_by_key: the signature verified with the dashboard's key (None: no key to check with)."""
        with self._lock:
            model = self.models.setdefault(manifest.model_version, {"model_version": manifest.model_version,
                                                                    "first_seen": now})
            model.update({
                # A delta or patch names the rebuilt model's hash; a full model's payload is the model.
                "sha256": manifest.model_sha256 or manifest.payload_sha256,
                "codec": manifest.codec,
                "payload_bytes": manifest.payload_bytes,
                "signed": bool(manifest.signature),
                "signature_valid": signed_by_key,
                "key_fingerprint": self.key_fingerprint if signed_by_key else "",
            })
            self._bump()

    def on_summary(self, summary: RoundSummary) -> None:
        with self._lock:
            entry = self.rounds.get(summary.round)
            if entry is None:  # rounds.jsonl has more (rejected count, time); it replaces this when it arrives
                self.rounds[summary.round] = {
                    "round": summary.round, "model_version": summary.model_version,
                    "clients": len(summary.clients), "client_ids": summary.clients,
                    "num_samples": summary.num_samples, "bytes_up": summary.bytes_up,
                    "bytes_down": summary.bytes_down, "train_loss": summary.train_loss,
                    "seconds": summary.seconds, **summary.metrics,
                }
            for device_id in summary.clients:
                view = self._device(device_id)
                view.last_contributed = max(summary.round, view.last_contributed or 0)
            self._bump()

    def on_log_entries(self, entries: list[dict[str, Any]]) -> None:
        with self._lock:
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("round"), int):
                    self.rounds[entry["round"]] = entry
                    for device_id in entry.get("client_ids") or []:
                        if isinstance(device_id, str):
                            view = self._device(device_id)
                            view.last_contributed = max(entry["round"], view.last_contributed or 0)
            self._bump()

    # ---- readers -------------------------------------------------------------------

    def round_view(self, now: float | None = None) -> dict[str, Any] | None:
        now = time.time() if now is None else now
        with self._lock:
            return self._round_view(now)

    def _round_view(self, now: float) -> dict[str, Any] | None:
        c = self.current
        if c is None:
            return None
        bytes_in = sum(c.update_bytes.values())
        model = self.models.get(c.model_version)
        return {
            "round": c.number, "model_version": c.model_version, "state": c.state(now), "phase": c.phase,
            "deadline": c.deadline, "seconds_left": max(0.0, c.deadline - now), "quorum": c.quorum,
            "accepted": len(c.accepted), "accepted_devices": sorted(c.accepted),
            "participants": c.participants, "rejected": c.refused_count, "refusals": list(c.refused),
            "bytes_in": bytes_in,
            # What the aggregator counts as bytes down (global model size x accepted devices), so far.
            "bytes_out": (model or {}).get("payload_bytes", 0) * len(c.accepted),
            "announced": c.announced,
        }

    def status(self, now: float | None = None) -> dict[str, Any]:
        """/api/status: everything the page shows."""
        now = time.time() if now is None else now
        with self._lock:
            current = self._round_view(now)
            devices = [self.devices[d].summary() for d in sorted(self.devices)]
            finished = max(self.rounds) if self.rounds else None
            return {
                "time": now, "version": self.version, "broker_connected": self.connected,
                "round": current["round"] if current else finished,
                "current": current,
                "devices": devices,
                "counts": {"devices": len(devices), "online": sum(d["online"] for d in devices)},
                "rounds": [self.rounds[r] for r in sorted(self.rounds)],
                "models": [self.models[v] for v in sorted(self.models)],
                "key_fingerprint": self.key_fingerprint,
            }

    def device_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.devices[d].summary() for d in sorted(self.devices)]

    def round_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.rounds[r] for r in sorted(self.rounds)]

    def device(self, device_id: str) -> dict[str, Any] | None:
        """A device page: its view, its uploads' outcomes and the finished rounds it contributed to."""
        with self._lock:
            view = self.devices.get(device_id)
            if view is None:
                return None
            contributed = [r for r in sorted(self.rounds) if device_id in (self.rounds[r].get("client_ids") or [])]
            return {**view.summary(), "events": list(view.events), "rounds_contributed": contributed}
