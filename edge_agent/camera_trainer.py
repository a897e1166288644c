"""train.method "camera" on a device: the face-api descriptor adapted to this device's camera for its owner(s).

What the device reads (edge_agent.config.CameraTrainingSettings; docs/camera-domain.md says why a real device
has each): its camera frames of its owner(s) (`data`, a folder per person), their clean enrolment photos (the
unlock store's enrolled chips unless a folder is named), the public face bank shipped with the model, and what
it knows of its camera: measured on those frames and photos ("measured"), a named domain, or "clean" for
nothing.

Each round the announced shared part (per-channel scales and shifts, FaceApiResNet shared: scale_shift) comes
in, model_zoo.camera_adapt.adapt trains it with this device's personal part, and the shared part goes out. The
personal part never leaves the device (state_dir/camera_personal.safetensors); the device's own model, global
shared part plus personal part, is what unlock runs (deployed()).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from edge_agent.config import CameraTrainingSettings
from edge_agent.refusals import first_bad_tensor
from edge_agent.trainer import CannotTrain, RoundResult, TrainingDiverged, save_private
from fedwire.messages import TrainSettings
from model_zoo.backbones import MACHINE_LOCAL_KWARGS, FaceApiResNet, build_backbone
from model_zoo.camera import parse_camera
from model_zoo.camera_measure import MEASURED, measure_camera
from model_zoo.camera_adapt import (AdaptConfig, AdaptDiverged, DeviceData, RoundStats, Teacher, adapt, embed,
                                    get_tensors, set_tensors, teacher_for)
from model_zoo.checkpoint import load_shared_tensors, shared_tensors
from model_zoo.data import load_dataset
from model_zoo.train import TrainResult

log = logging.getLogger("edge_agent.camera_trainer")


@dataclass
class CameraData:
    """What a camera-training device holds, loaded: its DeviceData, its members' names, the public bank."""

    device: DeviceData
    members: list[str]  # data.people() indexes these
    bank: np.ndarray  # uint8 [B, 112, 112, 3]
    bank_descriptors: torch.Tensor | None = None  # version 0's of the bank where shipped with it; else computed


def load_camera_data(frames_dir: Path, settings: CameraTrainingSettings, store_dir: Path) -> CameraData:
    """The frames (a folder per person), the enrolment (a folder per person, else unlock's store) and the bank.
    A person with frames but no enrolment is a ValueError naming them: their frames would have no target."""
    frames = load_dataset(frames_dir, layout="folders")
    if settings.enrolment is not None:
        enrolled = load_dataset(settings.enrolment, layout="folders")
        enrolment = {name: enrolled.images[enrolled.labels == k] for k, name in enumerate(enrolled.identities)}
    else:
        from edge_agent.unlock.store import TemplateStore

        enrolment = {e.name: e.chips for e in TemplateStore(store_dir).load_all()}
    missing = sorted(set(frames.identities) - set(enrolment))
    if missing:
        where = settings.enrolment or f"the unlock store {store_dir}"
        raise ValueError(f"frames of {', '.join(missing)} but no enrolment of them in {where}")
    members = sorted(enrolment)
    bank_set = load_dataset(settings.bank, layout="folders")
    keep = np.concatenate([np.flatnonzero(bank_set.labels == k)[:settings.bank_per_identity]
                           for k in range(bank_set.num_classes)])
    member_of_frame = np.array([members.index(frames.identities[label]) for label in frames.labels])
    photos = np.concatenate([enrolment[m] for m in members])
    if settings.camera == MEASURED:
        camera = measure_camera(frames.images, photos)
        log.info("camera measured on %d frames and %d enrolment photos: %s", len(frames.images), len(photos),
                 camera.describe())
    else:
        camera = parse_camera(settings.camera)
    device = DeviceData(photos, frames.images, camera,
                        np.concatenate([np.full(len(enrolment[m]), i) for i, m in enumerate(members)]),
                        member_of_frame)
    return CameraData(device, members, bank_set.images[keep])


