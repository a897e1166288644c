"""The federation round, written once and transport-free: open a round, accept or refuse updates, close it by
quorum or deadline, run the BatchNorm statistics phase, journal, checkpoint, and make the next global model.

It imports neither paho nor torch. What leaves the engine goes through a `Publisher` (MQTT in
aggregator/publisher.py, a list in facefed/inprocess.py); what needs the model itself (the initial weights,
evaluation, export) through `ModelHooks` (aggregator/models.py). The plain service, the sharded
worker and reducer (aggregator/sharded.py) and the in-process driver all run this engine.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from aggregator.claims import SampleCount, bound_sample_count, clamp_note, claimed_loss
from aggregator.state import AcceptedUpdate, StateDir
from aggregator.strategies import WeightedSum
from aggregator.validation import (UnsafeModel, UpdateRejected, check_finite, check_running_variances,
                                   check_update_manifest, model_problem, publishable)
from fedwire.chunking import CompletedTransfer
from fedwire.codec import tensor_specs
from fedwire.compression import INT8_DELTA, PLAIN, decode_update, encode_global_delta, wire_specs
from fedwire.errors import ProtocolError
from fedwire.messages import RoundAnnouncement, RoundSummary, TrainSettings, TransferManifest, UpdateAck
from model_zoo.checkpoint_file import BackboneSpec, running_statistics

if TYPE_CHECKING:  # the config module builds backbones to check them; the engine only reads its fields
    from aggregator.config import AggregatorConfig

log = logging.getLogger("facefed.aggregator")

# Announcements expire this long after their deadline (agents allow for their own clock's error on top): a replay
# of an old, validly signed announcement is refused by a device that saw nothing newer (PROTOCOL.md 8.2).
ANNOUNCEMENT_GRACE_S = 60.0
AVERAGED_BN_SUFFIX = "_averaged_bn"  # bn_statistics measured: round metrics of the model before the statistics phase

Tensors = dict[str, np.ndarray]


class Close(enum.Enum):
    """What the close check says of an open round (or phase)."""

    WAIT = "wait"
    CLOSE = "close"  # quorum reached, or the deadline passed with something to aggregate
    EMPTY = "empty"  # the deadline passed with nothing received


def close_check(received: int, quorum: int, now: float, deadline: float) -> Close:
    """The one round-close rule, for the plain service and the sharded reducer alike."""
    if received >= quorum:
        return Close.CLOSE
    if now >= deadline:
        return Close.CLOSE if received > 0 else Close.EMPTY
    return Close.WAIT


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


@dataclass(frozen=True)
class Verdict:
    """The engine's answer to one upload: what the device is told."""

    device_id: str
    round: int
    transfer_id: str
    accepted: bool
    reason: str = ""
    num_samples: int = 0  # the bounded n_k of an accepted update

    @property
    def ack(self) -> UpdateAck:
        return UpdateAck(self.device_id, self.round, self.transfer_id, self.accepted, self.reason)


@dataclass(frozen=True)
class GlobalModel:
    """A global model to publish: `tensors` in full, plus the wire `delta` against version - 1 (download_codec
    int8-delta) or the `patch` of its measured BatchNorm statistics, when there is one. `full_apart`: the full
    model is also retained on its own topics, for devices that cannot apply the delta or the patch."""

    version: int
    tensors: Tensors
    delta: Tensors | None = None
    patch: Tensors | None = None
    full_apart: bool = False


class Publisher(Protocol):
    """Where the engine's output goes."""

    def announce(self, announcement: RoundAnnouncement) -> None: ...

    def publish_global(self, model: GlobalModel) -> int:
        """Publish; returns the bytes one device downloads."""
        ...

    def publish_summary(self, summary: RoundSummary) -> None: ...


class ModelHooks(Protocol):
    """The engine's only contact with the model itself (torch, data sets, exporters)."""

    spec: BackboneSpec
    train_settings: TrainSettings  # what every round announces (aggregator/models.py:train_settings)

    def initial_tensors(self) -> Tensors: ...

    def update_bytes(self) -> int: ...  # one plain update's size (the MQTT service derives device budgets from it)

    def evaluate(self, round_number: int, tensors: Tensors) -> dict[str, float]: ...

    def export(self, checkpoint: Path) -> None: ...


