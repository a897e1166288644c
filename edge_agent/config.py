"""agent.yaml plus the device profile it names, merged and validated at start.

Precedence (later wins): the profile in firmware_configs/, the config's `device:`
section, then command-line overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from fedwire.config import ConfigError, TlsConfig, merge_dicts, parse_config, read_yaml, require
from fedwire.mqtt import parse_broker_url
from fedwire.topics import Topics, validate_device_id
from edge_agent.unlock.decision import THRESHOLD_RANGES
from firmware_configs import profile_path
from model_zoo.camera import parse_camera
from model_zoo.camera_measure import MEASURED
from model_zoo.vision import DEFAULT_DETECTOR, DEFAULT_LANDMARKS

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass
class CameraSettings:
    source: str = "0"  # camera index, video file, rtsp:// URL or image folder
    width: int = 640
    height: int = 480
    fps: int = 15

    def check(self) -> None:
        require(bool(self.source), "source", "must not be empty")
        require(64 <= self.width <= 7680, "width", "must be in [64, 7680]")
        require(64 <= self.height <= 4320, "height", "must be in [64, 4320]")
        require(1 <= self.fps <= 240, "fps", "must be in [1, 240]")


@dataclass
class TrainWindow:
    """When the device may train; a condition the platform cannot report counts as met."""

    only_when_charging: bool = False
    max_load_per_core: float | None = None  # 1-minute load average per core must be at most this

    def check(self) -> None:
        require(self.max_load_per_core is None or self.max_load_per_core > 0, "max_load_per_core", "must be > 0")


@dataclass
class DeviceProfile:
    name: str
    backend: Literal["torch", "onnx", "tflite"] = "torch"  # runtime for inference (embedding)
    threads: int = 1
    training: bool = True
    trunk_precision: Literal["fp32", "int8"] = "fp32"  # a frozen pretrained trunk run int8 (ONNX Runtime) when training
    batch_size: int = 32
    local_epochs: int = 1
    max_chunk_bytes: int = 256 * 1024
    # What the bundle's install.sh installs for torch: pip arguments (the CPU build pinned as in CI by default), or
    # "system" to reuse a torch the system already has (a vendor build: JetPack, Termux's python-torch).
    torch: str = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    camera: CameraSettings = field(default_factory=CameraSettings)
    train_window: TrainWindow = field(default_factory=TrainWindow)
    detector: Literal["blazeface", "tiny"] = DEFAULT_DETECTOR  # face unlock's face detector (model_zoo.vision)
    landmarks: Literal["mesh", "68"] = DEFAULT_LANDMARKS  # and landmark net

    def check(self) -> None:
        require(1 <= self.threads <= 256, "threads", "must be in [1, 256]")
        require(1 <= self.batch_size <= 4096, "batch_size", "must be in [1, 4096]")
        require(1 <= self.local_epochs <= 1000, "local_epochs", "must be in [1, 1000]")
        require(1024 <= self.max_chunk_bytes <= 256 * 1024 * 1024, "max_chunk_bytes", "must be in [1 KiB, 256 MiB]")
        require(self.torch == "system" or self.torch.startswith("torch"), "torch",
                "must be pip arguments starting with a torch requirement (e.g. torch==2.13.0) or 'system'")
        require(not any(c in self.torch for c in "\"$`;&|\n"), "torch", "must not hold shell metacharacters")


@dataclass
class UnlockSettings:
    """Face unlock (`facefed-agent enroll | unlock | calibrate`); `calibrate` writes threshold, threshold_score and
    target_far."""

    model: Path | None = None  # the deployed model unlock runs; None: the pretrained face-api descriptor
    store: Path | None = None  # the owner's templates; None: <state_dir>/unlock
    threshold: float | None = None  # in threshold_score; None: edge_agent.unlock's default for the pretrained model
    # The score the threshold is on (model_zoo.backbones.model_score): cosine, or l2 (minus the euclidean distance).
    # Configs written before scores were declared hold cosine thresholds.
    threshold_score: Literal["cosine", "l2"] = "cosine"
    target_far: float = 1e-3  # the false-accept rate the threshold was calibrated for
    calibrated_model_sha256: str | None = None  # the model the threshold was calibrated on
    k: int = 3  # matching frames needed among the last n frames with a face
    n: int = 5
    timeout_s: float = 10.0  # an attempt that has not unlocked by then fails
    lockout_failures: int = 5  # failed attempts in a row before a lockout
    lockout_s: float = 30.0
    relock_after_s: float = 2.0  # locked again once the owner has not been verified this long
    liveness: Literal["off", "blink", "motion"] = "blink"
    reembed_after_round: bool = True  # re-embed the enrolment with each new global model (the agent does it)
    # Camera training's owner frames: each unlock keeps the chips of its matching frames in frames/<name>/, at
    # most keep_frames per person (0: none kept). frames None: <store>/frames.
    keep_frames: int = 0
    frames: Path | None = None

    def check(self) -> None:
        require(self.model is None or self.model.is_file(), "model", f"no such file: {self.model}")
        low, high = THRESHOLD_RANGES[self.threshold_score]
        require(self.threshold is None or low <= self.threshold <= high, "threshold",
                f"must be in [{low:g}, {high:g}] for a {self.threshold_score} score (threshold_score)")
        require(0.0 < self.target_far < 1.0, "target_far", "must be in (0, 1)")
        require(1 <= self.n <= 100, "n", "must be in [1, 100]")
        require(1 <= self.k <= self.n, "k", "must be in [1, n]")
        require(0 < self.timeout_s <= 3600, "timeout_s", "must be in (0, 3600]")
        require(1 <= self.lockout_failures <= 100, "lockout_failures", "must be in [1, 100]")
        require(0 <= self.lockout_s <= 86400, "lockout_s", "must be in [0, 86400]")
        require(0 <= self.relock_after_s <= 3600, "relock_after_s", "must be in [0, 3600]")
        require(0 <= self.keep_frames <= 100000, "keep_frames", "must be in [0, 100000]")

    def store_dir(self, state_dir: Path) -> Path:
        return self.store if self.store is not None else state_dir / "unlock"

    def frames_dir(self, store_dir: Path) -> Path:
        return self.frames if self.frames is not None else Path(store_dir) / "frames"


@dataclass
class CameraTrainingSettings:
    """What a device needs for train.method "camera" (edge_agent.camera_trainer) besides `data`, which then holds
    its camera frames of its owner(s): ArcFace-aligned 112x112 crops, a folder per person named as enrolled."""

    bank: Path  # the public face bank shipped with the model: aligned crops, a folder per identity
    enrolment: Path | None = None  # the owners' clean enrolment photos, a folder per person; None: unlock's store
    # What the device knows of its camera, for synthetic pairs: "measured" (on its frames and enrolment,
    # model_zoo.camera_measure, each time they change), or a domain and overrides as `facefed experiment
    # --camera` takes them ("corridor", "door-night,face_px=32", ...); "clean" for no camera model.
    camera: str = MEASURED
    bank_per_identity: int = 4  # bank photos per identity used

    def check(self) -> None:
        require(self.bank.is_dir(), "bank", f"no such directory: {self.bank}")
        require(self.enrolment is None or self.enrolment.is_dir(), "enrolment", f"no such directory: {self.enrolment}")
        require(self.bank_per_identity >= 1, "bank_per_identity", "must be >= 1")
        try:
            if self.camera != MEASURED:
                parse_camera(self.camera)
        except ValueError as exc:
            raise ConfigError("camera", f"{exc} (or {MEASURED!r})") from None


@dataclass
class AgentConfig:
    device_id: str
    data: Path  # this device's own labelled faces (ORL, Yale or folder-per-identity layout)
    state_dir: Path  # the private classifier head and agent state; never uploaded
    device: DeviceProfile
    profile: str = "x86-dev"
    broker: str = DEFAULT_BROKER
    topic_prefix: str = "facefed"
    protocol: Literal["auto", "3.1.1", "5"] = "auto"
    augment: bool = True
    seed: int = 0
    upload_retries: int = 2
    exit_when_finished: bool = False  # a fleet device keeps waiting for the next federation
    aggregator_key: Path | None = None  # Ed25519 public key: refuse unsigned or altered models and rounds
    # How far this device's clock may be off: a round announcement expired longer ago than this is refused as a replay.
    max_clock_skew_s: float = 6 * 3600.0
    tls: TlsConfig = field(default_factory=TlsConfig)  # files for an mqtts:// broker
    unlock: UnlockSettings = field(default_factory=UnlockSettings)  # face unlock on this device
    # Set: this device trains method "camera" (its owner's unlock in its own camera), not a classifier head.
    camera_training: CameraTrainingSettings | None = None

    def check(self) -> None:
        try:
            validate_device_id(self.device_id)
        except ValueError as exc:
            raise ConfigError("device_id", str(exc)) from None
        try:
            parse_broker_url(self.broker)
        except ValueError as exc:
            raise ConfigError("broker", str(exc)) from None
        # A camera-training device may start before its first unlock has kept any frame.
        require(self.data.is_dir() or self.camera_training is not None, "data", f"no such directory: {self.data}")
        require(0 <= self.upload_retries <= 10, "upload_retries", "must be in [0, 10]")
        require(0 <= self.max_clock_skew_s <= 30 * 86400, "max_clock_skew_s", "must be in [0, 30 days] seconds")
        if self.aggregator_key is not None:
            require(self.aggregator_key.is_file(), "aggregator_key", f"no such file: {self.aggregator_key}")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def load_agent_config(path: str | Path, overrides: dict | None = None) -> AgentConfig:
    path = Path(path)
    raw = merge_dicts(read_yaml(path), overrides or {})
    return parse_config(AgentConfig, {**raw, "device": _device_section(raw, path)}, source=str(path),
                        base_dir=path.parent)


def load_device_profile(path: str | Path) -> DeviceProfile:
    """The device profile agent.yaml names (default x86-dev), with its `device:` overrides, validated alone:
    enroll, unlock and calibrate take the face detector and landmark net from it."""
    path = Path(path)
    try:
        return parse_config(DeviceProfile, _device_section(read_yaml(path), path))
    except ConfigError as exc:
        raise ConfigError(f"device.{exc.field}", exc.reason, str(path)) from None


def _device_section(raw: dict, path: Path) -> dict:
    profile_name = raw.get("profile", "x86-dev")
    if not isinstance(profile_name, str):
        raise ConfigError("profile", f"expected a profile name or YAML path, got {profile_name!r}", str(path))
    try:
        profile_file = profile_path(profile_name)
    except FileNotFoundError as exc:
        raise ConfigError("profile", str(exc), str(path)) from None
    return merge_dicts(read_yaml(profile_file), raw.get("device") or {})


def load_unlock_settings(path: str | Path) -> tuple[UnlockSettings, Path | None]:
    """(the `unlock:` section, the template store) of agent.yaml or of a YAML file holding only that section.

    Only that section is validated: enroll, unlock and calibrate need no broker and no training data. The
    store is unlock.store, else <state_dir>/unlock when the file names a state_dir, else None.
    """
    path = Path(path)
    raw = read_yaml(path)
    settings = _parse_unlock(raw.get("unlock") or {}, path)
    state_dir = raw.get("state_dir")
    if settings.store is None and isinstance(state_dir, str) and state_dir:
        return settings, settings.store_dir(path.parent / Path(state_dir).expanduser())
    return settings, settings.store


def update_unlock_settings(path: str | Path, values: dict) -> UnlockSettings:
    """Merge values into the `unlock:` section of the YAML at path (created if absent), validate, rewrite.

    The file is rewritten by yaml.safe_dump: its comments are not kept.
    """
    path = Path(path)
    raw = read_yaml(path) if path.exists() else {}
    unlock = merge_dicts(raw.get("unlock") or {}, values)
    settings = _parse_unlock(unlock, path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump({**raw, "unlock": unlock}, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return settings


def _parse_unlock(section: dict, path: Path) -> UnlockSettings:
    try:
        return parse_config(UnlockSettings, section, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"unlock.{exc.field}", exc.reason, str(path)) from None
