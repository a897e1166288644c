"""Scale-out aggregation: W workers share the update stream through an MQTT 5 shared subscription,
each keeps a partial float64 weighted sum, and a reducer adds the partial sums into the FedAvg result.

Design (fedwire/PROTOCOL.md section 11, docs/scale-out.md):
* Workers subscribe to `$share/facefed-aggregators/{p}/update/+/manifest` and `.../chunk/+`; the broker
  hands each message to one worker. A device's upload is many messages (chunks, then the manifest), so
  every device has one **owner** worker, `crc32(device_id) % W`. A worker that receives a message of a
  device it does not own republishes it unchanged on `{p}/shard/route/{owner}/update/{dev}/...`, which only
  the owner subscribes to. The owner thus sees the whole upload and runs the normal reassembly,
  validation, acknowledgement and streaming sum of AggregatorService on it: exact, with no new rules.
* The owner acks the device and tells the reducer (`{p}/shard/accepted/{w}`), which counts towards the
  quorum. At quorum or deadline the reducer publishes `{p}/shard/close` (retained); each worker then stops
  accepting for that round, publishes its sum Σ n_k·w_k (float64 safetensors, as a chunked transfer on
  `{p}/shard/partial/{w}/...`) and a `ShardReport` listing the devices in it. The reducer merges the W
  partial sums (WeightedSum.merge: float64 addition) and closes the round exactly as the single-process
  service does (strategy step, checkpoint, global model, summary, next announcement).

Worker and reducer each run the round engine (aggregator/rounds.py) with the service's connection, intake
and publisher: the worker only collects (RoundEngine.begin, accept), the reducer opens and closes rounds.
The single-process service stays the default (`shard_workers: 1`); this module is used only when
`shard_workers` > 1.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.connection import Connection, Event, handle
from aggregator.rounds import Close, Verdict, close_check
from aggregator.service import assemble
from aggregator.strategies import WeightedSum
from fedwire.chunking import CompletedTransfer, Reassembler, build_transfer
from fedwire.errors import ProtocolError
from fedwire.messages import DeviceStatus, RoundAnnouncement, ShardAccepted, ShardClose, ShardReport, TransferManifest
from fedwire.mqtt import MqttLink
from fedwire.topics import ShardTopics

log = logging.getLogger("facefed.aggregator.sharded")

WORKER_STOP_TIMEOUT_S = 30.0


# ---- pure helpers ------------------------------------------------------------------------------------

def owner(device_id: str, workers: int) -> int:
    """The worker that aggregates `device_id`'s updates: stable across processes and machines."""
    return zlib.crc32(device_id.encode("utf-8")) % workers


# ---- the link -------------------------------------------------------------------------------------------

def _v5_only(config: AggregatorConfig, client_id: str, state_dir: Path | None = None) -> AggregatorConfig:
    return dataclasses.replace(config, protocol="5", client_id=client_id, state_dir=state_dir or config.state_dir)


def _connect_v5(connection: Connection, subscriptions: list[str]) -> MqttLink:
    """Connect with MQTT 5 and explain a refusal: the broker must offer shared subscriptions."""
    try:
        return connection.connect(subscriptions)
    except ConnectionError as exc:
        raise ConnectionError(
            f"{exc} -- sharded aggregation (shard_workers > 1) needs an MQTT 5 broker with shared subscriptions "
            "(mosquitto >= 1.6, EMQX, HiveMQ, VerneMQ); amqtt, the embedded broker, speaks only MQTT 3.1.1") from exc


