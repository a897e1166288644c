"""Camera-domain experiment (issue 16): does federation make each device's unlock better in its own camera?

One owner per device (or a household of 2-5: `household`). The fleet's people are split: a quarter (at least
3; or the `unseen` people named) are on no device and serve as impostors and unseen people; each of the others
owns one device, which holds `enrol` clean enrolment photos
and `train_frames` camera frames of its owner, through its own camera (drawn around the domain,
model_zoo.camera). Every arm starts from version 0 (the pretrained face-api descriptor), runs the same
`rounds` x `steps` Adam steps per device on the same data (model_zoo.camera_adapt), and is scored the way
unlock compares, gallery (clean enrolment) against probes, with raw L2 distance:

- owner: each device's held-out camera frames of its owner (genuine) and camera frames of the off-device
  people taken by that device's camera (impostors), all against the owner's enrolment, on the device's model;
- unseen: the off-device people's enrolment against their clean photos and their camera frames.

Arms: version0; local (each device adapts shared + personal parts alone); fedavg (shared part only,
FedAvg over devices each round); fedavg_personal (shared part averaged, personal part kept on the device);
pooled (one model on every device's data, steps = devices x steps, each step drawing one device: the
upper bound nobody may do); version0_int8 and fedavg_personal_int8, the int8-trunk device profile
(INT8_PROFILE). The federated arms run over the real MQTT path by default (facefed.over_broker: the
aggregator service and an EdgeAgent per device on an embedded broker, each device training with its
the edge agent's CameraTrainer, announced as train.method camera); `transport: inprocess` runs the same rounds on the round engine alone (facefed.inprocess).
bytes_per_round is what each accepted upload put on the wire, from the aggregator's journal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.models import train_settings
from edge_agent.camera_trainer import CameraData, CameraTrainer
from edge_agent.unlock.calibration import mean_template
from facefed.inprocess import Device as InProcessDevice
from facefed.inprocess import run_inprocess
from facefed.over_broker import run_over_broker
from fedwire.messages import CameraLossWeights, CameraTraining, TrainSettings
from model_zoo.backbones import PRETRAINED_FACEAPI, FaceApiResNet, build_backbone, model_score
from model_zoo.backbones.faceapi_resnet import PERSONAL_PARTS
from model_zoo.camera import CameraSpec, capture_frames, draw_device_camera, parse_camera
from model_zoo.camera_measure import measure_camera
from model_zoo.camera_adapt import (AdaptConfig, DeviceData, Teacher, adapt, build_model, embed, get_tensors,
                                    set_tensors, teacher_for)
from model_zoo.checkpoint import load_shared_tensors, save_checkpoint, shared_tensors, spec_of
from model_zoo.checkpoint_file import BackboneSpec
from model_zoo.data import FaceDataset, detect_layout, load_datasets, shared_datasets_root
from model_zoo.metrics import far_key, gallery_pair_scores, report_from_scores, score_matrix

ARMS = ("version0", "local", "fedavg", "fedavg_personal", "pooled", "version0_int8", "fedavg_personal_int8")
# The int8-trunk device profile: a device that runs face-api's trunk in int8 (model_zoo.export.quantize_trunk,
# calibrated on its own images, as the int8 export deploys) cannot adapt inside it; it adapts the fp32 stage
# after it: that stage's scale/shift shared, the projection personal (with the projection's step size).
INT8_PROFILE = {"trainable": "last", "personal": "projection", "personal_lr": 1e-4}
# What a device knows of its own camera, for its synthetic pairs: "own", the camera it has (exact: what no
# real device knows); "measured", the camera it measures on its frames and enrolment
# (model_zoo.camera_measure, as an agent with camera_training.camera "measured" does); "domain", only the
# domain's nominal camera; "none", no camera model (its synthetic pairs and strangers stay clean: only its
# owner's frames show it the camera).
CAMERA_MODELS = ("own", "measured", "domain", "none")
# Which of its camera frames of the owner a device trains on: "all" of them (what a device has when a PIN
# fallback right after a rejected face also keeps that attempt's frames); "unlocked", only those version 0
# matches at the FAR 1e-3 unlock threshold (what successful unlocks alone keep: fewer, and the easy ones).
OWNER_FRAMES = ("all", "unlocked")
# mqtt: the aggregator service and an EdgeAgent per device on a real broker (facefed.over_broker); inprocess:
# the round engine alone with the same trainers (facefed.inprocess), the same figures without the wire.
TRANSPORTS = ("mqtt", "inprocess")
SCORE = model_score(PRETRAINED_FACEAPI, "evaluate")  # gallery-vs-probe image pairs of the face-api descriptor: raw L2
FAR = far_key(1e-3)
PRESETS = {
    "camera-quick": {"rounds": 3, "steps": 12, "batch": 6, "train_frames": 60, "test_frames": 30, "unseen_probes": 30},
    "camera": {"rounds": 6, "steps": 12, "batch": 8, "train_frames": 150, "test_frames": 40, "unseen_probes": 40},
}


class CameraExperimentError(ValueError):
    pass


@dataclass
class CameraExperimentConfig:
    data: list[Path]
    out: Path
    camera: str = "corridor"
    seed: int = 0
    rounds: int = 3
    steps: int = 6  # Adam steps per device per round
    batch: int = 8
    lr: float = 1e-2
    personal: str = "last"
    # The trainer's other settings (model_zoo.camera_adapt.AdaptConfig): its defaults unless set here.
    personal_lr: float = AdaptConfig.personal_lr
    weights: tuple[float, ...] = AdaptConfig.weights
    l2sp: float = AdaptConfig.l2sp
    enrol: int = 5
    train_frames: int = 60
    test_frames: int = 30
    unseen_probes: int = 30
    bank: list[Path] = field(default_factory=list)  # public faces shipped with the model
    bank_per_identity: int = 4
    arms: tuple[str, ...] = ARMS
    camera_model: str = "own"  # CAMERA_MODELS
    owner_frames: str = "all"  # OWNER_FRAMES
    household: str = "1"  # people per device: "1" (one owner) or a range such as "2-5" (household devices)
    # The people kept off every device (identity names as loaded); empty: a quarter of them, drawn by the seed.
    unseen: tuple[str, ...] = ()
    # People with fewer photos than enrol + train_frames + test_frames join too: their frames are re-captured
    # from the photos they have (each capture a new draw of the camera's noise and compression); their
    # photos after enrolment are split between training and test in the train_frames : test_frames ratio.
    reuse_photos: bool = False
    transport: str = "mqtt"  # TRANSPORTS: how the federated arms' rounds travel
    preset: str | None = None

    def check(self) -> CameraExperimentConfig:
        parse_camera(self.camera)
        for name in ("rounds", "steps", "batch", "enrol", "train_frames", "test_frames", "unseen_probes",
                     "bank_per_identity"):
            if getattr(self, name) < 1:
                raise CameraExperimentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.camera_model not in CAMERA_MODELS:
            raise CameraExperimentError(f"camera_model must be one of {', '.join(CAMERA_MODELS)}, "
                                        f"got {self.camera_model!r}")
        if self.owner_frames not in OWNER_FRAMES:
            raise CameraExperimentError(f"owner_frames must be one of {', '.join(OWNER_FRAMES)}, "
                                        f"got {self.owner_frames!r}")
        parse_household(self.household)
        if self.transport not in TRANSPORTS:
            raise CameraExperimentError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise CameraExperimentError(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
        if self.personal not in PERSONAL_PARTS:
            raise CameraExperimentError(f"personal must be one of {', '.join(PERSONAL_PARTS)}, got {self.personal!r}")
        try:  # the trainer's settings fail here, with their field, not after the fleet is built
            self.adapt_config()
        except ValueError as exc:
            raise CameraExperimentError(str(exc)) from None
        if not self.bank:
            raise CameraExperimentError("no public face bank: give bank folders (default: shared orl and yale)")
        if self.out.exists() and any(self.out.iterdir()):
            raise CameraExperimentError(f"--out {self.out} is not empty")
        return self

    def adapt_config(self) -> AdaptConfig:
        return AdaptConfig(steps=self.steps, batch=self.batch, lr=self.lr, personal_lr=self.personal_lr,
                           weights=tuple(self.weights), l2sp=self.l2sp).check()


def preset_config(name: str, out: Path, data: list[Path] | None = None, **overrides) -> CameraExperimentConfig:
    root = shared_datasets_root()
    settings = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    data = data or [root / "celeb-dev"]
    names = {Path(d).name for d in data}
    # The public bank: shared faces of people outside the fleet (ORL and Yale unless the fleet uses them).
    settings.setdefault("bank", [root / b for b in ("orl", "yale") if b not in names and (root / b).is_dir()])
    return CameraExperimentConfig(data=list(data), out=out, preset=name, **settings)


# --- data ---------------------------------------------------------------------------------------------

def aligned_crops(dataset: FaceDataset, roots: list[Path]) -> FaceDataset:
    """112x112 ArcFace-aligned crops: folder datasets (celeb-dev) are already; ORL and Yale frames get aligned.

    dataset is load_datasets(roots): identities carry their root's folder name as prefix."""
    frames = {Path(r).name for r in roots if detect_layout(r) != "folders"}
    mask = np.array([dataset.identities[label].split("_", 1)[0] in frames for label in dataset.labels], dtype=bool)
    if not mask.any():
        return dataset
    from model_zoo.pipeline import FacePipeline

    images = dataset.images.copy()
    images[mask] = FacePipeline(detector_input_size=128, detector="tiny", landmarks="68").arcface_crops(images[mask])
    return FaceDataset(images, dataset.labels, dataset.identities)


