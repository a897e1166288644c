"""The edge agent: wait for a round, fetch the global model, train locally, upload.

MQTT callbacks only enqueue; the main thread owns all state and does the training,
so a long local epoch never blocks the network thread (keepalives keep flowing).
Only backbone tensors, n_k and scalar training metrics are ever published.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass

import numpy as np

from edge_agent import refusals
from edge_agent.config import AgentConfig
from edge_agent.train_window import may_train, read_device
from edge_agent.trainer import CannotTrain, LocalTrainer
from fedwire.chunking import CompletedTransfer, Reassembler, build_transfer
from fedwire.codec import encode_tensors, sha256_hex
from fedwire.compression import (
    DEFAULT_TOPK_FRACTION,
    PLAIN,
    UPLOAD_CODECS,
    decode_update,
    encode_update,
)
from fedwire.dp import device_noise_std, privatize_update, secure_generator
from fedwire.errors import ProtocolError
from fedwire.messages import (
    DeviceStatus,
    RoundAnnouncement,
    TransferManifest,
    UpdateAck,
)
from fedwire.mqtt import MqttLink, TlsFiles
from fedwire.signing import SignatureError, load_verify_key, verify

log = logging.getLogger("facefed.agent")

POLL_S = 0.2
GLOBAL_REFETCH_S = 15.0  # re-request retained global chunks if a transfer stalls this long
ACK_TIMEOUT_S = 30.0  # send an update again if no ack came this long after it was sent
FULL_MODEL_TIMEOUT_S = 60.0  # how long one fetch of the retained full model may take (download codec fallback)


@dataclass
class GlobalModel:
    version: int
    tensors: dict[str, np.ndarray]
    sha256: str  # of the safetensors payload: a statistics patch changes the model, not its version


@dataclass
class PendingUpload:
    round: int
    manifest: TransferManifest
    chunks: list[bytes]
    attempts: int = 1
    sent_on: int | None = None  # the link's connection count when it was last fully published; None: not yet
    sent_at: float = 0.0  # time.monotonic() of that publish


class EdgeAgent:
    def __init__(self, config: AgentConfig, trainer: LocalTrainer, progress: bool = False) -> None:
        self.config = config
        self.topics = config.topics
        self.device_id = config.device_id
        self.trainer = trainer
        self.progress = progress
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.reassembler = Reassembler(timeout_s=120.0)
        self.global_model: GlobalModel | None = None
        self.announcement: RoundAnnouncement | None = None
        self.handled: set[str] = set()  # announce ids already answered
        self.upload: PendingUpload | None = None
        self.accepted: tuple[str, int, int] | None = None  # (kind, round, model version) of the last acknowledged upload
        self.finished = False
        self.rounds_trained = 0
        self.status_state = "offline"
        self.last_refusal = ""
        self.train_window = ""  # "open" or why not, as last checked (reported in the status)
        self.residual: dict[str, np.ndarray] = {}  # int8-delta error feedback, kept on the device
        self.full_fetches = 0  # download codec: full models fetched because a delta's base was missing
        self._pending_full: TransferManifest | None = None  # a delta we could not apply, until the full model came
        self._full_tried_at = 0.0
        self._waiting_since: float | None = None
        self._link: MqttLink | None = None
        self._verify_key = load_verify_key(config.aggregator_key) if config.aggregator_key else None
        self.watermark = refusals.load_watermark(config.state_dir)  # freshness: what we accepted last, persisted

    # ---- lifecycle -----------------------------------------------------------

    def run(self) -> None:
        self._connect()
        try:
            while not (self.finished and self.config.exit_when_finished):
                self._step()
        finally:
            self._set_status("offline", detail="agent stopped")
            self._link.close()

    def _connect(self) -> None:
        offline = DeviceStatus(self.device_id, "offline", None, time.time(), "connection lost").to_json()
        self._link = MqttLink(
            self.config.broker,
            client_id=f"facefed-agent-{self.device_id}",
            on_message=lambda topic, payload: self.events.put((topic, payload)),
            subscriptions=self.topics.agent_subscriptions(self.device_id),
            will=(self.topics.status(self.device_id), offline, True),
            protocol=self.config.protocol,
            tls=self._tls_files(),
            clean_session=False,  # acks sent while the connection is down wait at the broker
        )
        self._link.connect()
        log.info("%s connected to %s (MQTT %s), %d local samples", self.device_id, self.config.broker,
                 self._link.protocol_version, self.trainer.num_samples)
        self._set_status("online")

    def _step(self) -> None:
        try:
            topic, payload = self.events.get(timeout=POLL_S)
        except queue.Empty:
            pass
        else:
            self.handle_message(topic, payload)
        upload = self.upload
        if upload is not None and self._link.connected and (
                upload.sent_on != self._link.connections or time.monotonic() - upload.sent_at > ACK_TIMEOUT_S):
            # Interrupted, sent before a reconnection (a restarted broker may have lost it, or delivered it before
            # the aggregator subscribed again), or never acknowledged: send it again. The transfer id is
            # unchanged, so the aggregator counts it at most once.
            log.info("round %d: sending the unacknowledged update %s again", upload.round, upload.manifest.transfer_id)
            self._publish_upload(upload)
        now = time.time()
        for dropped in self.reassembler.expire(now):
            log.warning("dropped incomplete global model transfer %s", dropped)
        self._maybe_train(now)

    # ---- inbound -------------------------------------------------------------

    def handle_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "round":
                self._on_announcement(self._trusted(RoundAnnouncement.from_json(payload)))
            elif parsed.kind == "global_manifest":
                manifest = self._trusted(TransferManifest.from_json(payload))
                self._on_global(self.reassembler.add_manifest("global", manifest, time.time()))
            elif parsed.kind == "global_chunk":
                if payload:  # an empty retained payload only clears the topic
                    self._on_global(self.reassembler.add_chunk("global", payload, time.time()))
            elif parsed.kind == "ack":
                self._on_ack(UpdateAck.from_json(payload))
        except SignatureError as exc:
            self._refuse(f"refused {topic}: {exc}")
        except ProtocolError as exc:
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)
            if topic == self.topics.round:  # e.g. a train setting this agent does not know: say so
                self._refuse(f"refused {topic}: {exc}")
            if "global" in topic:
                self._refetch_global()

    def _refuse(self, reason: str, state: str | None = None, round_number: int | None = None) -> None:
        """Log a refusal and report it in the retained status; the agent keeps its last good state and runs on."""
        log.error("%s", reason)
        self.last_refusal = reason
        self._set_status(state or self.status_state, round_number, detail=reason)  # reported to the operator

    def _trusted(self, message):
        """Check the aggregator's signature before anything in the message is used."""
        if self._verify_key is not None:
            verify(message, self._verify_key)
        return message

    def _on_announcement(self, announcement: RoundAnnouncement) -> None:
        refusal = refusals.announcement_refusal(self.watermark, announcement, time.time(),
                                                self.config.max_clock_skew_s)
        if refusal is not None:
            self._refuse(f"refused {self.topics.round}: {refusal}")
            return
        mark = refusals.after_announcement(self.watermark, announcement)
        if mark.federation != self.watermark.federation and self.watermark.federation:
            log.info("a new federation started: forgetting the previous one's rounds")
            self.handled.clear()
            self.upload = self.accepted = None
            self._refetch_global()  # its model may have come first and been refused as older
        self._advance(mark)
        self.announcement = announcement
        self._refresh_enrolment()
        if announcement.state == "finished":
            if not self.finished:
                log.info("federation finished at round %d", announcement.round)
            self.finished = True
        else:
            self.finished = False

    def _on_global(self, completed) -> None:
        if completed is None:
            return
        manifest = completed.manifest
        if manifest.kind != "global" or manifest.sender != "aggregator":
            log.warning("ignored a global-topic transfer of kind %r from %r", manifest.kind, manifest.sender)
            return
        refusal = refusals.global_refusal(self.watermark, manifest.model_version)
        if refusal is not None:
            self._refuse(f"refused {self.topics.global_manifest}: {refusal}")
            return
        if manifest.codec != PLAIN:
            self._on_global_delta(completed)
            return
        self._pending_full = None
        self._set_global(manifest.model_version, completed.tensors, manifest.payload_sha256,
                         f"{completed.payload_bytes} bytes")

    def _set_global(self, version: int, tensors: dict[str, np.ndarray], sha256: str, how: str) -> None:
        """Adopt a verified global model, unless it is older than one accepted or not finite: then the last good
        model stays and the refusal is reported."""
        refusal = refusals.global_refusal(self.watermark, version) or refusals.first_bad_tensor(tensors)
        if refusal is not None:
            self._refuse(f"refused global model v{version}: {refusal}; keeping "
                         + ("no model" if self.global_model is None else f"v{self.global_model.version}"))
            return
        self._advance(refusals.after_global(self.watermark, version))
        self.global_model = GlobalModel(version, tensors, sha256)
        self._waiting_since = None
        log.info("global model v%d received (%d tensors, %s)", version, len(tensors), how)
        self._refresh_enrolment()

    def _on_global_delta(self, completed: CompletedTransfer) -> None:
        """Download codec (PROTOCOL.md 5.2): rebuild version v from v - 1 (a statistics patch: from v itself), or
        fetch the retained full model."""
        manifest = completed.manifest
        if self.global_model is not None and self.global_model.sha256 == manifest.model_sha256:
            return  # already rebuilt (a retained copy delivered again)
        held = None if self.global_model is None else self.global_model.version
        if held == manifest.base_version:
            try:
                tensors = decode_update(completed.tensors, self.global_model.tensors, manifest.codec)
            except ProtocolError as exc:
                log.warning("global model v%d: malformed delta (%s); fetching the full model", manifest.model_version, exc)
            else:
                if sha256_hex(encode_tensors(tensors)) == manifest.model_sha256:
                    self._pending_full = None
                    self._set_global(manifest.model_version, tensors, manifest.model_sha256,
                                     f"{manifest.codec} of v{held}, {completed.payload_bytes} bytes")
                    return
                log.warning("global model v%d: the delta does not rebuild the announced model; fetching the full model",
                            manifest.model_version)
        else:
            log.info("global model v%d is a delta against v%s but this device holds %s: fetching the full model",
                     manifest.model_version, manifest.base_version, "nothing" if held is None else f"v{held}")
        self._pending_full = manifest
        self._try_full_model(time.time())

    def _try_full_model(self, now: float) -> None:
        wanted = self._pending_full
        if wanted is None:
            return
        self._full_tried_at = now
        tensors = self._fetch_full_model(wanted.model_version, wanted.model_sha256)
        if tensors is None:
            log.warning("full global model v%d not fetched yet; trying again in %.0f s", wanted.model_version,
                        GLOBAL_REFETCH_S)
            return
        self._pending_full = None
        self.full_fetches += 1
        self._set_global(wanted.model_version, tensors, wanted.model_sha256, "full model, fallback")

    def _tls_files(self) -> TlsFiles | None:
        return self.config.tls.files() if self.config.broker.startswith("mqtts://") else None

    def _fetch_full_model(self, version: int, sha256: str) -> dict[str, np.ndarray] | None:
        """The retained full model `version` (its payload hashing to `sha256`), over a short-lived second link
        subscribed only to the full-model topics, so devices that can apply deltas never receive it."""
        events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        link = MqttLink(
            self.config.broker, client_id=f"facefed-agent-{self.device_id}-full",
            on_message=lambda topic, payload: events.put((topic, payload)),
            subscriptions=[self.topics.global_full_manifest, self.topics.global_full_chunk("+")],
            protocol=self.config.protocol,
            tls=self._tls_files(),
        )
        reassembler = Reassembler(timeout_s=FULL_MODEL_TIMEOUT_S)
        deadline = time.monotonic() + FULL_MODEL_TIMEOUT_S
        try:
            link.connect()
            while time.monotonic() < deadline:
                try:
                    topic, payload = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                try:
                    if topic == self.topics.global_full_manifest:
                        completed = reassembler.add_manifest("full", self._trusted(TransferManifest.from_json(payload)),
                                                             time.time())
                    else:
                        completed = reassembler.add_chunk("full", payload, time.time())
                except ProtocolError as exc:  # SignatureError included: a forged full model is never used
                    log.warning("full model fetch: dropped message on %s: %s", topic, exc)
                    continue
                if completed is None:
                    continue
                m = completed.manifest
                if (m.kind, m.sender, m.codec, m.model_version, m.payload_sha256) == \
                        ("global", "aggregator", PLAIN, version, sha256):
                    return completed.tensors
                log.info("full model fetch: got v%d, waiting for v%d", m.model_version, version)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.warning("full model fetch failed: %s", exc)
        finally:
            link.close()
        return None

    def _refresh_enrolment(self) -> None:
        """Face unlock: re-embed the enrolled owner's kept chips once the announced global model has arrived."""
        ann, model = self.announcement, self.global_model
        if not self.config.unlock.reembed_after_round or ann is None or model is None \
                or ann.model_version != model.version:
            return
        from edge_agent.unlock.reembed import reembed_enrolment

        try:  # the device's own model: the global one, or with its personal part (train.method camera)
            reembed_enrolment(self.config.unlock.store_dir(self.config.state_dir),
                              lambda: self.trainer.deployed(ann.train.model, model.tensors), model.version)
        except (OSError, ValueError) as exc:  # unlock keeps its old templates; training goes on
            log.warning("could not re-embed the unlock enrolment with model v%d: %s", model.version, exc)

    def _on_ack(self, ack: UpdateAck) -> None:
        upload = self.upload
        if upload is None or ack.transfer_id != upload.manifest.transfer_id:
            log.info("ignored an ack for update %s (round %d): not the update waiting for one", ack.transfer_id, ack.round)
            return
        if ack.accepted:
            log.info("round %d: %s accepted", ack.round, upload.manifest.kind)
            self.upload = None
            self.accepted = _task(upload.manifest.kind, upload.round, upload.manifest.model_version)
            self._set_status("idle", ack.round)
            return
        log.warning("round %d: update rejected: %s", ack.round, ack.reason)
        retryable = ack.reason.startswith("transfer fault")
        open_round = self.announcement is not None and self.announcement.round == ack.round
        if upload is not None and retryable and open_round and upload.attempts <= self.config.upload_retries:
            upload.attempts += 1
            log.info("resending round %d update (attempt %d)", upload.round, upload.attempts)
            self._publish_upload(upload)
        else:
            self.upload = None

    # ---- training ------------------------------------------------------------

    def _maybe_train(self, now: float) -> None:
        ann = self.announcement
        if ann is None or ann.state not in ("open", "statistics") or ann.announce_id in self.handled:
            return
        if not self.config.device.training:
            self.handled.add(ann.announce_id)
            return
        allowed, reason = may_train(self.config.device.train_window, read_device())
        self.train_window = "open" if allowed else reason
        if not allowed:
            log.info("round %d skipped: %s", ann.round, reason)
            self.handled.add(ann.announce_id)
            self._set_status("idle", ann.round, detail=f"skipped round: {reason}")
            return
        if ann.participants and self.device_id not in ann.participants:
            log.info("round %d: not sampled this round", ann.round)
            self.handled.add(ann.announce_id)
            return
        # The deadline is the aggregator's clock, not ours (ours may be off by hours): the aggregator judges it.
        task = _announced_task(ann)
        if task == self.accepted:
            log.info("round %d announced again; our %s was already accepted", ann.round, task[0])
            self.handled.add(ann.announce_id)
            return
        upload = self.upload
        if upload is not None and _task(upload.manifest.kind, upload.round, upload.manifest.model_version) == task:
            log.info("round %d announced again (the aggregator restarted?): sending our unacknowledged update again",
                     ann.round)
            self.handled.add(ann.announce_id)
            self._publish_upload(upload)
            return
        if self.global_model is None or self.global_model.version != ann.model_version:
            self._wait_for_global(now, ann)
            return
        self.handled.add(ann.announce_id)
        if ann.state == "statistics":
            self._measure_and_upload(ann)
        else:
            self._train_and_upload(ann)

    def _wait_for_global(self, now: float, ann: RoundAnnouncement) -> None:
        if self._pending_full is not None and self._pending_full.model_version == ann.model_version:
            if now - self._full_tried_at > GLOBAL_REFETCH_S:
                self._try_full_model(now)
            return
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > GLOBAL_REFETCH_S:
            log.warning("still waiting for global model v%d; re-requesting it", ann.model_version)
            self._refetch_global()
            self._waiting_since = now

    def _train_and_upload(self, ann: RoundAnnouncement) -> None:
        self._set_status("training", ann.round)
        settings = ann.train
        start = time.time()
        try:
            outcome = self.trainer.train_round(ann.round, self.global_model.tensors, settings, progress=self.progress)
        except CannotTrain as exc:  # nothing was stored: the next round starts from the last good head
            self._refuse(f"round {ann.round}: no update sent: {exc}", "idle", ann.round)
            return
        result = outcome.result
        log.info("round %d: trained %d epoch(s) on %d samples in %.1f s, loss %.4f, accuracy %.3f",
                 ann.round, result.epochs, result.num_samples, time.time() - start, result.loss, result.accuracy)
        metrics = {"train_loss": result.loss, "train_accuracy": result.accuracy, "train_seconds": result.seconds,
                   "local_epochs": float(result.epochs)}
        tensors = outcome.tensors
        if ann.dp is not None and ann.dp.mode == "distributed":  # clip and add our share of the noise here
            dp = ann.dp
            tensors = privatize_update(tensors, self.global_model.tensors, dp.clip,
                                       device_noise_std(dp.clip, dp.noise_multiplier, dp.noise_shares),
                                       secure_generator())
        manifest, chunks = build_transfer(
            "update", self.device_id, ann.round, ann.model_version,
            self._encode(tensors, settings.codec, settings.codec_topk or DEFAULT_TOPK_FRACTION),
            num_samples=result.num_samples, metrics=metrics, max_chunk_bytes=self.config.device.max_chunk_bytes,
            codec=settings.codec,
        )
        self.upload = PendingUpload(ann.round, manifest, chunks)
        self._set_status("uploading", ann.round)
        self._publish_upload(self.upload)
        self.rounds_trained += 1

    def _measure_and_upload(self, ann: RoundAnnouncement) -> None:
        """Statistics phase (bn_statistics: measured): BatchNorm statistics of the new global model on our images."""
        self._set_status("training", ann.round, detail="measuring BatchNorm statistics")
        start = time.time()
        try:
            statistics = self.trainer.measure_statistics(self.global_model.tensors, ann.train.model)
        except CannotTrain as exc:
            self._refuse(f"round {ann.round}: no BatchNorm statistics sent: {exc}", "idle", ann.round)
            return
        problem = refusals.first_bad_tensor(statistics)
        if problem is not None:
            self._refuse(f"round {ann.round}: no BatchNorm statistics sent: {problem}", "idle", ann.round)
            return
        log.info("round %d: measured BatchNorm statistics of model v%d on %d samples in %.1f s", ann.round,
                 ann.model_version, self.trainer.num_samples, time.time() - start)
        manifest, chunks = build_transfer("statistics", self.device_id, ann.round, ann.model_version, statistics,
                                          num_samples=self.trainer.num_samples,
                                          max_chunk_bytes=self.config.device.max_chunk_bytes)
        self.upload = PendingUpload(ann.round, manifest, chunks)
        self._set_status("uploading", ann.round)
        self._publish_upload(self.upload)

    def _encode(self, tensors: dict[str, np.ndarray], codec: str, topk: float = DEFAULT_TOPK_FRACTION
                ) -> dict[str, np.ndarray]:
        """Wire tensors for `codec`; the compressed codecs carry this device's quantization error to the next round."""
        if codec == PLAIN:
            return tensors
        if codec not in UPLOAD_CODECS:
            raise ProtocolError("codec", f"the aggregator asked for unknown codec {codec!r}")
        if set(self.residual) - set(tensors):
            self.residual = {}  # the model changed shape: old errors no longer apply
        wire, self.residual = encode_update(tensors, self.global_model.tensors, codec, self.residual, topk)
        return wire

    def _publish_upload(self, upload: PendingUpload) -> None:
        connections = self._link.connections
        try:
            sent = self._link.publish_transfer(
                self.topics.update_manifest(self.device_id),
                lambda i: self.topics.update_chunk(self.device_id, i),
                upload.manifest, upload.chunks,
            )
        except (ConnectionError, TimeoutError) as exc:
            upload.sent_on = None
            log.warning("round %d: upload interrupted (%s); it is sent again once the broker is back", upload.round, exc)
            return
        # Counted against the connection it started on: a reconnection during the upload means sending it again.
        upload.sent_on = connections
        upload.sent_at = time.monotonic()
        log.info("round %d: uploaded %d bytes in %d chunks", upload.round, sent, len(upload.chunks))

    def _refetch_global(self) -> None:
        # Retained messages are delivered again on a fresh subscription.
        self._link.resubscribe(self.topics.global_manifest)
        self._link.resubscribe(self.topics.global_chunk("+"))

    def _advance(self, mark: refusals.Watermark) -> None:
        if mark != self.watermark:
            refusals.save_watermark(self.config.state_dir, mark)
            self.watermark = mark

    def _set_status(self, state: str, round_number: int | None = None, detail: str = "") -> None:
        self.status_state = state
        status = DeviceStatus(self.device_id, state, round_number, time.time(), detail, profile=self.config.profile,
                              model_version=None if self.global_model is None else self.global_model.version,
                              train_window=self.train_window)
        try:
            self._link.publish(self.topics.status(self.device_id), status.to_json(), retain=True)
        except (ConnectionError, TimeoutError) as exc:  # informational: never worth stopping the agent
            log.warning("status %r not published: %s", state, exc)


def _task(kind: str, round_number: int, model_version: int) -> tuple[str, int, int]:
    """What an upload answers: training (kind update) or measuring statistics for a round and model version."""
    return kind, round_number, model_version


def _announced_task(ann: RoundAnnouncement) -> tuple[str, int, int]:
    return _task("statistics" if ann.state == "statistics" else "update", ann.round, ann.model_version)