class RoundEngine:
    """Owns the open round and the global model; one thread calls it."""

    def __init__(self, config: AggregatorConfig, strategy, models: ModelHooks, publisher: Publisher,
                 dp=None, state: StateDir | None = None, on_round_open: Callable[[], None] | None = None) -> None:
        self.config = config
        self.strategy = strategy
        self.dp = dp  # the DpStrategy wrapping `strategy`, if the config asks for differential privacy
        self.models = models
        self.publisher = publisher
        self.state = state or StateDir(config.state_dir)
        self.on_round_open = on_round_open  # each new round (not its statistics phase), e.g. the devices' budgets
        self.federation = federation_started(self.state.root)
        self.global_tensors: Tensors = {}
        self.model_version = 0
        self.global_bytes = 0  # what one device downloads of the latest global model
        self.current: OpenRound | None = None
        self.devices: dict[str, str] = {}  # device -> its last reported state (online, training, offline...)
        self.budget_stopped = False  # dp.epsilon_budget reached: no further round opens
        self._global_delta: tuple[int, Tensors] | None = None  # (version, wire tensors vs version - 1)
        self._download_residual: Tensors = {}  # server-side error feedback of the download delta

    # ---- lifecycle -----------------------------------------------------------------------------------

    def restore_or_init(self) -> None:
        """Resume from the state dir's latest checkpoint, or write the initial model as round 0."""
        latest = self.state.latest_round()
        if latest is not None:
            self.global_tensors = self.state.load_round(latest)
            self.model_version = latest
            if hasattr(self.strategy, "slots"):
                self.strategy.slots = self.state.load_optimizer_state(latest)
            log.info("resuming from %s: round %d complete", self.state.checkpoint_path(latest), latest)
            return
        self.global_tensors = self.models.initial_tensors()
        self.model_version = 0
        # Round 0 is the starting point of the curves: the initial model, evaluated.
        entry = {"round": 0, "model_version": 0, "clients": 0, "client_ids": [], "num_samples": 0,
                 "bytes_up": 0, "bytes_down": 0, "bytes": 0, "rejected": 0, "train_loss": None,
                 "seconds": 0.0, "time": time.time(), **self._evaluate(0), **self._dp_metrics(0)}
        self.state.save_round(0, self.global_tensors, self.models.spec, self._checkpoint_meta(), entry)
        log.info("initial global model written to %s", self.state.checkpoint_path(0))

    def start(self) -> None:
        """Publish the global model and open the next round, unless the federation is already done."""
        self.publish_global()
        if self.model_version >= self.config.rounds:
            log.info("all %d rounds already complete in %s", self.config.rounds, self.state.root)
        elif not self._privacy_budget_reached():
            self.open_round(self.model_version + 1)

    @property
    def done(self) -> bool:
        return (self.model_version >= self.config.rounds or self.budget_stopped) and self.current is None

    def finished_announcement(self) -> RoundAnnouncement:
        log.info("federation finished after round %d; final model %s",
                 self.model_version, self.state.checkpoint_path(self.model_version))
        return RoundAnnouncement(
            round=self.model_version, model_version=self.model_version, state="finished",
            announce_id=secrets.token_hex(16), deadline=time.time(), min_clients=self.config.min_clients,
            # The model the final version is of: a device re-embeds its unlock enrolment with it.
            train=self.models.train_settings,
            federation=self.federation,  # no expiry: a device that comes back late still learns the end
        )

    # ---- opening a round ------------------------------------------------------------------------------

    def open_round(self, number: int) -> None:
        """Announce round `number` (again, with a new deadline, when it is the one open)."""
        deadline = time.time() + self.config.round_timeout_s
        participants = self.sample_participants(number)
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
            federation=self.federation,
            dp=self.dp.settings(quorum) if self.dp else None,
        )
        self.begin(announcement)
        self.publisher.announce(announcement)
        sampled = f", {len(participants)} devices sampled" if participants else ""
        log.info("round %d open: model v%d, quorum %d%s, deadline in %.0f s",
                 number, self.model_version, quorum, sampled, self.config.round_timeout_s)

    def begin(self, announcement: RoundAnnouncement) -> None:
        """Start collecting the round `announcement` opens (a shard worker: the reducer's announcement)."""
        self.strategy.begin_round(self.global_tensors)
        if self.on_round_open is not None:
            self.on_round_open()
        if self.dp and announcement.dp:
            self.dp.expect_shares(announcement.min_clients)
        self.current = OpenRound(announcement.round, announcement.model_version, announcement, time.time(),
                                 announcement.min_clients)
        self._restore_accepted(self.current)

    def _restore_accepted(self, current: OpenRound) -> None:
        """Replay the updates acknowledged in this round before a crash, in their original order."""
        for update in self.state.load_accepted(current.number, current.model_version):
            try:  # journaled n_k are bounded already; a config changed since may bound them otherwise
                count = self._bound(update.num_samples)
                self.strategy.accumulate(update.tensors, count.weight)
            except (UpdateRejected, ValueError) as exc:
                log.warning("round %d: journaled update of %s left out: %s", current.number, update.device_id, exc)
                continue
            _count_accepted(current, update)
        if current.accepted:
            log.info("round %d: restored %d acknowledged update(s) from %s: %s", current.number,
                     len(current.accepted), self.state.open_round, ", ".join(current.accepted))

    def sample_participants(self, number: int) -> list[str]:
        """A seeded sample of the devices seen online, or [] (everyone) when training on all."""
        online = sorted(d for d, state in self.devices.items() if state != "offline")
        if self.config.fraction_fit >= 1.0 or not online:
            return []
        count = max(1, math.ceil(self.config.fraction_fit * len(online)))
        rng = np.random.default_rng([self.config.seed, number])
        return sorted(rng.choice(online, size=count, replace=False).tolist())

    def device_state(self, device_id: str, state: str, detail: str = "") -> None:
        if self.devices.get(device_id) != state:
            log.info("device %s is %s%s", device_id, state, f" ({detail})" if detail else "")
            self.devices[device_id] = state

    # ---- accepting updates ------------------------------------------------------------------------------

    def received_bytes(self, count: int) -> None:
        if self.current is not None:
            self.current.bytes_up += count

    def screen(self, device_id: str, manifest: TransferManifest, revoked: bool = False) -> Verdict | None:
        """Judge an upload by its manifest, before any of its chunks is kept: a final verdict, or None (collect it)."""
        current = self.current
        if current is None:
            return self._refuse(device_id, manifest, "no round is open", counted=False)
        if current.transfers.get(device_id) == manifest.transfer_id:
            # Sent again (redelivery, or a resend after a reconnect or a restart of ours): counted once, acked again.
            log.info("round %d: update %s from %s was already accepted; acknowledging it again",
                     current.number, manifest.transfer_id, device_id)
            return Verdict(device_id, current.number, manifest.transfer_id, True)
        if device_id in current.accepted and manifest.round == current.number and manifest.kind == current.kind:
            reason = f"an upload ({current.kind}) from {device_id} was already accepted for round {current.number}"
            log.info("ignored a second update from %s: %s", device_id, reason)
            return Verdict(device_id, manifest.round, manifest.transfer_id, False, reason)
        if revoked:  # the broker let a revoked device through
            return self._refuse(device_id, manifest, f"{device_id}'s certificate is revoked")
        participants = current.announcement.participants
        if participants and device_id not in participants:
            return self._refuse(device_id, manifest, f"not sampled for round {current.number}")
        if current.statistics is None:
            expected = wire_specs(tensor_specs(self.global_tensors), manifest.codec, self.config.update_topk)
        else:  # statistics travel as they are
            expected = tensor_specs(running_statistics(self.global_tensors)) if manifest.codec == PLAIN else []
        try:
            check_update_manifest(manifest, kind=current.kind, device_id=device_id, current_round=current.number,
                                  model_version=current.model_version, expected=expected,
                                  max_payload_bytes=self.config.max_update_bytes)
            self._bound(manifest.num_samples)  # refused before any chunk is kept
        except UpdateRejected as exc:
            return self._refuse(device_id, manifest, str(exc))
        return None

    def accept(self, device_id: str, completed: CompletedTransfer) -> Verdict | None:
        """Judge a whole upload and count it; None when it is late or a duplicate (nothing to tell the device)."""
        manifest = completed.manifest
        current = self.current
        if current is None or (manifest.round, manifest.kind) != (current.number, current.kind) \
                or device_id in current.accepted:
            log.info("ignored late or duplicate %s from %s (round %d)", manifest.kind, device_id, manifest.round)
            return None
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
            return self._refuse(device_id, manifest, str(exc))
        if count.clamped_from is not None:
            current.clamped[device_id] = count.clamped_from
            log.warning("round %d: %s from %s: %s", current.number, current.kind, device_id,
                        clamp_note(count, self.config.max_samples_per_update))
        verdict = Verdict(device_id, current.number, manifest.transfer_id, True, num_samples=count.n_k)
        if current.statistics is not None:  # not journaled: after a restart the phase is simply announced again
            current.accepted[device_id] = count.n_k
            current.transfers[device_id] = manifest.transfer_id
            log.info("round %d: BatchNorm statistics from %s accepted (n=%d, %d/%d)", current.number, device_id,
                     count.n_k, len(current.accepted), current.quorum)
            return verdict
        update = AcceptedUpdate(device_id, manifest.transfer_id, count.n_k, manifest.metrics.get("train_loss"), tensors)
        # Durable before the ack: a device told "accepted" is counted even if we crash right after.
        self.state.save_accepted(current.number, current.model_version, update)
        _count_accepted(current, update)
        log.info("round %d: update from %s accepted (n=%d, %d/%d)", current.number, device_id,
                 count.n_k, len(current.accepted), current.quorum)
        return verdict

    def _refuse(self, device_id: str, manifest: TransferManifest, reason: str, counted: bool = True) -> Verdict:
        if counted:
            self.current.rejected += 1
        log.warning("rejected update from %s: %s", device_id, reason)
        return Verdict(device_id, manifest.round, manifest.transfer_id, False, reason)

    def _bound(self, claimed: int) -> SampleCount:
        """The claimed n_k under this fleet's cap and weighting (aggregator/claims.py)."""
        return bound_sample_count(claimed, self.config.weighting, self.config.max_samples_per_update)

    # ---- closing a round ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Close the open round or phase if its quorum is in or its deadline passed."""
        current = self.current
        if current is None:
            return
        received = self.strategy.num_updates if current.statistics is None else current.statistics.count
        decision = close_check(received, current.quorum, now, current.announcement.deadline)
        if decision is Close.CLOSE:
            if received < current.quorum:
                log.warning("round %d deadline: closing with %d of %d clients", current.number, received,
                            current.quorum)
            self.close_round()
        elif decision is Close.EMPTY:
            if current.statistics is not None:
                log.warning("round %d: no BatchNorm statistics before the deadline; keeping the averaged ones",
                            current.number)
                self.current = None
                self._finish_round(current.trained, current)
            else:
                self.reannounce_empty()

    def reannounce_empty(self) -> None:
        log.warning("round %d deadline passed with no updates: announcing it again", self.current.number)
        self.open_round(self.current.number)

    def close_round(self) -> None:
        """Aggregate what the strategy holds into the next global model (or finish the statistics phase)."""
        current = self.current
        self.current = None
        if current.statistics is not None:
            self._finish_round(current.trained, current)
            return
        self.global_tensors = self._compress_download(self._safe_aggregate(current), current.number)
        self.model_version = current.number
        if self.config.bn_statistics == "measured" and running_statistics(self.global_tensors):
            self._open_statistics(current)
        else:
            self._finish_round(current)

    def _safe_aggregate(self, current: OpenRound) -> Tensors:
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
        self.publish_global()
        deadline = time.time() + self.config.round_timeout_s
        announcement = RoundAnnouncement(
            round=trained.number, model_version=self.model_version, state="statistics",
            announce_id=secrets.token_hex(16), deadline=deadline,
            min_clients=trained.quorum, train=self.models.train_settings,
            expires=deadline + ANNOUNCEMENT_GRACE_S, federation=self.federation,
        )
        self.current = OpenRound(trained.number, self.model_version, announcement, time.time(), trained.quorum,
                                 statistics=WeightedSum(), trained=trained, averaged_bn=averaged_bn,
                                 bytes_down=self.global_bytes * len(trained.accepted))
        self.publisher.announce(announcement)
        log.info("round %d: weights averaged; statistics phase open (quorum %d)", trained.number, trained.quorum)

    def _finish_round(self, current: OpenRound, phase: OpenRound | None = None) -> None:
        """Publish, evaluate and checkpoint the round's global model, then open the next round. `phase`: the
        statistics phase that followed the training phase `current` (bn_statistics: measured)."""
        if phase is None:
            self.publish_global()
            current.bytes_down = self.global_bytes * len(current.accepted)
        else:
            current.bytes_up += phase.bytes_up
            current.rejected += phase.rejected
            current.bytes_down = phase.bytes_down
            measured = _safe_statistics(phase)
            if measured is not None:
                # The weights went out with the statistics phase: only the statistics travel now.
                self.global_tensors = {**self.global_tensors, **measured}
                self.publish_global(patch=measured)
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
        checkpoint = self.state.save_round(current.number, self.global_tensors, self.models.spec,
                                           self._checkpoint_meta(), log_entry(summary, current),
                                           getattr(self.strategy, "slots", None))
        self.state.clear_accepted()  # the checkpoint now holds them
        self.models.export(checkpoint)
        self.publisher.publish_summary(summary)
        log.info(round_line(summary))
        if self.model_version < self.config.rounds and not self._privacy_budget_reached():
            self.open_round(self.model_version + 1)

    # ---- the global model ------------------------------------------------------------------------------

    def publish_global(self, patch: Tensors | None = None) -> None:
        """Hand global model v to the publisher; `patch`: its measured BatchNorm statistics only."""
        v = self.model_version
        # The one guard before anything is signed: the round's checks keep such a model from getting here.
        problem = model_problem(self.global_tensors) or (model_problem(patch) if patch is not None else None)
        if problem is not None:
            raise UnsafeModel(f"refusing to sign and publish global model v{v}: {problem}")
        delta, full_apart = None, patch is not None
        if patch is None and self.config.download_codec == INT8_DELTA:
            full_apart = True
            if self._global_delta is not None and self._global_delta[0] == v:
                delta = self._global_delta[1]
            # else (version 0, or v after a restart: no delta kept): the global topics carry the full model too
        self.global_bytes = self.publisher.publish_global(GlobalModel(v, self.global_tensors, delta, patch,
                                                                      full_apart))

    def _compress_download(self, new_tensors: Tensors, version: int) -> Tensors:
        """download_codec int8-delta: the new global model becomes what devices rebuild from the delta."""
        if self.config.download_codec != INT8_DELTA:
            return new_tensors
        wire, decoded, self._download_residual = encode_global_delta(new_tensors, self.global_tensors,
                                                                     self._download_residual)
        self._global_delta = (version, wire)
        return decoded

    # ---- evaluation and privacy ------------------------------------------------------------------------

    def _evaluate(self, round_number: int) -> dict[str, float]:
        return self.models.evaluate(round_number, self.global_tensors)

    def _dp_metrics(self, rounds_done: int) -> dict[str, float]:
        return self.dp.metrics(rounds_done) if self.dp else {}

    def _privacy_budget_reached(self) -> bool:
        """dp.epsilon_budget: no round may take epsilon past it, so training stops one round before."""
        if self.dp is None or not self.dp.budget_reached(self.model_version):
            return False
        log.warning("privacy budget reached: epsilon %.3f after round %d, one more round would spend %.3f > budget "
                    "%g (delta %g); stopping training", self.dp.epsilon(self.model_version), self.model_version,
                    self.dp.epsilon(self.model_version + 1), self.dp.config.epsilon_budget, self.dp.config.delta)
        self.budget_stopped = True
        return True

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "strategy": self.strategy.name}