@dataclass
class Device:
    owners: list[str]  # one owner, or a household's members (data.people() indexes them)
    data: DeviceData
    test_frames: np.ndarray  # held-out camera frames of the owners
    test_names: np.ndarray  # whose each test frame is
    impostor_frames: np.ndarray  # off-device people through this device's camera
    impostor_names: np.ndarray
    camera: CameraSpec  # the camera that took its frames (data.camera: what the device knows of it)

    @property
    def enrolment_names(self) -> np.ndarray:
        return np.asarray(self.owners)[self.data.people()[0]]


@dataclass
class Fleet:
    devices: list[Device]
    unseen_gallery: np.ndarray
    unseen_gallery_names: np.ndarray
    unseen_probes: np.ndarray  # clean
    unseen_names: np.ndarray
    bank: np.ndarray
    domain: CameraSpec


def build_fleet(cfg: CameraExperimentConfig, say: Callable[[str], None] = print) -> Fleet:
    dataset = aligned_crops(load_datasets(cfg.data), cfg.data)
    rng = np.random.default_rng(cfg.seed)
    need_owner = cfg.enrol + cfg.train_frames + cfg.test_frames
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    people = np.flatnonzero(counts >= cfg.enrol + cfg.unseen_probes)
    enough = cfg.enrol + 2 if cfg.reuse_photos else need_owner  # reused: one photo for training, one for test
    if cfg.unseen:
        unknown = sorted(set(cfg.unseen) - set(dataset.identities[p] for p in people))
        if unknown:
            raise CameraExperimentError(f"unseen people {unknown} are not in the data with the "
                                        f"{cfg.enrol + cfg.unseen_probes} photos they need (enrol + unseen_probes)")
        unseen = np.array([dataset.identities.index(name) for name in cfg.unseen])
        off = len(unseen)
        # Owners in an order of their own: the named people's photo draws come first from `rng`, so fleets of
        # other sizes split them alike (bench/camera_fleet_size.py compares them).
        owners = [p for p in np.random.default_rng([cfg.seed, 2]).permutation(dataset.num_classes)
                  if p not in unseen and counts[p] >= enough]
    else:
        off = max(3, len(people) // 4)
        order = rng.permutation(people)
        unseen, owners = order[:off], [p for p in order[off:] if counts[p] >= enough]
    households = _households(owners, cfg.household, cfg.seed)
    if len(households) < 2:
        raise CameraExperimentError(f"{len(owners)} people have the {need_owner} images a device needs "
                                    f"(enrol + train_frames + test_frames), too few for two devices of "
                                    f"{cfg.household} people; lower them or give more data")
    domain = parse_camera(cfg.camera)
    per_device = "one owner each" if cfg.household == "1" else f"households of {cfg.household} people"
    say(f"{len(households)} devices ({per_device}, {len(owners)} people), {off} people on no device; "
        f"camera {domain.describe()}")
    bank_set = load_datasets(cfg.bank)
    keep = np.concatenate([np.flatnonzero(bank_set.labels == k)[:cfg.bank_per_identity]
                           for k in range(bank_set.num_classes)])
    bank = aligned_crops(bank_set.subset(keep), cfg.bank).images
    unseen_gallery, unseen_gallery_names, unseen_probes, unseen_names = [], [], [], []
    for person in unseen:
        idx = rng.permutation(np.flatnonzero(dataset.labels == person))
        unseen_gallery.append(dataset.images[idx[:cfg.enrol]])
        unseen_probes.append(dataset.images[idx[cfg.enrol:cfg.enrol + cfg.unseen_probes]])
        unseen_gallery_names += [dataset.identities[person]] * cfg.enrol
        unseen_names += [dataset.identities[person]] * cfg.unseen_probes
    unseen_probes_arr = np.concatenate(unseen_probes)
    devices = []
    for members in households:
        camera, enrol, frames, test = None, [], [], []
        for person in members:
            idx = rng.permutation(np.flatnonzero(dataset.labels == person))
            if camera is None:  # one camera per device, drawn after its first member's images (the old order)
                camera = draw_device_camera(domain, rng)
            enrol.append(dataset.images[idx[:cfg.enrol]])
            train_idx, test_idx = frame_sources(idx[cfg.enrol:], cfg)
            frames.append(capture_frames(dataset.images[train_idx], camera, rng))
            test.append(capture_frames(dataset.images[test_idx], camera, rng))
        enrol, frames = np.concatenate(enrol), np.concatenate(frames)
        known = (measure_camera(frames, enrol) if cfg.camera_model == "measured" else
                 {"own": camera, "domain": domain, "none": CameraSpec()}[cfg.camera_model])
        member = np.arange(len(members))
        data = DeviceData(enrol, frames, known, np.repeat(member, cfg.enrol), np.repeat(member, cfg.train_frames))
        names = [dataset.identities[p] for p in members]
        devices.append(Device(names, data, np.concatenate(test), np.repeat(names, cfg.test_frames),
                              capture_frames(unseen_probes_arr, camera, rng), np.asarray(unseen_names), camera))
    fleet = Fleet(devices, np.concatenate(unseen_gallery), np.asarray(unseen_gallery_names), unseen_probes_arr,
                  np.asarray(unseen_names), bank, domain)
    if cfg.owner_frames == "unlocked":
        fleet = frames_unlock_keeps(fleet, cfg.camera_model == "measured", say)
    return fleet


def frames_unlock_keeps(fleet: Fleet, measured: bool, say: Callable[[str], None] = print) -> Fleet:
    """The fleet with each device's training frames cut to those unlock alone would keep: version 0's score of
    the frame against its member's template, as unlock compares them (model_score's unlock score, the
    template edge_agent's unlock makes), above the threshold that admits at most 0.1 % of the fleet's
    impostor frames (unlock's FAR 1e-3). An upper bound on what unlock keeps: it also needs k matching frames
    in an attempt. measured: the device measures its camera again on the frames it keeps."""
    version0 = build_model()
    score = model_score(version0, "unlock")

    def templates(device: Device) -> np.ndarray:
        people = device.data.people()[0]
        return np.stack([mean_template(embed(version0, device.data.enrolment[people == k]), score)
                         for k in range(len(device.owners))])

    def scores(device: Device, images: np.ndarray) -> np.ndarray:  # [images, members]
        return score_matrix(templates(device), embed(version0, images), score)

    impostors = np.concatenate([scores(d, d.impostor_frames).max(axis=1) for d in fleet.devices])
    threshold = np.sort(impostors)[::-1][int(np.floor(1e-3 * len(impostors)))]  # unlock accepts score > this
    devices = []
    for device in fleet.devices:
        members = device.data.people()[1]
        keep = scores(device, device.data.frames)[np.arange(len(members)), members] > threshold
        frames = device.data.frames[keep]
        data = replace(device.data, frames=frames, frame_people=None if device.data.frame_people is None
                       else device.data.frame_people[keep],
                       camera=measure_camera(frames, device.data.enrolment) if measured else device.data.camera)
        devices.append(replace(device, data=data))
    kept = [len(d.data.frames) for d in devices]
    say(f"owner frames as unlock keeps them (version 0 {score} score > {threshold:.3f}, FAR 1e-3): "
        f"{sum(kept)} of {sum(len(d.data.frames) for d in fleet.devices)}, {min(kept)}-{max(kept)} per device")
    if min(kept) == 0:
        raise CameraExperimentError("a device keeps no frame of its owner at the unlock threshold: it could not "
                                    "train; give it more frames (train_frames)")
    return replace(fleet, devices=devices)


def frame_sources(photos: np.ndarray, cfg: CameraExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The photos (after enrolment) each training and test frame is captured from: distinct photos while there
    are enough, else (reuse_photos) the photos split by the train : test ratio and cycled."""
    if len(photos) >= cfg.train_frames + cfg.test_frames:
        return photos[:cfg.train_frames], photos[cfg.train_frames:cfg.train_frames + cfg.test_frames]
    split = min(len(photos) - 1, max(1, round(len(photos) * cfg.train_frames / (cfg.train_frames + cfg.test_frames))))
    return np.resize(photos[:split], cfg.train_frames), np.resize(photos[split:], cfg.test_frames)


def _households(owners: list[int], household: str, seed: int) -> list[list[int]]:
    """The people on each device: one each, or households of a drawn size in the range ("2-5"), a smaller last
    one folded into the one before (its own generator: the one-owner fleet's draws stay as they were)."""
    low, high = parse_household(household)
    if high == 1:
        return [[p] for p in owners]
    rng, groups, rest = np.random.default_rng([seed, 1]), [], list(owners)
    while rest:
        size = int(rng.integers(low, high + 1))
        groups.append(rest[:size])
        rest = rest[size:]
    if len(groups) > 1 and len(groups[-1]) < low:
        groups[-2] += groups.pop()
    return groups


def parse_household(text: str) -> tuple[int, int]:
    """"1" (one owner per device) or "LOW-HIGH" people per device, 1 <= LOW <= HIGH <= 5."""
    try:
        low, _, high = text.partition("-")
        low, high = int(low), int(high or low)
    except ValueError:
        raise CameraExperimentError(f"household must be 1 or a range like 2-5, got {text!r}") from None
    if not 1 <= low <= high <= 5:
        raise CameraExperimentError(f"household must be within 1-5 people per device, got {text!r}")
    return low, high


# --- evaluation ---------------------------------------------------------------------------------------

def _report(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    report = report_from_scores(np.concatenate([s for s, _ in parts]), np.concatenate([g for _, g in parts]))
    return {"eer": report.eer, "tar_at_far_1e-3": report.tar_at_far[FAR], "genuine_pairs": report.genuine_pairs,
            "impostor_pairs": report.impostor_pairs}


def evaluate_fleet(fleet: Fleet, load_device: Callable[[int], torch.nn.Module], unseen: bool = True) -> dict:
    """Owner and unseen-people reports, each device scored on its own model (load_device(i) puts it in place)."""
    owner, clean, camera = [], [], []
    for i, dev in enumerate(fleet.devices):
        model = load_device(i)
        gallery = embed(model, dev.data.enrolment)
        probes = embed(model, np.concatenate([dev.test_frames, dev.impostor_frames]))
        # A household member's frame against another member's enrolment is an impostor pair too.
        names = np.concatenate([dev.test_names, dev.impostor_names])
        owner.append(gallery_pair_scores(gallery, dev.enrolment_names, probes, names, SCORE))
        if unseen:
            unseen_gallery = embed(model, fleet.unseen_gallery)
            clean.append(gallery_pair_scores(unseen_gallery, fleet.unseen_gallery_names,
                                             embed(model, fleet.unseen_probes), fleet.unseen_names, SCORE))
            camera.append(gallery_pair_scores(unseen_gallery, fleet.unseen_gallery_names,
                                              probes[len(dev.test_frames):], dev.impostor_names, SCORE))
    out = {"owner": _report(owner)}
    if unseen:
        out.update({"unseen_clean": _report(clean), "unseen_camera": _report(camera)})
    return out


# --- arms ---------------------------------------------------------------------------------------------

@dataclass
class ArmResult:
    name: str
    evaluation: dict
    curve: list[dict]
    bytes_per_round: int | None
    device_cpu_seconds_per_round: float | None
    model: torch.nn.Module | None = None  # what goes to DIR/models/<arm>.safetensors

    def summary(self) -> dict:
        ev = self.evaluation
        return {"owner_camera_eer": ev["owner"]["eer"], "owner_tar_at_far_1e-3": ev["owner"]["tar_at_far_1e-3"],
                "owner_frr_at_far_1e-3": 1.0 - ev["owner"]["tar_at_far_1e-3"],
                "unseen_clean_eer": ev["unseen_clean"]["eer"],
                "unseen_clean_tar_at_far_1e-3": ev["unseen_clean"]["tar_at_far_1e-3"],
                "unseen_camera_eer": ev["unseen_camera"]["eer"],
                "unseen_camera_tar_at_far_1e-3": ev["unseen_camera"]["tar_at_far_1e-3"],
                "bytes_per_round": self.bytes_per_round,
                "device_cpu_seconds_per_round": self.device_cpu_seconds_per_round,
                "pairs": {k: {"genuine": v["genuine_pairs"], "impostor": v["impostor_pairs"]} for k, v in ev.items()},
                "curve": self.curve}


@dataclass
class CameraModels:
    """The round engine's model hooks for the shared part: version 0's tensors, and the owner-camera score of
    each round's global model on every device (with its personal part)."""

    spec: BackboneSpec
    train_settings: TrainSettings
    initial: dict[str, np.ndarray]
    on_round: Callable[[int, dict[str, np.ndarray]], dict[str, float]]

    def initial_tensors(self) -> dict[str, np.ndarray]:
        return dict(self.initial)

    def update_bytes(self) -> int:
        return sum(value.nbytes for value in self.initial.values())

    def evaluate(self, round_number: int, tensors: dict[str, np.ndarray]) -> dict[str, float]:
        return self.on_round(round_number, tensors)

    def export(self, checkpoint: Path) -> None:
        """Nothing to export per round: the arm's final model goes to DIR/models/<arm>.safetensors."""


class Runner:
    def __init__(self, cfg: CameraExperimentConfig, fleet: Fleet, say: Callable[[str], None]) -> None:
        self.cfg, self.fleet, self.say = cfg, fleet, say
        self.model = build_model()
        self.version0 = {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}
        self.shared, self.personal = self.model.parts(cfg.personal)
        # Version 0's descriptors (the teachers) come from the fp32 model: shipped with it for the bank, computed
        # once at enrolment for the owner's photos, on every device profile alike.
        self.bank = torch.from_numpy(embed(self.model, fleet.bank))
        self.teachers = [teacher_for(self.model, d.data, fleet.bank, self.bank) for d in fleet.devices]

    def _put(self, *parts: dict[str, np.ndarray]) -> torch.nn.Module:
        set_tensors(self.model, self.version0)
        for tensors in parts:
            set_tensors(self.model, tensors)
        return self.model

    def announced(self, int8: bool) -> tuple[dict, TrainSettings]:
        """(the net's options, the train: section) a federation of this profile announces: train.method camera.
        The personal part is named even for fedavg (whose devices do not personalise), so that both arms share
        the same scales and shifts."""
        cfg = self.cfg
        options = {"trainable": INT8_PROFILE["trainable"] if int8 else "all", "shared": "scale_shift",
                   "personal": INT8_PROFILE["personal"] if int8 else cfg.personal}
        training = CameraTraining(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, l2sp=cfg.l2sp,
                                  personal_lr=INT8_PROFILE["personal_lr"] if int8 else cfg.personal_lr,
                                  weights=CameraLossWeights(*cfg.weights))
        return options, TrainSettings(method="camera", camera=training)

    def int8_parts(self) -> tuple[list[str], list[str]]:
        """(shared, personal) names of the int8-trunk profile: only its fp32 tail trains."""
        return build_model(trainable=INT8_PROFILE["trainable"]).parts(INT8_PROFILE["personal"])

    def trainers(self, arm: str, int8: bool, personalise: bool) -> list[CameraTrainer]:
        """The edge agent's CameraTrainer for each device, on its data (state under DIR/devices/<arm>/)."""
        return [CameraTrainer(CameraData(dev.data, dev.owners, self.fleet.bank, self.bank),
                              self.cfg.out / "devices" / arm / f"camera-{i}" / "state", self.cfg.seed,
                              "int8" if int8 else "fp32", personalise=personalise,
                              draws=lambda r, i=i: self._rng(r, i))
                for i, dev in enumerate(self.fleet.devices)]

    def _curve_point(self, round_number: int, load_device, losses: list[float]) -> dict:
        owner = evaluate_fleet(self.fleet, load_device, unseen=False)["owner"]
        point = {"round": round_number, "owner_camera_eer": owner["eer"],
                 "owner_tar_at_far_1e-3": owner["tar_at_far_1e-3"], "train_loss": float(np.mean(losses))}
        self.say(f"  round {round_number}: owner camera EER {owner['eer']:.3f}, TAR@1e-3 "
                 f"{owner['tar_at_far_1e-3']:.2f}, loss {point['train_loss']:.3f}")
        return point

    def version0_arm(self) -> ArmResult:
        return ArmResult("version0", evaluate_fleet(self.fleet, lambda i: self._put()), [], 0, 0.0)

    def version0_int8(self) -> ArmResult:
        """Version 0 on the int8-trunk profile: each device's int8 trunk, calibrated on its own images."""
        options = self.announced(int8=True)[0]
        spec = {"arch": FaceApiResNet.arch, **options}
        initial = shared_tensors(build_backbone(FaceApiResNet.arch, **options))
        trainers = self.trainers("version0_int8", int8=True, personalise=False)
        result = ArmResult("version0_int8", evaluate_fleet(self.fleet, lambda i: trainers[i].own_model(spec, initial)),
                           [], 0, 0.0)
        for trainer in trainers:
            trainer.unload()
        return result

    def local(self) -> ArmResult:
        cfg = self.cfg.adapt_config()
        names = self.shared + self.personal
        states = [get_tensors(self.model, names) for _ in self.fleet.devices]
        curve, cpu = [], []
        for r in range(1, self.cfg.rounds + 1):
            losses = []
            for i, dev in enumerate(self.fleet.devices):
                self._put(states[i])
                stats = adapt(self.model, names, self.version0, dev.data, self.teachers[i], cfg, self._rng(r, i))
                states[i] = get_tensors(self.model, names)
                losses.append(stats.loss)
                cpu.append(stats.cpu_seconds)
            curve.append(self._curve_point(r, lambda i: self._put(states[i]), losses))
        return ArmResult("local", evaluate_fleet(self.fleet, lambda i: self._put(states[i])), curve, 0,
                         float(np.mean(cpu)))

    def federated(self, personal: bool, int8: bool = False) -> ArmResult:
        """A federated arm with train.method camera: each device is the edge agent's CameraTrainer on its data."""
        name = ("fedavg_personal" if personal else "fedavg") + ("_int8" if int8 else "")
        cfg = self.cfg
        options, train = self.announced(int8)
        engine_cfg = AggregatorConfig(state_dir=cfg.out / "rounds" / name, rounds=cfg.rounds,
                                      min_clients=len(self.fleet.devices), round_timeout_s=3600.0,
                                      model=ModelConfig(arch=FaceApiResNet.arch, options=options), train=train)
        settings = train_settings(engine_cfg)
        trainers = self.trainers(name, int8, personalise=personal)
        devices = [InProcessDevice(f"camera-{i}", trainer) for i, trainer in enumerate(trainers)]
        curve: list[dict] = []

        def load_device(shared: dict[str, np.ndarray]) -> Callable[[int], torch.nn.Module]:
            return lambda i: trainers[i].own_model(settings.model, shared)

        def on_round(round_number: int, shared: dict[str, np.ndarray]) -> dict[str, float]:
            if round_number == 0:  # version 0: its own arm
                return {}
            losses = [t.rounds[-1].loss for t in trainers if len(t.rounds) == round_number]
            curve.append(self._curve_point(round_number, load_device(shared), losses))
            return {"owner_camera_eer": curve[-1]["owner_camera_eer"]}

        model = build_backbone(FaceApiResNet.arch, **options)
        hooks = CameraModels(spec_of(model), settings, shared_tensors(model), on_round)
        if cfg.transport == "mqtt":
            engine = run_over_broker(engine_cfg, devices, hooks, cfg.out / "devices" / name)
        else:
            engine = run_inprocess(engine_cfg, devices, hooks)
        shared = engine.global_tensors
        load_shared_tensors(model, shared)  # the arm's checkpoint: what a new device starts from
        # what each accepted upload put on the wire, as the aggregator's journal counts it
        rounds = engine.state.read_log()[1:]
        sent = sum(r["bytes_up"] for r in rounds) / sum(r["clients"] for r in rounds)
        result = ArmResult(name, evaluate_fleet(self.fleet, load_device(shared)), curve, int(round(sent)),
                           float(np.mean([s.cpu_seconds for t in trainers for s in t.rounds])), model)
        for trainer in trainers:
            trainer.unload()
        return result

    def pooled(self) -> ArmResult:
        devices = len(self.fleet.devices)
        cfg = replace(self.cfg.adapt_config(), steps=self.cfg.steps * devices)
        names = self.shared + self.personal
        state = get_tensors(self._put(), names)
        curve = []

        def sample(rng: np.random.Generator) -> tuple[DeviceData, Teacher]:
            i = int(rng.integers(devices))
            return self.fleet.devices[i].data, self.teachers[i]

        for r in range(1, self.cfg.rounds + 1):
            self._put(state)
            stats = adapt(self.model, names, self.version0, None, None, cfg, self._rng(r, 0), sample)
            state = get_tensors(self.model, names)
            curve.append(self._curve_point(r, lambda i: self._put(state), [stats.loss]))
        checkpoint = build_model()
        set_tensors(checkpoint, state)
        return ArmResult("pooled", evaluate_fleet(self.fleet, lambda i: self._put(state)), curve, None, None,
                         checkpoint)

    def _rng(self, round_number: int, device: int) -> np.random.Generator:
        # Every arm draws the same batches for a (round, device): arms differ by what they train, not by luck.
        return np.random.default_rng([self.cfg.seed, round_number, device])

    def run(self, arm: str) -> ArmResult:
        return {"version0": self.version0_arm, "local": self.local, "fedavg": lambda: self.federated(False),
                "fedavg_personal": lambda: self.federated(True), "pooled": self.pooled,
                "version0_int8": self.version0_int8,
                "fedavg_personal_int8": lambda: self.federated(True, int8=True)}[arm]()


# --- the experiment -----------------------------------------------------------------------------------

def run_camera_experiment(cfg: CameraExperimentConfig, say: Callable[[str], None] = print) -> dict:
    cfg.check()
    torch.set_num_threads(1)
    start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    fleet = build_fleet(cfg, say)
    runner = Runner(cfg, fleet, say)
    results = {"setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                            if k not in ("data", "out", "bank")},
                         "data": [str(d) for d in cfg.data], "bank": [str(b) for b in cfg.bank],
                         "devices": [{"owners": d.owners, "camera": asdict(d.camera), "camera_model": asdict(d.data.camera),
                                      "train_frames": len(d.data.frames)}
                                     for d in fleet.devices],
                         "unseen_people": sorted(set(fleet.unseen_names.tolist())),
                         "shared_floats": int(sum(runner.version0[n].size for n in runner.shared)),
                         "personal_floats": int(sum(runner.version0[n].size for n in runner.personal)),
                         **({"int8_profile": {**INT8_PROFILE, **{f"{part}_floats": int(sum(runner.version0[n].size
                                                                                          for n in names))
                                                                 for part, names in zip(("shared", "personal"),
                                                                                        runner.int8_parts())}}}
                            if any(a.endswith("_int8") for a in cfg.arms) else {})},
               "arms": {}}
    (cfg.out / "models").mkdir()
    for arm in cfg.arms:
        say(f"arm {arm} ...")
        t0 = time.time()
        result = runner.run(arm)
        results["arms"][arm] = {**result.summary(), "seconds": time.time() - t0}
        s = results["arms"][arm]
        say(f"{arm}: owner camera EER {s['owner_camera_eer']:.3f} (TAR@1e-3 {s['owner_tar_at_far_1e-3']:.2f}), "
            f"unseen clean {s['unseen_clean_eer']:.3f}, camera {s['unseen_camera_eer']:.3f}, "
            f"{s['seconds']:.0f} s")
        if result.model is not None:
            save_checkpoint(cfg.out / "models" / f"{arm}.safetensors", result.model,
                            {"arm": arm, "experiment": "camera", "seed": cfg.seed, "camera": cfg.camera})
    results["setup"]["seconds"] = time.time() - start
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot_curves(results, cfg.out / "owner_eer_per_round.png")
    (cfg.out / "report.md").write_text(report_markdown(results, fleet))
    return results


def _ratio(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.0f} %" if base > 0 else "-"


def report_markdown(results: dict, fleet: Fleet) -> str:
    arms = results["arms"]
    base = arms.get("version0")
    local = arms.get("local")
    setup = results["setup"]
    lines = [f"# Camera-domain experiment ({setup['preset'] or 'custom'}, seed {setup['seed']})", "",
             f"Camera: {setup['camera']} ({fleet.domain.describe()}); devices' camera model: {setup['camera_model']}; "
             f"owner frames: {setup['owner_frames']}; "
             f"{len(fleet.devices)} devices, "
             f"{'one owner each' if setup['household'] == '1' else 'households of ' + setup['household'] + ' people'}; "
             f"{len(setup['unseen_people'])} people on no device; {setup['rounds']} rounds x {setup['steps']} steps "
             f"per device; shared part {setup['shared_floats']} floats, personal part {setup['personal_floats']}.",
             "Scores: raw L2 distance, gallery (clean enrolment) vs probes.", "",
             "| arm | owner camera EER | TAR@1e-3 | vs version0 | vs local | unseen clean EER | TAR@1e-3 | "
             "unseen camera EER | TAR@1e-3 | bytes/round/device | device CPU s/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        cpu = "-" if a["device_cpu_seconds_per_round"] is None else f"{a['device_cpu_seconds_per_round']:.1f}"
        sent = "-" if a["bytes_per_round"] is None else f"{a['bytes_per_round']:,}"
        lines.append(f"| {name} | {a['owner_camera_eer']:.3f} | {a['owner_tar_at_far_1e-3']:.2f} | "
                     f"{_ratio(a['owner_camera_eer'], base['owner_camera_eer']) if base else '-'} | "
                     f"{_ratio(a['owner_camera_eer'], local['owner_camera_eer']) if local else '-'} | "
                     f"{a['unseen_clean_eer']:.3f} | {a['unseen_clean_tar_at_far_1e-3']:.2f} | "
                     f"{a['unseen_camera_eer']:.3f} | {a['unseen_camera_tar_at_far_1e-3']:.2f} | {sent} | {cpu} |")
    lines += ["", f"Took {setup['seconds']:.0f} s. Per-round owner EER: owner_eer_per_round.png; "
              "federated and pooled checkpoints: models/<arm>.safetensors (fedavg_personal: the shared part, "
              "personal part at version 0, what a new device starts from)."]
    return "\n".join(lines) + "\n"


def _plot_curves(results: dict, path: Path) -> None:
    from facefed.plots import plot_method_curves

    curves = {name: [(p["round"], p["owner_camera_eer"]) for p in arm["curve"]]
              for name, arm in results["arms"].items() if arm["curve"]}
    base = results["arms"].get("version0")
    rounds = [r for points in curves.values() for r, _ in points]
    if base and rounds:  # version 0 does not train: a flat line over the federated rounds
        curves["version0"] = [(min(rounds), base["owner_camera_eer"]), (max(rounds), base["owner_camera_eer"])]
    plot_method_curves(curves, path, title="Owner camera EER per round", xlabel="round", ylabel="EER",
                       legend_loc="upper right")


def main(args) -> int:
    """`facefed experiment --preset camera|camera-quick`: the CLI's parsed arguments in, exit status out."""
    import sys

    from tqdm import tqdm

    try:
        arms = tuple(a.strip() for a in args.methods.split(",")) if args.methods else None
        cfg = preset_config(args.preset, args.out, data=args.data, camera=args.camera, rounds=args.rounds,
                            seed=args.seed, arms=arms, camera_model=args.camera_model, owner_frames=args.owner_frames,
                            transport=args.transport, household=args.household).check()
    except (CameraExperimentError, ValueError) as exc:
        print(f"facefed experiment: {exc}", file=sys.stderr)
        return 2
    print(f"facefed experiment: {cfg.preset}: data {', '.join(map(str, cfg.data))}, camera {cfg.camera} -> {cfg.out}")
    try:
        results = run_camera_experiment(cfg, say=tqdm.write)
    except (CameraExperimentError, ValueError, FileNotFoundError) as exc:
        print(f"facefed experiment: {exc}", file=sys.stderr)
        return 1
    print((cfg.out / "report.md").read_text())
    print(f"done in {results['setup']['seconds']:.0f} s: {cfg.out}")
    return 0