class _ShardProcess:
    """What worker and reducer share: the round engine on a connection, with the service's intake and publisher."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.topics = config.topics
        self.shard = ShardTopics(config.topic_prefix)
        self.workers = config.shard_workers
        self.parts = assemble(config, on_round_open=self._round_opened, on_verdict=self._verdict)
        self.engine, self.connection, self.intake, self.publisher = (self.parts.engine, self.parts.connection,
                                                                     self.parts.intake, self.parts.publisher)

    @property
    def link(self) -> MqttLink:
        return self.connection.link

    def _connect(self, subscriptions: list[str]) -> None:
        self.publisher.link = _connect_v5(self.connection, subscriptions)

    def _round_opened(self) -> None:
        pass  # the reducer resets its count of the workers' acceptances

    def _verdict(self, verdict: Verdict) -> None:
        pass  # only a worker reports its verdicts

    def _handle_next_event(self) -> None:
        event = self.connection.next_event()
        if event is not None:
            self.handle_event(event)

    def handle_event(self, event: Event) -> None:
        handle(event, self.handle_message)

    def handle_message(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.connection.close()


# ---- worker ----------------------------------------------------------------------------------------------

class ShardWorker(_ShardProcess):
    """Aggregates the updates of the devices it owns into a partial sum; the reducer runs the rounds."""

    def __init__(self, config: AggregatorConfig, index: int) -> None:
        if not 0 <= index < config.shard_workers:
            raise ValueError(f"worker index {index} is not in [0, {config.shard_workers})")
        # Each worker journals the updates it accepted in its own state folder (restored after a restart).
        super().__init__(_v5_only(config, f"{config.client_id}-shard-{index}", config.state_dir / f"shard-{index}"))
        self.index = index
        self.global_reassembler = Reassembler(timeout_s=config.round_timeout_s)
        self.closed_round: int | None = None
        self.pending_close: ShardClose | None = None  # a close seen before its round's announcement
        self.forwarded = 0
        self.finished = False
        self._forward_link: MqttLink | None = None  # publishes the forwarded copies (see handle_event)

    def run(self) -> None:
        """Serve until the reducer announces that the federation finished."""
        try:
            self._connect(self.shard.worker_subscriptions(self.index))
            url = self.link.url
            self._forward_link = MqttLink(url, f"{self.config.client_id}-forward", lambda topic, payload: None, [],
                                          protocol="5",
                                          tls=self.config.tls.files() if url.startswith("mqtts://") else None)
            self._forward_link.connect()
            self._publish_worker_state("online")
            log.info("shard worker %d of %d ready", self.index, self.workers)
            while not self.finished:
                self._handle_next_event()
                self.connection.reload_revoked()
                self.intake.expire(time.time())
        finally:
            self.close()

    def handle_event(self, event: Event) -> None:
        topic, payload, ack = event
        target = self._foreign_owner(topic)
        if target is None:
            super().handle_event(event)
            return
        # The device's message is acknowledged once the broker holds the forwarded copy, so a worker that dies
        # in between gets it again. Until then it keeps its place in the window, so forwarded copies waiting for
        # their PUBACK count towards the window's bound (without that, 400 of them, 76 MB, waited in paho's
        # outgoing queue at N = 100). Their PUBACKs come in on the second connection, whose network thread reads
        # on while this link's waits for the window.
        try:
            self._forward_link.publish_nowait(self.shard.route(target, topic), payload, on_acked=ack)
        except ConnectionError as exc:
            log.warning("could not forward %s to worker %d: %s", topic, target, exc)
            ack()  # the device gets no update ack and resends
            return
        self.forwarded += 1

    def _foreign_owner(self, topic: str) -> int | None:
        """The worker owning the device of an update message that reached this one, if it is another."""
        if topic.startswith(f"{self.shard.prefix}/shard/"):
            return None
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError:
            return None
        if parsed.kind not in ("update_manifest", "update_chunk"):
            return None
        target = owner(parsed.device_id, self.workers)
        return None if target == self.index else target

    def handle_message(self, topic: str, payload: bytes) -> None:
        routed = self.shard.unroute(topic, self.index)
        if routed is not None:  # another worker forwarded one of our devices' messages
            self.intake.handle_message(routed, payload)
            return
        try:
            if topic == self.shard.close:
                self._on_close(ShardClose.from_json(payload))
                return
            parsed = self.topics.parse(topic)
            if parsed.kind in ("update_manifest", "update_chunk"):  # our own device's: handle_event forwards others'
                self.intake.handle_message(topic, payload)
            elif parsed.kind == "round":
                self._on_announcement(RoundAnnouncement.from_json(payload))
            elif parsed.kind == "global_manifest":
                manifest = TransferManifest.from_json(payload)
                self._on_global(self.global_reassembler.add_manifest("global", manifest, time.time()))
            elif parsed.kind == "global_chunk":
                self._on_global(self.global_reassembler.add_chunk("global", payload, time.time()))
        except ProtocolError as exc:
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)

    def _on_global(self, completed: CompletedTransfer | None) -> None:
        if completed is not None:
            self.engine.global_tensors = completed.tensors
            self.engine.model_version = completed.manifest.model_version

    def _on_announcement(self, ann: RoundAnnouncement) -> None:
        if ann.state == "finished":
            self.finished = True
            return
        current = self.engine.current
        if current is not None and current.number == ann.round:
            # The same round announced again (a new deadline, or a restarted reducer): keep the partial sum
            # and tell the reducer again what it holds, so a reducer that lost count can close the round.
            current.announcement = ann
            for device_id, num_samples in current.accepted.items():
                self._publish_accepted(ShardAccepted(current.number, self.index, device_id, num_samples))
            self._apply_pending_close()
            return
        if ann.round == self.closed_round:
            return  # the retained announcement of a round already closed, seen again
        if current is not None:
            log.warning("round %d replaced by round %d before the reducer closed it", current.number, ann.round)
        if self.engine.model_version != ann.model_version:
            log.warning("round %d trains from model v%d but this worker holds v%d",
                        ann.round, ann.model_version, self.engine.model_version)
        self.engine.begin(ann)  # restores the updates journaled before a restart; drops journals of other rounds
        self.forwarded = 0
        self._apply_pending_close()

    def _apply_pending_close(self) -> None:
        close, self.pending_close = self.pending_close, None
        if close is not None:
            self._on_close(close)

    def _verdict(self, verdict: Verdict) -> None:
        if verdict.accepted:  # the engine recorded the device (and n_k) before its verdict
            self._publish_accepted(ShardAccepted(verdict.round, self.index, verdict.device_id,
                                                 self.engine.current.accepted[verdict.device_id]))

    def _publish_accepted(self, accepted: ShardAccepted) -> None:
        # Not waiting for the PUBACK: while a publish of ours waits, the link reads past its window (fedwire/mqtt.py),
        # and under a burst that answer sits behind hundreds of queued chunks, which all came in meanwhile (up to
        # 630 messages, ~160 MB, per worker at N = 100). paho resends it after a reconnection; a reducer that missed
        # it anyway hears it again when it announces the round again.
        self.link.publish_nowait(self.shard.accepted(self.index), accepted.to_json())

    def _on_close(self, close: ShardClose) -> None:
        current = self.engine.current
        if current is None:
            if close.round != self.closed_round:
                # After a restart the retained close may arrive before the retained announcement.
                self.pending_close = close
            return
        if close.announce_id != current.announcement.announce_id:
            return  # a retained close of an earlier round (or of an earlier federation under this prefix)
        acc = self.engine.strategy.partial_sum
        transfer_id = ""
        if acc.count:
            manifest, chunks = build_transfer(
                "update", f"shard-{self.index}", current.number, current.model_version, acc.sums,
                num_samples=acc.total_weight, metrics={"count": float(acc.count)},
                max_chunk_bytes=self.config.max_chunk_bytes)
            self.link.publish_transfer(self.shard.partial_manifest(self.index),
                                       lambda i: self.shard.partial_chunk(self.index, i), manifest, chunks)
            transfer_id = manifest.transfer_id
        report = ShardReport(current.number, self.index, transfer_id, dict(current.accepted),
                             dict(current.train_losses), current.bytes_up, current.rejected, self.forwarded)
        self.link.publish(self.shard.report(self.index), report.to_json())
        log.info("round %d closed on worker %d: %d updates, %d messages forwarded",
                 current.number, self.index, acc.count, self.forwarded)
        self.closed_round, self.engine.current = current.number, None

    def _publish_worker_state(self, state: str) -> None:
        current = self.engine.current
        status = DeviceStatus(f"shard-{self.index}", state, current.number if current else None, time.time())
        self.link.publish(self.shard.worker_status(self.index), status.to_json(), retain=True)

    def close(self) -> None:
        if self.link is not None and self.link.connected:
            self._publish_worker_state("offline")
        if self._forward_link is not None:
            self._forward_link.close()
            self._forward_link = None
        super().close()


# ---- reducer ---------------------------------------------------------------------------------------------

class ShardReducer(_ShardProcess):
    """The aggregator of record: announces rounds, publishes global models, keeps the state directory;
    it counts the workers' acceptances for the quorum and merges their partial sums."""

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__(_v5_only(config, config.client_id))
        # Partial sums are float64: twice the bytes of a float32 update.
        self.partials = Reassembler(max_payload_bytes=2 * config.max_update_bytes, timeout_s=config.round_timeout_s)
        self.progress: dict[str, int] = {}  # devices the workers accepted this round -> n_k
        self.reports: dict[int, ShardReport] = {}
        self.partial_transfers: dict[int, CompletedTransfer] = {}
        self.closing_since: float | None = None
        self.online_workers: set[int] = set()

    def run(self) -> None:
        """Serve until all configured rounds are complete."""
        try:
            self.engine.restore_or_init()
            self._connect(self.shard.reducer_subscriptions())
            self._wait_for_workers()
            self.engine.start()
            while not self.engine.done:
                self._handle_next_event()
                self.parts.keep_up()
                self.tick(time.time())
            self.publisher.announce(self.engine.finished_announcement())
        finally:
            self.close()

    def _wait_for_workers(self) -> None:
        """Updates published before any worker subscribed would reach no one (the broker keeps no messages for a
        shared subscription nobody holds): wait until every worker is online."""
        deadline = time.monotonic() + self.config.round_timeout_s
        while len(self.online_workers) < self.workers:
            if time.monotonic() > deadline:
                raise ConnectionError(f"only workers {sorted(self.online_workers)} of {self.workers} came online "
                                      f"within {self.config.round_timeout_s:.0f} s (start them with "
                                      "`facefed-aggregator worker --index I`)")
            self._handle_next_event()
        log.info("all %d shard workers online", self.workers)

    def handle_message(self, topic: str, payload: bytes) -> None:
        parsed = self.shard.parse(topic)
        if parsed is None:
            self.intake.handle_message(topic, payload)  # device status
            return
        kind, worker = parsed
        current = self.engine.current
        try:
            if worker >= self.workers:
                raise ProtocolError("topic", f"worker {worker} is not one of the {self.workers} configured")
            if kind == "worker":
                status = DeviceStatus.from_json(payload)
                if status.state == "online":
                    self.online_workers.add(worker)
                else:
                    self.online_workers.discard(worker)
            elif kind == "accepted":
                accepted = ShardAccepted.from_json(payload)
                if current is not None and accepted.round == current.number:
                    self.progress[accepted.device_id] = accepted.num_samples
            elif kind == "report":
                report = ShardReport.from_json(payload)
                if current is not None and report.round == current.number and report.worker == worker:
                    self.reports[worker] = report
            elif kind == "partial_manifest":
                self._on_partial(worker, self.partials.add_manifest(f"shard-{worker}",
                                                                     TransferManifest.from_json(payload), time.time()))
            else:
                self._on_partial(worker, self.partials.add_chunk(f"shard-{worker}", payload, time.time()))
        except ProtocolError as exc:
            log.warning("dropped message on %s (%d bytes): %s", topic, len(payload), exc)

    def _on_partial(self, worker: int, completed: CompletedTransfer | None) -> None:
        current = self.engine.current
        if completed is not None and current is not None and completed.manifest.round == current.number:
            self.partial_transfers[worker] = completed

    def _round_opened(self) -> None:
        self.progress, self.reports, self.partial_transfers, self.closing_since = {}, {}, {}, None

    def tick(self, now: float) -> None:
        """The engine's close rule on the workers' count; then collect their partial sums and reduce."""
        current = self.engine.current
        if current is None:
            return
        for dropped in self.partials.expire(now):
            log.warning("dropped incomplete partial sum %s", dropped)
        if self.closing_since is None:
            decision = close_check(len(self.progress), current.quorum, now, current.announcement.deadline)
            if decision is Close.CLOSE:
                self.closing_since = now
                self.link.publish(self.shard.close,
                                  ShardClose(current.number, current.announcement.announce_id).to_json(), retain=True)
                log.info("round %d: %d updates accepted by the workers, collecting partial sums",
                         current.number, len(self.progress))
            elif decision is Close.EMPTY:
                self.engine.reannounce_empty()
        elif self._all_partials_in() or now - self.closing_since > self.config.round_timeout_s:
            self._reduce()

    def _all_partials_in(self) -> bool:
        if len(self.reports) < self.workers:
            return False
        return all(not r.transfer_id or (w in self.partial_transfers
                                         and self.partial_transfers[w].manifest.transfer_id == r.transfer_id)
                   for w, r in self.reports.items())

    def _reduce(self) -> None:
        engine, current = self.engine, self.engine.current
        missing = sorted(set(range(self.workers)) - set(self.reports))
        if missing:
            log.error("round %d: no partial sum from workers %s in time; their updates are left out",
                      current.number, missing)
        dtypes = {name: value.dtype for name, value in engine.global_tensors.items()}
        for worker, report in sorted(self.reports.items()):
            current.bytes_up += report.bytes_up
            current.rejected += report.rejected
            transfer = self.partial_transfers.get(worker)
            if not report.transfer_id or transfer is None or transfer.manifest.transfer_id != report.transfer_id:
                continue
            try:
                check_report(report, transfer.manifest)
                engine.strategy.merge(WeightedSum.from_sums(transfer.tensors, dtypes, report_weight(report),
                                                            len(report.clients)))
            except ValueError as exc:
                log.error("round %d: partial sum of worker %d refused: %s", current.number, worker, exc)
                continue
            current.accepted.update(report.clients)
            current.train_losses.update(report.train_losses)
        if engine.strategy.num_updates == 0:
            log.warning("round %d: no partial sum arrived: announcing it again", current.number)
            engine.open_round(current.number)
            return
        engine.close_round()


