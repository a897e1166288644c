"""The aggregator service: announce a round, collect updates, FedAvg, publish, repeat.

All MQTT callbacks only enqueue; one thread owns the round state, so no locks are
needed around it. Every inbound message is checked and a bad one is logged and
dropped without stopping the service.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.budget import BudgetLimits, DeviceBudget, sender
from aggregator.claims import SampleCount, bound_sample_count, clamp_note, claimed_loss
from aggregator.config import AggregatorConfig
from aggregator.dp import DpStrategy, with_dp
from aggregator.pki import PkiError, load_revoked
from aggregator.state import AcceptedUpdate, StateDir
from aggregator.strategies import WeightedSum, build_strategy
from aggregator.validation import (UnsafeModel, UpdateRejected, check_finite, check_running_variances,
                                   check_update_manifest, model_problem, publishable)
from fedwire.broker import EmbeddedBroker
from fedwire.chunking import Reassembler, build_transfer, unpack_chunk
from fedwire.codec import tensor_specs
from fedwire.compression import (INT8_DELTA, PATCH, PLAIN, TOPK_INT8_DELTA, as_global_delta, decode_update,
                                 encode_global_delta, wire_specs)
from fedwire.errors import ProtocolError
from fedwire.messages import (DeviceStatus, RoundAnnouncement, RoundSummary, TrainSettings, TransferManifest,
                              UpdateAck)
from fedwire.mqtt import MqttLink
from fedwire.signing import load_signing_key, sign
from model_zoo.backbones import MACHINE_LOCAL_KWARGS, build_backbone
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors, running_statistics, shared_tensors

log = logging.getLogger("facefed.aggregator")

STREAM_POLL_S = 0.2
# Chunk data of uploads in progress kept in memory; beyond it, on disk (fedwire.chunking.Reassembler). Chunks come
# before their manifest, so each upload in progress holds up to a whole payload until then: without a budget the
# memory would grow with the number of devices uploading at the same moment.
REASSEMBLY_MEMORY_BYTES = 32 * 2**20
PUBLISH_RETRY_S = 1.0  # pause between attempts to publish retained state while the broker is away
REVOKED_POLL_S = 1.0  # how often the revoked_devices file is checked for changes
# Announcements expire this long after their deadline (agents allow for their own clock's error on top): a replay
# of an old, validly signed announcement is refused by a device that saw nothing newer (PROTOCOL.md 8.2).
ANNOUNCEMENT_GRACE_S = 60.0
AVERAGED_BN_SUFFIX = "_averaged_bn"  # bn_statistics measured: round metrics of the model before the statistics phase


@dataclass
class OpenRound:
    """Book-keeping of the round being collected."""

    number: int
    model_version: int
    announcement: RoundAnnouncement
    started: float
    quorum: int
    accepted: dict[str, int] = field(default_factory=dict)  # device -> n_k, bounded (aggregator/claims.py)
    transfers: dict[str, str] = field(default_factory=dict)  # device -> transfer id of its accepted update
    train_losses: dict[str, float] = field(default_factory=dict)  # claimed by each device
    clamped: dict[str, int] = field(default_factory=dict)  # device -> its n_k claim above max_samples_per_update
    kept_previous: str = ""  # why the aggregate was refused and the previous global model kept, if it was
    bytes_up: int = 0
    rejected: int = 0
    bytes_down: int = 0
    # The statistics phase of a round (bn_statistics: measured; announcement state "statistics"):
    statistics: WeightedSum | None = None  # the devices' BatchNorm statistics, summed with weights n_k
    trained: OpenRound | None = None  # the training phase it follows
    averaged_bn: dict[str, float] = field(default_factory=dict)  # metrics of the model with averaged statistics

    @property
    def kind(self) -> str:
        """The transfer kind this phase collects."""
        return "update" if self.statistics is None else "statistics"


class AggregatorService:

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.state = StateDir(config.state_dir)
        self.strategy = with_dp(build_strategy(config.strategy, _train_settings(config).to_dict(),
                                               config.clip_norm, config.trim_fraction, config.server_lr), config)
        self.dp = self.strategy if isinstance(self.strategy, DpStrategy) else None
        self.reassembler = Reassembler(max_payload_bytes=config.max_update_bytes, timeout_s=config.round_timeout_s,
                                       memory_budget_bytes=REASSEMBLY_MEMORY_BYTES, spill_dir=self.state.root)
        # (topic, payload, ack): acked once handled, so the broker, not this process, holds any backlog.
        self.events: queue.Queue[tuple[str, bytes, Callable[[], None]]] = queue.Queue()
        self.backbone = build_backbone(config.model.arch, **config.model.backbone_kwargs())
        self.global_tensors: dict[str, np.ndarray] = {}
        self.model_version = 0
        self.global_bytes = 0
        self.current: OpenRound | None = None
        self.devices: dict[str, str] = {}
        self._eval_data = None
        self._signing_key = load_signing_key(config.signing_key) if config.signing_key else None
        self._federation = _federation_started(self.state.root)
        self._broker: EmbeddedBroker | None = None
        self._link: MqttLink | None = None
        self._link_connections = 0  # the link's connection count when the retained state was last published
        self._global_transfer: tuple[TransferManifest, list[bytes]] | None = None
        # download_codec int8-delta (PROTOCOL.md 5.2): the full model, retained apart for devices without the base
        self._full_transfer: tuple[TransferManifest, list[bytes]] | None = None
        self._global_delta: tuple[int, dict[str, np.ndarray]] | None = None  # (version, wire tensors vs version - 1)
        self._download_residual: dict[str, np.ndarray] = {}  # server-side error feedback of the download delta
        self._chunks_retained: dict[str, int] = {}  # a transfer's chunk-0 topic -> chunks retained there by us
        self._retained: dict[str, bytes] = {}  # topic -> last retained message (round, summary)
        self.budget: DeviceBudget | None = None  # per device and round; made at _connect, once the model is known
        self._revoked_checked = 0.0
        self._revoked_mtime: float | None = None
        self._budget_stopped = False  # dp.epsilon_budget reached: no further round opens

    # ---- lifecycle -------------------------------------------------------

    def run(self) -> None:
        """Serve until all configured rounds are complete."""
        self._restore_or_init()
        try:
            self._connect()
            self._publish_global()
            if self.model_version >= self.config.rounds:
                log.info("all %d rounds already complete in %s", self.config.rounds, self.state.root)
            elif not self._privacy_budget_reached():
                self._open_round(self.model_version + 1)
                self._serve_until_done()
            self._announce_finished()
        finally:
            self.close()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def _restore_or_init(self) -> None:
        latest = self.state.latest_round()
        if latest is not None:
            self.global_tensors = self.state.load_round(latest)
            self.model_version = latest
            if hasattr(self.strategy, "slots"):
                self.strategy.slots = self.state.load_optimizer_state(latest)
            log.info("resuming from %s: round %d complete", self.state.checkpoint_path(latest), latest)
        else:
            self.global_tensors = self._initial_tensors()
            self.model_version = 0
            load_shared_tensors(self.backbone, self.global_tensors)
            # Round 0 is the starting point of the curves: the initial model, evaluated.
            entry = {"round": 0, "model_version": 0, "clients": 0, "client_ids": [], "num_samples": 0,
                     "bytes_up": 0, "bytes_down": 0, "bytes": 0, "rejected": 0, "train_loss": None,
                     "seconds": 0.0, "time": time.time(), **self._evaluate(0), **self._dp_metrics(0)}
            self.state.save_round(0, self.backbone, self._checkpoint_meta(), entry)
            log.info("initial global model written to %s", self.state.checkpoint_path(0))
        load_shared_tensors(self.backbone, self.global_tensors)

    def _initial_tensors(self) -> dict[str, np.ndarray]:
        model = self.config.model
        if model.init_checkpoint is not None:
            backbone, _ = load_checkpoint(model.init_checkpoint)
            return shared_tensors(backbone)
        import torch

        torch.manual_seed(model.seed)
        backbone = build_backbone(model.arch, **model.backbone_kwargs())
        return shared_tensors(backbone)

    def _connect(self) -> None:
        self.budget = DeviceBudget(self._budget_limits())
        self._reload_revoked(force=True)
        url = self.config.broker
        if url is None:
            self._broker = EmbeddedBroker(port=self.config.embedded_port)
            url = self._broker.start()
            log.info("embedded broker listening at %s", url)
        self._link = MqttLink(
            url,
            client_id=self.config.client_id,
            on_message=lambda topic, payload, ack: self.events.put((topic, payload, ack)),
            subscriptions=self.subscriptions(),
            protocol=self.config.protocol,
            tls=self.config.tls.files() if url.startswith("mqtts://") else None,
            clean_session=False,  # the broker queues updates (QoS 1) for us while we are down
            ack_after_handling=True,
            admit=self._admit,
        )
        self._link.connect()
        self._link_connections = self._link.connections
        log.info("connected to %s (MQTT %s)", url, self._link.protocol_version)

    def _budget_limits(self) -> BudgetLimits:
        budget = self.config.device_budget
        # From the backbone, not the global model: a shard worker gets that over MQTT only after it connected.
        update_bytes = sum(value.nbytes for value in shared_tensors(self.backbone).values())
        return BudgetLimits.derive(update_bytes, budget.min_chunk_bytes, budget.transfers, budget.messages,
                                   budget.bytes)

    def _reload_revoked(self, force: bool = False) -> None:
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
        device_id = sender(self.topics.prefix, topic)
        if device_id is None:
            return True
        verdict = self.budget.admit(device_id, payload)
        if verdict.first_drop:
            log.warning("dropping every message from %s for the rest of the round: %s", device_id, verdict.reason)
        return verdict.admitted

    def _new_budget_round(self) -> None:
        for device_id, (reason, count) in sorted(self.budget.new_round().items()):
            log.warning("dropped %d message(s) from %s (%s)", count, device_id, reason)

    def subscriptions(self) -> list[str]:
        """Topic filters of this process (aggregator/sharded.py's reducer and workers use others)."""
        return self.topics.aggregator_subscriptions()

    # ---- rounds ------------------------------------------------------------

    def _serve_until_done(self) -> None:
        while (self.model_version < self.config.rounds and not self._budget_stopped) or self.current is not None:
            self.handle_next_event()
            if self._link.connections != self._link_connections:
                self._republish_retained()
            self._reload_revoked()
            self._check_round_close(time.time())

    def _open_round(self, number: int) -> None:
        deadline = time.time() + self.config.round_timeout_s
        participants = self._sample_participants(number)
        quorum = min(self.config.min_clients, len(participants)) if participants else self.config.min_clients
        announcement = RoundAnnouncement(
            round=number,
            model_version=self.model_version,
            state="open",
            announce_id=secrets.token_hex(16),
            deadline=deadline,
            min_clients=quorum,
            train=TrainSettings.from_dict(self.strategy.configure_round(number)),
            participants=participants,
            expires=deadline + ANNOUNCEMENT_GRACE_S,
            federation=self._federation,
            dp=self.dp.settings(quorum) if self.dp else None,
        )
        self.strategy.begin_round(self.global_tensors)
        self._new_budget_round()
        if self.dp:
            self.dp.expect_shares(quorum)
        self.current = OpenRound(number, self.model_version, announcement, time.time(), quorum)
        self._restore_accepted(self.current)
        self._publish_retained(self.topics.round, self._signed(announcement).to_json())
        sampled = f", {len(participants)} devices sampled" if participants else ""
        log.info("round %d open: model v%d, quorum %d%s, deadline in %.0f s",
                 number, self.model_version, quorum, sampled, self.config.round_timeout_s)

    def _restore_accepted(self, current: OpenRound) -> None:
        """Replay the updates acknowledged in this round before a crash, in their original order."""
        for update in self.state.load_accepted(current.number, current.model_version):
            try:  # journaled n_k are bounded already; a config changed since may bound them otherwise
                count = self._bound(update.num_samples)
                self.strategy.accumulate(update.tensors, count.weight)
            except (UpdateRejected, ValueError) as exc:
                log.warning("round %d: journaled update of %s left out: %s", current.number, update.device_id, exc)
                continue
            self._count_accepted(current, update)
        if current.accepted:
            log.info("round %d: restored %d acknowledged update(s) from %s: %s", current.number,
                     len(current.accepted), self.state.open_round, ", ".join(current.accepted))

    def _sample_participants(self, number: int) -> list[str]:
        """A seeded sample of the devices seen online, or [] (everyone) when training on all."""
        online = sorted(d for d, state in self.devices.items() if state != "offline")
        if self.config.fraction_fit >= 1.0 or not online:
            return []
        count = max(1, math.ceil(self.config.fraction_fit * len(online)))
        rng = np.random.default_rng([self.config.seed, number])
        return sorted(rng.choice(online, size=count, replace=False).tolist())

    def _check_round_close(self, now: float) -> None:
        current = self.current
        if current is None:
            return
        for dropped in self.reassembler.expire(now):
            log.warning("dropped incomplete transfer %s (chunks missing past timeout)", dropped)
        received = self.strategy.num_updates if current.statistics is None else current.statistics.count
        if received >= current.quorum:
            self._close_round()
        elif now >= current.announcement.deadline:
            if received > 0:
                log.warning("round %d deadline: closing with %d of %d clients",
                            current.number, received, current.quorum)
                self._close_round()
            elif current.statistics is not None:
                log.warning("round %d: no BatchNorm statistics before the deadline; keeping the averaged ones",
                            current.number)
                self.current = None
                self._finish_round(current.trained, current)
            else:
                log.warning("round %d deadline passed with no updates: announcing it again", current.number)
                self._open_round(current.number)

    def _close_round(self) -> None:
        current = self.current
        self.current = None
        if current.statistics is not None:
            self._finish_round(current.trained, current)
            return
        new_tensors = self._compress_download(self._safe_aggregate(current), current.number)
        self.global_tensors = new_tensors
        self.model_version = current.number
        load_shared_tensors(self.backbone, new_tensors)
        if self.config.bn_statistics == "measured" and running_statistics(new_tensors):
            self._open_statistics(current)
        else:
            self._finish_round(current)

    def _safe_aggregate(self, current: OpenRound) -> dict[str, np.ndarray]:
        """The strategy's aggregate, or the previous global model when the aggregate is not fit to publish."""
        aggregate, problem = publishable(self.strategy.aggregate)
        if aggregate is not None:
            return aggregate
        current.kept_previous = problem
        log.error("round %d: the aggregate is not fit to publish (%s); keeping the tensors of global model v%d",
                  current.number, problem, self.model_version)
        return self.global_tensors

    def _open_statistics(self, trained: OpenRound) -> None:
        """Publish the averaged weights and ask the devices to measure their BatchNorm statistics on them."""
        averaged_bn = self._evaluate(trained.number)
        self._publish_global()
        deadline = time.time() + self.config.round_timeout_s
        announcement = RoundAnnouncement(
            round=trained.number, model_version=self.model_version, state="statistics",
            announce_id=secrets.token_hex(16), deadline=deadline,
            min_clients=trained.quorum, train=_train_settings(self.config),
            expires=deadline + ANNOUNCEMENT_GRACE_S, federation=self._federation,
        )
        self.current = OpenRound(trained.number, self.model_version, announcement, time.time(), trained.quorum,
                                 statistics=WeightedSum(), trained=trained, averaged_bn=averaged_bn,
                                 bytes_down=self.global_bytes * len(trained.accepted))
        self._publish_retained(self.topics.round, self._signed(announcement).to_json())
        log.info("round %d: weights averaged; statistics phase open (quorum %d)", trained.number, trained.quorum)

    def _finish_round(self, current: OpenRound, phase: OpenRound | None = None) -> None:
        """Publish, evaluate and checkpoint the round's global model, then open the next round. `phase`: the
        statistics phase that followed the training phase `current` (bn_statistics: measured)."""
        if phase is None:
            self._publish_global()
            current.bytes_down = self.global_bytes * len(current.accepted)
        else:
            current.bytes_up += phase.bytes_up
            current.rejected += phase.rejected
            current.bytes_down = phase.bytes_down
            measured = self._safe_statistics(phase)
            if measured is not None:
                # The weights went out with the statistics phase: only the statistics travel now.
                self.global_tensors = {**self.global_tensors, **measured}
                load_shared_tensors(self.backbone, self.global_tensors)
                self._publish_global(patch=measured)
                current.bytes_down += self.global_bytes * len(phase.accepted)
        metrics = {**self._evaluate(current.number), **self._dp_metrics(current.number)}
        if phase is not None:
            metrics.update({k + AVERAGED_BN_SUFFIX: v for k, v in phase.averaged_bn.items()})
        summary = RoundSummary(
            round=current.number,
            model_version=self.model_version,
            clients=sorted(current.accepted),
            num_samples=sum(current.accepted.values()),
            bytes_up=current.bytes_up,
            bytes_down=current.bytes_down,
            train_loss=claimed_loss({d: l for d, l in current.train_losses.items() if d in current.accepted}),
            metrics=metrics,
            seconds=time.time() - current.started,
        )
        entry = _log_entry(summary, current)
        checkpoint = self.state.save_round(current.number, self.backbone, self._checkpoint_meta(), entry,
                                           getattr(self.strategy, "slots", None))
        self.state.clear_accepted()  # the checkpoint now holds them
        self._export(checkpoint)
        self._publish_retained(self.topics.round_summary, summary.to_json())
        log.info(_round_line(summary))
        if self.model_version < self.config.rounds and not self._privacy_budget_reached():
            self._open_round(self.model_version + 1)

    @staticmethod
    def _safe_statistics(phase: OpenRound) -> dict[str, np.ndarray] | None:
        """The measured BatchNorm statistics' mean, or None (keep the averaged ones) when none came or it is unfit."""
        if not phase.statistics.count:
            return None
        measured, problem = publishable(phase.statistics.mean)
        if measured is not None:
            return measured
        log.error("round %d: measured BatchNorm statistics not fit to publish (%s); keeping the averaged ones",
                  phase.number, problem)
        return None

    def _dp_metrics(self, rounds_done: int) -> dict[str, float]:
        return self.dp.metrics(rounds_done) if self.dp else {}

    def _privacy_budget_reached(self) -> bool:
        """dp.epsilon_budget: no round may take epsilon past it, so training stops one round before."""
        if self.dp is None or not self.dp.budget_reached(self.model_version):
            return False
        log.warning("privacy budget reached: epsilon %.3f after round %d, one more round would spend %.3f > budget "
                    "%g (delta %g); stopping training", self.dp.epsilon(self.model_version), self.model_version,
                    self.dp.epsilon(self.model_version + 1), self.dp.config.epsilon_budget, self.dp.config.delta)
        self._budget_stopped = True
        return True

    def _compress_download(self, new_tensors: dict[str, np.ndarray], version: int) -> dict[str, np.ndarray]:
        """download_codec int8-delta: the new global model becomes what devices rebuild from the delta."""
        if self.config.download_codec != INT8_DELTA:
            return new_tensors
        wire, decoded, self._download_residual = encode_global_delta(new_tensors, self.global_tensors,
                                                                     self._download_residual)
        self._global_delta = (version, wire)
        return decoded

    def _publish_global(self, patch: dict[str, np.ndarray] | None = None) -> None:
        """Publish global model v (retained): in full, as a delta against v - 1 (download_codec int8-delta) or as
        a `patch` of v (its measured BatchNorm statistics, for devices that hold v with averaged ones)."""
        v = self.model_version
        # The one guard before anything is signed: the round's checks keep such a model from getting here.
        problem = model_problem(self.global_tensors) or (model_problem(patch) if patch is not None else None)
        if problem is not None:
            raise UnsafeModel(f"refusing to sign and publish global model v{v}: {problem}")
        manifest, chunks = build_transfer("global", "aggregator", v, v, self.global_tensors,
                                          max_chunk_bytes=self.config.max_chunk_bytes)
        self._full_transfer = None
        if patch is not None:
            self._full_transfer = (self._signed(manifest), chunks)
            patch_manifest, patch_chunks = build_transfer("global", "aggregator", v, v, patch,
                                                          max_chunk_bytes=self.config.max_chunk_bytes)
            manifest, chunks = as_global_delta(patch_manifest, v, manifest.payload_sha256, PATCH), patch_chunks
        elif self.config.download_codec == INT8_DELTA:
            self._full_transfer = (self._signed(manifest), chunks)
            if self._global_delta is not None and self._global_delta[0] == v:
                # Devices holding v - 1 rebuild v from the delta; manifest.payload_sha256 is the full model's hash.
                delta, delta_chunks = build_transfer("global", "aggregator", v, v, self._global_delta[1],
                                                     max_chunk_bytes=self.config.max_chunk_bytes)
                manifest, chunks = as_global_delta(delta, v - 1, manifest.payload_sha256), delta_chunks
            # else (version 0, or v after a restart: no delta kept): the global topics carry the full model too
        self._global_transfer = (self._signed(manifest), chunks)
        self._publish_global_transfer()
        log.debug("published global model v%d (%s, %d bytes in %d chunks)", v, manifest.codec, self.global_bytes,
                  len(chunks))

    def _publish_global_transfer(self) -> None:
        manifest, chunks = self._global_transfer
        full = self._full_transfer

        def publish() -> None:
            if full is not None:  # first: a device told by the delta to fall back finds the full model retained
                self._link.publish_transfer(self.topics.global_full_manifest, self.topics.global_full_chunk,
                                            full[0], full[1], retain=True)
                self._clear_stale_chunks(self.topics.global_full_chunk, len(full[1]))
            self.global_bytes = self._link.publish_transfer(self.topics.global_manifest, self.topics.global_chunk,
                                                            manifest, chunks, retain=True)
            self._clear_stale_chunks(self.topics.global_chunk, len(chunks))

        self._until_published(f"global model v{manifest.model_version}", publish)

    def _clear_stale_chunks(self, chunk_topic: Callable[[int], str], count: int) -> None:
        """A shorter transfer (a delta after a full model) leaves higher chunk indices retained: clear them."""
        key = chunk_topic(0)
        for index in range(count, self._chunks_retained.get(key, 0)):
            self._link.publish(chunk_topic(index), b"", retain=True)
        self._chunks_retained[key] = count

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        self._retained[topic] = payload
        self._until_published(topic, lambda: self._link.publish(topic, payload, retain=True))

    def _until_published(self, what: str, publish: Callable[[], None]) -> None:
        """Retained state must reach the broker: retry while the link reconnects (it does so forever)."""
        while True:
            try:
                publish()
                return
            except (ConnectionError, TimeoutError) as exc:
                log.warning("could not publish %s (%s); retrying", what, exc)
                time.sleep(PUBLISH_RETRY_S)

    def _republish_retained(self) -> None:
        """After a reconnection: the broker may have restarted without our retained messages
        (persistence off, or saved before they were published), so publish them again. The bytes
        are identical, so agents see the same announce id and transfer id and ignore them."""
        self._link_connections = self._link.connections
        log.info("connection to the broker re-established: publishing the global model v%d and round state again",
                 self.model_version)
        self._publish_global_transfer()
        for topic, payload in self._retained.items():
            self._publish_retained(topic, payload)

    def _announce_finished(self) -> None:
        announcement = RoundAnnouncement(
            round=self.model_version,
            model_version=self.model_version,
            state="finished",
            announce_id=secrets.token_hex(16),
            deadline=time.time(),
            min_clients=self.config.min_clients,
            train=TrainSettings(),
            federation=self._federation,  # no expiry: a device that comes back late still learns the end
        )
        self._publish_retained(self.topics.round, self._signed(announcement).to_json())
        log.info("federation finished after round %d; final model %s",
                 self.model_version, self.state.checkpoint_path(self.model_version))

    # ---- inbound messages ---------------------------------------------------

    def handle_next_event(self) -> None:
        """Handle the next inbound message, if one arrives within STREAM_POLL_S."""
        try:
            event = self.events.get(timeout=STREAM_POLL_S)
        except queue.Empty:
            return
        self.handle_event(event)

    def handle_event(self, event: tuple[str, bytes, Callable[[], None]]) -> None:
        topic, payload, ack = event
        try:
            self.handle_message(topic, payload)
        finally:
            ack()

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Route one inbound message; anything malformed is logged and dropped."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "update_manifest":
                self._on_update_manifest(parsed.device_id, payload)
            elif parsed.kind == "update_chunk":
                self._on_update_chunk(parsed.device_id, payload)
            elif parsed.kind == "status":
                self._on_status(parsed.device_id, payload)
        except ProtocolError as exc:
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)

    def _on_status(self, device_id: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        status = DeviceStatus.from_json(payload)
        if self.devices.get(device_id) != status.state:
            log.info("device %s is %s%s", device_id, status.state, f" ({status.detail})" if status.detail else "")
            self.devices[device_id] = status.state

    def _on_update_manifest(self, device_id: str, payload: bytes) -> None:
        manifest = TransferManifest.from_json(payload)
        current = self.current
        if current is None:
            self._reject(device_id, manifest, "no round is open")
            return
        current.bytes_up += len(payload)
        if current.transfers.get(device_id) == manifest.transfer_id:
            # Sent again (redelivery, or a resend after a reconnect or a restart of ours): counted once, acked again.
            log.info("round %d: update %s from %s was already accepted; acknowledging it again",
                     current.number, manifest.transfer_id, device_id)
            self._send_ack(UpdateAck(device_id, current.number, manifest.transfer_id, True, ""))
            return
        if device_id in current.accepted and manifest.round == current.number and manifest.kind == current.kind:
            reason = f"an upload ({current.kind}) from {device_id} was already accepted for round {current.number}"
            log.info("ignored a second update from %s: %s", device_id, reason)
            self._send_ack(UpdateAck(device_id, manifest.round, manifest.transfer_id, False, reason))
            return
        if device_id in self.budget.revoked:  # the broker let a revoked device through
            current.rejected += 1
            self._reject(device_id, manifest, f"{device_id}'s certificate is revoked")
            return
        participants = current.announcement.participants
        if participants and device_id not in participants:
            current.rejected += 1
            self._reject(device_id, manifest, f"not sampled for round {current.number}")
            return
        if current.statistics is None:
            expected = wire_specs(tensor_specs(self.global_tensors), manifest.codec, self.config.update_topk)
        else:  # statistics travel as they are
            expected = tensor_specs(running_statistics(self.global_tensors)) if manifest.codec == PLAIN else []
        try:
            check_update_manifest(
                manifest,
                kind=current.kind,
                device_id=device_id,
                current_round=current.number,
                model_version=current.model_version,
                expected=expected,
                max_payload_bytes=self.config.max_update_bytes,
            )
            self._bound(manifest.num_samples)  # refused before any chunk is kept
        except UpdateRejected as exc:
            current.rejected += 1
            self._reject(device_id, manifest, str(exc))
            return
        try:
            completed = self.reassembler.add_manifest(device_id, manifest, time.time())
        except ProtocolError as exc:
            self._transfer_fault(device_id, manifest.transfer_id, exc)
            return
        self._complete(device_id, completed)

    def _on_update_chunk(self, device_id: str, payload: bytes) -> None:
        if self.current is not None:
            self.current.bytes_up += len(payload)
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
        if self.current is not None and transfer_id is not None:
            self._send_ack(UpdateAck(device_id, self.current.number, transfer_id, False, f"transfer fault: {exc}"))

    def _complete(self, device_id: str, completed) -> None:
        if completed is None:
            return
        manifest = completed.manifest
        current = self.current
        if current is None or (manifest.round, manifest.kind) != (current.number, current.kind) \
                or device_id in current.accepted:
            log.info("ignored late or duplicate %s from %s (round %d)", manifest.kind, device_id, manifest.round)
            return
        try:
            tensors = completed.tensors
            if manifest.codec != PLAIN:  # int8-delta, topk-int8-delta: exact, against this round's global model
                tensors = decode_update(tensors, self.global_tensors, manifest.codec)
            check_finite(tensors)
            check_running_variances(tensors)
            count = self._bound(manifest.num_samples)
            if current.statistics is not None:
                current.statistics.add(tensors, count.weight)
            else:
                self.strategy.accumulate(tensors, count.weight)
        except (UpdateRejected, ProtocolError, ValueError) as exc:  # NonFiniteResult: the update would overflow
            current.rejected += 1
            self._reject(device_id, manifest, str(exc))
            return
        if count.clamped_from is not None:
            current.clamped[device_id] = count.clamped_from
            log.warning("round %d: %s from %s: %s", current.number, current.kind, device_id,
                        clamp_note(count, self.config.max_samples_per_update))
        if current.statistics is not None:  # not journaled: after a restart the phase is simply announced again
            current.accepted[device_id] = count.n_k
            current.transfers[device_id] = manifest.transfer_id
            self._send_ack(UpdateAck(device_id, current.number, manifest.transfer_id, True, ""))
            log.info("round %d: BatchNorm statistics from %s accepted (n=%d, %d/%d)", current.number, device_id,
                     count.n_k, len(current.accepted), current.quorum)
            return
        update = AcceptedUpdate(device_id, manifest.transfer_id, count.n_k, manifest.metrics.get("train_loss"), tensors)
        # Durable before the ack: a device told "accepted" is counted even if we crash right after.
        self.state.save_accepted(current.number, current.model_version, update)
        self._count_accepted(current, update)
        self._send_ack(UpdateAck(device_id, current.number, manifest.transfer_id, True, ""))
        log.info("round %d: update from %s accepted (n=%d, %d/%d)", current.number, device_id,
                 count.n_k, len(current.accepted), current.quorum)

    @staticmethod
    def _count_accepted(current: OpenRound, update: AcceptedUpdate) -> None:
        current.accepted[update.device_id] = update.num_samples
        current.transfers[update.device_id] = update.transfer_id
        if update.train_loss is not None:
            current.train_losses[update.device_id] = update.train_loss

    def _bound(self, claimed: int) -> SampleCount:
        """The claimed n_k under this fleet's cap and weighting (aggregator/claims.py)."""
        return bound_sample_count(claimed, self.config.weighting, self.config.max_samples_per_update)

    def _reject(self, device_id: str, manifest: TransferManifest, reason: str) -> None:
        log.warning("rejected update from %s: %s", device_id, reason)
        self._send_ack(UpdateAck(device_id, manifest.round, manifest.transfer_id, False, reason))

    def _send_ack(self, ack: UpdateAck) -> None:
        # Not waiting for the broker's PUBACK: while a publish of ours waits, the link reads past its window of
        # unhandled messages (fedwire/mqtt.py), and an upload burst would pile up in self.events. paho delivers
        # the ack, again after a reconnection if need be.
        try:
            self._link.publish_nowait(self.topics.ack(ack.device_id), ack.to_json(), qos=1)
        except (ConnectionError, TimeoutError) as exc:
            # Whatever we decided is already recorded; the device resends after a reconnect and is answered again.
            log.warning("ack for %s's update %s not delivered: %s", ack.device_id, ack.transfer_id, exc)

    # ---- evaluation ------------------------------------------------------------

    def _evaluate(self, round_number: int) -> dict[str, float]:
        eval_cfg = self.config.eval
        if eval_cfg.data is None or round_number % eval_cfg.every:
            return {}
        from model_zoo.data import load_dataset
        from model_zoo.evaluate import evaluate_backbone

        if self._eval_data is None:
            self._eval_data = load_dataset(eval_cfg.data)
        report = evaluate_backbone(self.backbone, self._eval_data)
        metrics = {"val_accuracy": report["accuracy"], "eer": report["eer"], "rank1": report["rank1"]}
        metrics.update({f"tar_at_far_{k}": v for k, v in report["tar_at_far"].items()})
        return metrics

    def _export(self, checkpoint) -> None:
        """Write the new global model in each configured deployable format; a failure never stops the fleet."""
        export = self.config.export
        if not export.formats:
            return
        from model_zoo.export import export_model

        for fmt in export.formats:
            try:
                result = export_model(checkpoint, fmt, self.state.root / "exports", export.calibration)
            except Exception as exc:  # an exporter bug must not stop training rounds
                log.error("export of %s as %s failed: %s", checkpoint.name, fmt, exc)
            else:
                log.info("exported %s", result.model_path)

    def _signed(self, message):
        return sign(message, self._signing_key) if self._signing_key is not None else message

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "strategy": self.strategy.name}