def _count_accepted(current: OpenRound, update: AcceptedUpdate) -> None:
    current.accepted[update.device_id] = update.num_samples
    current.transfers[update.device_id] = update.transfer_id
    if update.train_loss is not None:
        current.train_losses[update.device_id] = update.train_loss


def _safe_statistics(phase: OpenRound) -> Tensors | None:
    """The measured BatchNorm statistics' mean, or None (keep the averaged ones) when none came or it is unfit."""
    if not phase.statistics.count:
        return None
    measured, problem = publishable(phase.statistics.mean)
    if measured is not None:
        return measured
    log.error("round %d: measured BatchNorm statistics not fit to publish (%s); keeping the averaged ones",
              phase.number, problem)
    return None


def federation_started(state_dir: Path) -> float:
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


def log_entry(summary: RoundSummary, current: OpenRound) -> dict[str, Any]:
    """The round's line in rounds.jsonl."""
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


def round_line(summary: RoundSummary) -> str:
    loss = "n/a" if summary.train_loss is None else f"{summary.train_loss:.4f}"
    acc = summary.metrics.get("val_accuracy")
    acc_text = "n/a" if acc is None else f"{acc:.4f}"
    epsilon = summary.metrics.get("epsilon")
    dp_text = "" if epsilon is None else f", epsilon {epsilon:.3f} (delta {summary.metrics['dp_delta']:g})"
    return (f"round {summary.round}: {len(summary.clients)} clients, n={summary.num_samples}, "
            f"{(summary.bytes_up + summary.bytes_down) / 1e6:.2f} MB moved, train loss {loss}, "
            f"held-out accuracy {acc_text}{dp_text}, {summary.seconds:.1f} s")