class CameraTrainer:
    """LocalTrainer's surface for train.method "camera" (the agent drives either).

    trunk_precision "int8": the announced net's frozen trunk (trainable last, last2 or projection) runs int8,
    calibrated on this device's own images, as its int8 export deploys it. personalise False: the personal part
    stays at version 0 (a device that does not personalise; the camera experiment's fedavg arm). draws: the
    generator of each round's batches and camera draws (default: from seed and the round).

    data: what the device holds, or a callable that reads it afresh each round (an agent's: unlock keeps adding
    frames). New data rebuilds the net, so version 0's descriptors and an int8 trunk's calibration follow it."""

    def __init__(self, data: CameraData | Callable[[], CameraData], state_dir: Path, seed: int,
                 trunk_precision: str = "fp32", threads: int = 1, personalise: bool = True,
                 draws: Callable[[int], np.random.Generator] | None = None) -> None:
        self._source = data if callable(data) else (lambda: data)
        self.data: CameraData | None = None  # as last read
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.personal_path = self.state_dir / "camera_personal.safetensors"
        self.trunk_precision, self.threads, self.personalise = trunk_precision, threads, personalise
        self.draws = draws or (lambda round_number: np.random.default_rng([seed, round_number]))
        self.rounds: list[RoundStats] = []  # what each round trained: loss terms and CPU seconds
        self._model: FaceApiResNet | None = None
        self._model_spec: dict[str, Any] | None = None
        self._version0: dict[str, np.ndarray] = {}  # every parameter as built: the pretrained weights
        self._teacher: Teacher | None = None
        self._bank: tuple[str, torch.Tensor] | None = None  # (sha256 of the bank's pixels, version 0's descriptors)

    @property
    def num_samples(self) -> int:
        """The owner frames it trains on (as last read; 0 before)."""
        return 0 if self.data is None else len(self.data.device.frames)

    def _load(self) -> CameraData:
        try:
            data = self._source()
        except (ValueError, OSError) as exc:  # no enrolment or no frames yet: this round is skipped, not fatal
            raise CannotTrain(f"nothing to adapt on yet: {exc}") from None
        if data is not self.data:
            self.data, self._model = data, None
        return data

    def train_round(self, round_number: int, global_tensors: dict[str, np.ndarray], settings: TrainSettings,
                    progress: bool = False) -> RoundResult:
        """adapt() on the announced settings; non-finite values raise TrainingDiverged before anything is stored."""
        if settings.method != "camera":
            raise CannotTrain(f"this device is set up for train.method camera (camera_training in its config); "
                              f"the round asks for {settings.method}")
        self._load()
        model = self.own_model(settings.model, global_tensors)
        shared_names, personal_names = model.parts()
        personal_names = personal_names if self.personalise else []
        cfg = AdaptConfig.announced(settings.camera)
        try:
            stats = adapt(model, shared_names + personal_names, self._version0, self.data.device, self._teacher, cfg,
                          self.draws(round_number))
        except AdaptDiverged as exc:
            raise TrainingDiverged(str(exc)) from None
        tensors = shared_tensors(model)
        personal = get_tensors(model, personal_names)
        problem = first_bad_tensor(tensors) or first_bad_tensor(personal)
        if problem is not None:
            raise TrainingDiverged(f"camera adaptation diverged: {problem}")
        if personal:
            save_private(self.personal_path, personal, {"model": self._model_spec, "members": self.data.members})
        self.rounds.append(stats)
        log.info("round %d: camera adaptation, %d steps, loss %.4f (%s)", round_number, cfg.steps, stats.loss,
                 ", ".join(f"{k} {v:.3f}" for k, v in stats.terms.items()))
        return RoundResult(tensors, TrainResult(stats.loss, 0.0, self.num_samples, stats.cpu_seconds, 1))

    def measure_statistics(self, global_tensors: dict[str, np.ndarray], model_spec: dict[str, Any]):
        raise CannotTrain("the face-api descriptor has no BatchNorm statistics to measure")

    def unload(self) -> None:
        self._model, self._model_spec, self._version0, self._teacher = None, None, {}, None

    def deployed(self, model_spec: dict[str, Any], global_tensors: dict[str, np.ndarray]
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(spec, tensors) of this device's own model: the global shared part with its personal part, as a whole
        net (shared: tail) that unlock and `facefed evaluate --model` load like any checkpoint."""
        model = self.own_model(model_spec, global_tensors)
        whole = FaceApiResNet(trainable=model.arch_kwargs["trainable"])
        load_shared_tensors(whole, {n: t for n, t in model.tail.state_dict(prefix="tail.").items()})
        return {"arch": FaceApiResNet.arch, **{k: v for k, v in whole.arch_kwargs.items()
                                              if k not in MACHINE_LOCAL_KWARGS}}, shared_tensors(whole)

    def own_model(self, model_spec: dict[str, Any], global_tensors: dict[str, np.ndarray]) -> FaceApiResNet:
        """This device's net in place: version 0, the global shared part over it, then its personal part."""
        if self.data is None:
            self._load()
        model = self._model_for(model_spec)
        set_tensors(model, self._version0)
        load_shared_tensors(model, global_tensors)
        set_tensors(model, self.personal_part())
        return model

    def personal_part(self) -> dict[str, np.ndarray]:
        """The personal part this device keeps (version 0's until it first trained one)."""
        return self._stored_personal(self._model.parts()[1])

    def _model_for(self, model_spec: dict[str, Any]) -> FaceApiResNet:
        spec = {k: v for k, v in model_spec.items() if k not in MACHINE_LOCAL_KWARGS}
        if self._model is None or spec != self._model_spec:
            kwargs = {k: v for k, v in spec.items() if k != "arch"}
            if spec.get("arch") != FaceApiResNet.arch or kwargs.get("shared") != "scale_shift":
                raise CannotTrain(f"train.method camera needs model arch {FaceApiResNet.arch} with shared: "
                                  f"scale_shift, the round announces {spec}")
            model = build_backbone(FaceApiResNet.arch, **kwargs)
            self._version0 = get_tensors(model, [n for n, _ in model.named_parameters()])
            # Version 0's descriptors are the fp32 net's on every device profile, as shipped with the bank.
            self._teacher = teacher_for(model, self.data.device, self.data.bank, self._bank_descriptors(model))
            if self.trunk_precision == "int8":
                if model.arch_kwargs["trainable"] == "all":
                    raise CannotTrain("trunk_precision int8 needs a frozen trunk to run int8: the round announces "
                                      "trainable all")
                from model_zoo.export import quantize_trunk

                quantize_trunk(model, np.concatenate([self.data.device.enrolment, self.data.device.frames]),
                               self.threads)
            self._model, self._model_spec = model, spec
        return self._model

    def _bank_descriptors(self, version0: FaceApiResNet) -> torch.Tensor:
        """Version 0's descriptors of the bank: as shipped with it, else computed once per bank."""
        if self.data.bank_descriptors is not None:
            return self.data.bank_descriptors
        key = hashlib.sha256(np.ascontiguousarray(self.data.bank).tobytes()).hexdigest()
        if self._bank is None or self._bank[0] != key:
            self._bank = (key, torch.from_numpy(embed(version0, self.data.bank)))
        return self._bank[1]

    def _stored_personal(self, names: list[str]) -> dict[str, np.ndarray]:
        """The personal part kept from earlier rounds if it is this net's, readable and finite; else version 0's
        (logged when a kept one is discarded)."""
        fallback = {n: self._version0[n] for n in names}
        meta_path = self.personal_path.with_suffix(".json")
        if not names or not self.personal_path.exists():
            return fallback
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("model") != self._model_spec or meta.get("members") != self.data.members:
                return fallback  # another net or other owners: start again from version 0
            stored = load_file(str(self.personal_path))
        except (OSError, ValueError, AttributeError, SafetensorError) as exc:
            problem = f"is unreadable ({type(exc).__name__}: {exc})"
        else:
            problem = first_bad_tensor(stored)
            if problem is None and sorted(stored) == sorted(names) and all(
                    stored[n].shape == fallback[n].shape for n in names):
                return stored
            problem = problem or "does not fit this net"
        log.warning("kept personal part %s %s: discarded, version 0's is used", self.personal_path, problem)
        self.personal_path.unlink(missing_ok=True)
        return fallback