def report_weight(report: ShardReport) -> int:
    return sum(report.clients.values())


def check_report(report: ShardReport, manifest: TransferManifest) -> None:
    """A worker's report and its partial-sum transfer must describe the same updates."""
    if manifest.num_samples != report_weight(report):
        raise ValueError(f"partial sum weighs {manifest.num_samples}, its report lists {report_weight(report)}")
    if manifest.metrics.get("count") != len(report.clients):
        raise ValueError(f"partial sum counts {manifest.metrics.get('count')} updates, its report lists "
                         f"{len(report.clients)}")
    if any(spec.dtype != "F64" for spec in manifest.tensors):
        raise ValueError("partial sums travel as float64")


# ---- processes ---------------------------------------------------------------------------------------------

def worker_command(config_path: Path, index: int, overrides: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "aggregator", "worker", "--config", str(config_path), "--index", str(index),
            *overrides]


def run_sharded(config: AggregatorConfig, config_path: Path | None = None, overrides: Sequence[str] = ()) -> None:
    """Run the reducer; with config_path, also start the shard_workers worker processes on this machine."""
    workers = [subprocess.Popen(worker_command(config_path, i, overrides)) for i in range(config.shard_workers)] \
        if config_path is not None else []
    grace = 0.0  # if the reducer fails, stop the workers at once
    try:
        ShardReducer(config).run()
        grace = WORKER_STOP_TIMEOUT_S  # they stop on the "finished" announcement
    finally:
        for process in workers:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()
