"""One in-process federation: the aggregator's round engine with the devices' own LocalTrainers, no broker.

Every round goes through aggregator/rounds.py exactly as the MQTT service runs it (announcement, the
engine's verdict on each upload, quorum or deadline close, the statistics phase, journal and checkpoints),
and every device trains as edge_agent's agent does (LocalTrainer.train_round on the announced settings,
its own ArcFace head kept in its state dir, its update encoded with the announced codec and its own
quantization residual). What is left out is the transport: signing, acks, the broker; the bytes each
transfer would put on the wire are counted all the same.
Every bench that federates in process and the experiment's centralized and local arms (one-device federations)
run through `run_inprocess`. Devices are registered online, so fraction_fit < 1 samples among them; dp_rng seeds
a bench's DP noise (production keeps the CSPRNG); a device with `unload` frees its backbone after each turn, so
that a fleet of 1,000 fits in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.models import FaceModels, strategy_for
from aggregator.publisher import global_transfers, transfer_bytes
from aggregator.rounds import GlobalModel, RoundEngine
from edge_agent.trainer import LocalTrainer, TrainingDiverged
from fedwire.chunking import DEFAULT_MAX_CHUNK_BYTES, CompletedTransfer, build_transfer
from fedwire.compression import DEFAULT_TOPK_FRACTION, PLAIN, encode_update
from fedwire.dp import delta_of, l2_norm
from fedwire.messages import RoundAnnouncement, RoundSummary

log = logging.getLogger("facefed.inprocess")

Tensors = dict[str, np.ndarray]
# (round announcement, this device's honest update, the round's global model) -> what the device sends
Tamper = Callable[[RoundAnnouncement, Tensors, Tensors], Tensors]


@dataclass
class Device:
    device_id: str
    trainer: LocalTrainer
    tamper: Tamper | None = None  # sees each honest update, returns what is sent (bench/robust_aggregation.py)
    residual: Tensors = field(default_factory=dict)  # compressed codecs: the error carried to the next round
    upload_bytes: list[int] = field(default_factory=list)  # per upload: what the transfer puts on the wire
    update_norms: list[float] = field(default_factory=list)  # per update: L2 distance of the sent model from the global
    unload: bool = False  # free the trainer's backbone after each turn (LocalTrainer.unload)


@dataclass
class Recorder:
    """The engine's Publisher in process: keeps every announcement and summary and the bytes of each global
    model transfer (what devices download)."""

    announcements: list[RoundAnnouncement] = field(default_factory=list)
    summaries: list[RoundSummary] = field(default_factory=list)
    download_bytes: list[int] = field(default_factory=list)

    def announce(self, announcement: RoundAnnouncement) -> None:
        self.announcements.append(announcement)

    def publish_global(self, model: GlobalModel) -> int:
        sent, _ = global_transfers(model, DEFAULT_MAX_CHUNK_BYTES)
        self.download_bytes.append(transfer_bytes(sent))
        return self.download_bytes[-1]

    def publish_summary(self, summary: RoundSummary) -> None:
        self.summaries.append(summary)


class InProcessModels(FaceModels):
    """The config's face model, with the initial tensors and the held-out evaluation a caller gives."""

    def __init__(self, config: AggregatorConfig, initial: Tensors | None = None,
                 evaluate: Callable[[int, Tensors], dict[str, float]] | None = None) -> None:
        super().__init__(config)
        self._initial = initial
        self._evaluate = evaluate

    def initial_tensors(self) -> Tensors:
        return super().initial_tensors() if self._initial is None else dict(self._initial)

    def evaluate(self, round_number: int, tensors: Tensors) -> dict[str, float]:
        if self._evaluate is None:
            return super().evaluate(round_number, tensors)
        return self._evaluate(round_number, tensors)


def run_inprocess(config: AggregatorConfig, devices: list[Device], models: InProcessModels | None = None,
                  dp_rng: np.random.Generator | None = None) -> RoundEngine:
    """Run `config.rounds` rounds (fewer if a DP budget stops them); returns the engine, whose state dir holds
    the checkpoints and rounds.jsonl and whose publisher (a Recorder) the summaries. Every device is online from
    the start, so fraction_fit < 1 samples among them as the engine samples a live fleet. Each phase closes once
    every sampled device answered: by quorum, or as at its deadline with what was accepted.

    dp_rng: the DP noise's generator, seeded for a bench's repeatable runs (None: the engine's cryptographic one).
    """
    strategy, dp = strategy_for(config, dp_rng)
    engine = RoundEngine(config, strategy, models or InProcessModels(config), Recorder(), dp=dp)
    engine.restore_or_init()
    for device in devices:
        engine.device_state(device.device_id, "online")
    engine.start()
    while not engine.done:
        ann = engine.current.announcement
        accepted = sum(_upload(engine, device, ann) for device in devices
                       if not ann.participants or device.device_id in ann.participants)
        if not accepted and ann.state == "open":
            raise RuntimeError(f"round {ann.round}: no device's update was accepted")
        engine.tick(ann.deadline)  # every device had its turn: close as the deadline would
    return engine


def _upload(engine: RoundEngine, device: Device, ann: RoundAnnouncement) -> bool:
    """One device's turn in the phase `ann` announces, as edge_agent's agent takes it; True if accepted."""
    try:
        return _turn(engine, device, ann)
    finally:
        if device.unload:
            device.trainer.unload()


def _turn(engine: RoundEngine, device: Device, ann: RoundAnnouncement) -> bool:
    start = time.perf_counter()
    if ann.state == "statistics":
        kind, metrics = "statistics", {}
        tensors = device.trainer.measure_statistics(engine.global_tensors, ann.train.model)
    else:
        kind = "update"
        try:
            outcome = device.trainer.train_round(ann.round, engine.global_tensors, ann.train)
        except TrainingDiverged as exc:
            log.warning("round %d: %s sends no update: %s", ann.round, device.device_id, exc)
            return False
        result = outcome.result
        metrics = {"train_loss": result.loss, "train_accuracy": result.accuracy, "train_seconds": result.seconds,
                   "local_epochs": float(result.epochs)}
        tensors = outcome.tensors
        if device.tamper is not None:
            tensors = device.tamper(ann, tensors, engine.global_tensors)
        device.update_norms.append(l2_norm(delta_of(tensors, engine.global_tensors)))
        tensors, device.residual = encode_update(tensors, engine.global_tensors, ann.train.codec, device.residual,
                                                 ann.train.codec_topk or DEFAULT_TOPK_FRACTION)
    codec = ann.train.codec if kind == "update" else PLAIN
    manifest, chunks = build_transfer(kind, device.device_id, ann.round, ann.model_version, tensors,
                                      num_samples=device.trainer.num_samples, metrics=metrics, codec=codec)
    device.upload_bytes.append(transfer_bytes((manifest, chunks)))
    engine.received_bytes(device.upload_bytes[-1])
    verdict = engine.screen(device.device_id, manifest)
    if verdict is None:
        verdict = engine.accept(device.device_id, CompletedTransfer(manifest, tensors, manifest.payload_bytes))
    log.info("round %d: %s %s in %.1f s: %s", ann.round, device.device_id, kind, time.perf_counter() - start,
             "accepted" if verdict and verdict.accepted else f"refused ({verdict.reason if verdict else 'ignored'})")
    return bool(verdict and verdict.accepted)