def _train_settings(config: AggregatorConfig) -> TrainSettings:
    """What every round announces: the train: section plus the codecs and the model devices must use."""
    m = config.model
    return dataclasses.replace(
        config.train,
        codec=config.update_codec,
        codec_topk=config.update_topk if config.update_codec == TOPK_INT8_DELTA else None,
        download_codec=config.download_codec,
        # Devices build the same backbone from this before loading the global tensors.
        model={"arch": m.arch, **{k: v for k, v in m.backbone_kwargs().items() if k not in MACHINE_LOCAL_KWARGS}},
    )


def _federation_started(state_dir) -> float:
    """When this state dir's federation began (aggregator clock), announced so that devices order federations:
    a new federation (a fresh state dir) is newer than every round of the one before it."""
    path = state_dir / "federation.json"
    try:
        return float(json.loads(path.read_text())["started"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s unreadable (%s): starting a new federation epoch", path, exc)
    started = time.time()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"started": started}))
    os.replace(tmp, path)
    return started


def _log_entry(summary: RoundSummary, current: OpenRound) -> dict[str, Any]:
    return {
        "round": summary.round,
        "model_version": summary.model_version,
        "clients": len(summary.clients),
        "client_ids": summary.clients,
        "num_samples": summary.num_samples,
        "bytes_up": summary.bytes_up,
        "bytes_down": summary.bytes_down,
        "bytes": summary.bytes_up + summary.bytes_down,
        "rejected": current.rejected,
        "train_loss": summary.train_loss,  # the median of the devices' claims
        **({"clamped_num_samples": current.clamped} if current.clamped else {}),
        **({"kept_previous_model": current.kept_previous} if current.kept_previous else {}),
        "seconds": round(summary.seconds, 3),
        "time": time.time(),
        **summary.metrics,
    }


def _round_line(summary: RoundSummary) -> str:
    loss = "n/a" if summary.train_loss is None else f"{summary.train_loss:.4f}"
    acc = summary.metrics.get("val_accuracy")
    acc_text = "n/a" if acc is None else f"{acc:.4f}"
    epsilon = summary.metrics.get("epsilon")
    dp_text = "" if epsilon is None else f", epsilon {epsilon:.3f} (delta {summary.metrics['dp_delta']:g})"
    return (f"round {summary.round}: {len(summary.clients)} clients, n={summary.num_samples}, "
            f"{(summary.bytes_up + summary.bytes_down) / 1e6:.2f} MB moved, train loss {loss}, "
            f"held-out accuracy {acc_text}{dp_text}, {summary.seconds:.1f} s")
