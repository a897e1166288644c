"""JSON control messages of the FaceFed protocol.

Every message carries "protocol": PROTOCOL_VERSION. `from_json` checks types and
ranges and raises ProtocolError naming the offending field; unknown fields are
ignored so later versions can add optional fields. `to_json` runs the same
checks first, so a sender can never emit what a receiver would reject.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ProtocolError
from .topics import validate_device_id

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # bounds JSON parsing; a 512 MiB manifest at 64 KiB chunks is ~0.6 MiB
# n_k is a claim (PROTOCOL.md 4.2.1). Above 2^53 an integer is no longer exact as a float64 weight, so such a
# manifest is malformed: checked on the integer, before anything converts it to a float.
MAX_NUM_SAMPLES = 2**53
# The most faces one device can train on: an agent holds its whole data set in memory as uint8 112x112x3 (37,632
# bytes a face, model_zoo.data), and the largest device profile (firmware_configs/: Jetson Orin Nano, Pi 5) has
# 8 GB, so about 228,000 faces at most. The aggregator's default max_samples_per_update; agents may read it too.
DEVICE_MAX_SAMPLES = 250_000
SAFETENSORS_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64"}
)
CODECS = frozenset({"safetensors", "int8-delta", "topk-int8-delta", "patch"})  # see compression.py
TRANSFER_KINDS = frozenset({"global", "update", "statistics"})
ROUND_STATES = frozenset({"open", "statistics", "finished"})
DEVICE_STATES = frozenset({"online", "training", "uploading", "idle", "offline"})
DP_MODES = frozenset({"central", "distributed"})

_ID_HEX = re.compile(r"[0-9a-f]{32}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA256_OR_EMPTY = re.compile(r"(?:[0-9a-f]{64})?")
_SIGNATURE_B64 = re.compile(r"(?:[A-Za-z0-9+/]{86}==)?")  # a 64-byte Ed25519 signature, or empty
_MISSING = object()
_M = TypeVar("_M", bound="_Message")
_T = TypeVar("_T")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _load_object(data: bytes) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("json", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("json", f"{len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} byte message limit")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("json", f"not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("json", f"expected an object, got {type(obj).__name__}")
    return obj


def _dump(obj: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("json", f"not JSON-serialisable: {exc}") from None
    return text.encode("utf-8")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fits_float(value: numbers.Real) -> bool:
    """Finite as a float; a JSON integer like 10**400 is not (float() of it would raise OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def brief_int(value: int) -> str:
    """An integer for an error message: a claimed 10**400 is named by its length, not by 401 digits."""
    text = str(value)
    return text if len(text) <= 24 else f"an integer of {len(text)} digits"


class _Fields:
    """Typed reads from a decoded JSON object; errors carry the field's path."""

    def __init__(self, obj: Mapping[str, Any], path: str = "") -> None:
        self._obj = obj
        self._path = path

    def name(self, key: str) -> str:
        return f"{self._path}{key}"

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self._obj:
            return self._obj[key]
        if default is _MISSING:
            raise ProtocolError(self.name(key), "missing")
        return default

    def fail(self, key: str, reason: str) -> ProtocolError:
        return ProtocolError(self.name(key), reason)

    def protocol(self) -> int:
        version = self.integer("protocol")
        if version != PROTOCOL_VERSION:
            raise self.fail("protocol", f"unsupported version {version} (this side speaks {PROTOCOL_VERSION})")
        return version

    def text(self, key: str, *, default: Any = _MISSING, pattern: re.Pattern | None = None,
            choices: frozenset[str] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"{value!r} does not match {pattern.pattern}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {sorted(choices)}")
        return value

    def integer(self, key: str, *, minimum: int | None = 0, maximum: int | None = None,
                nullable: bool = False) -> int | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        if not _is_int(value):
            raise self.fail(key, f"expected an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"{brief_int(value)} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"{brief_int(value)} is above the maximum {brief_int(maximum)}")
        return int(value)

    def number(self, key: str, *, minimum: float | None = None, nullable: bool = False) -> float | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        if not _is_real(value) or not _fits_float(value):
            raise self.fail(key, f"expected a finite number, got {brief_int(value) if _is_int(value) else repr(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"{value} is below the minimum {minimum}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true/false, got {type(value).__name__}")
        return value

    def device_id(self, key: str) -> str:
        return validate_device_id(self.raw(key), self.name(key))

    def array(self, key: str) -> list[Any]:
        value = self.raw(key)
        if not isinstance(value, (list, tuple)):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return list(value)

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        value = self.raw(key, default)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail(key, f"expected an object, got {type(value).__name__}")
        return dict(value)

    def float_map(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> dict[str, float | None]:
        inner = _Fields(self.mapping(key, default), f"{self.name(key)}.")
        return {name: inner.number(name, nullable=nullable) for name in inner._obj}

    def items(self, key: str) -> list[_Fields]:
        """The list under `key`, each element read as an object."""
        elements = self.array(key)
        paths = [f"{self.name(key)}[{i}]" for i in range(len(elements))]
        for path, element in zip(paths, elements):
            if not isinstance(element, Mapping):
                raise ProtocolError(path, f"expected an object, got {type(element).__name__}")
        return [_Fields(element, path + ".") for path, element in zip(paths, elements)]

    def each(self, key: str, read: Callable[[object, str], _T], default: Any = _MISSING) -> list[_T]:
        """The list under `key` with `read(value, field_name)` applied to each element."""
        if key not in self._obj and default is not _MISSING:
            return default
        return [read(value, f"{self.name(key)}[{i}]") for i, value in enumerate(self.array(key))]


def _matching(pattern: re.Pattern) -> Callable[[object, str], str]:
    def read(value: object, name: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ProtocolError(name, f"{value!r} does not match {pattern.pattern}")
        return value

    return read


class _Message:
    """JSON encoding shared by all top-level messages."""

    @classmethod
    def from_fields(cls: type[_M], f: _Fields) -> _M:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[_M], obj: Mapping[str, Any]) -> _M:
        f = _Fields(obj)
        f.protocol()  # checked first: a newer sender gets a version error, not a confusing field error
        return cls.from_fields(f)

    @classmethod
    def from_json(cls: type[_M], data: bytes) -> _M:
        return cls.from_dict(_load_object(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        # Re-reading validates (naming the field) and turns numpy scalars into plain numbers.
        return _dump(type(self).from_dict(self.to_dict()).to_dict())

    def signing_bytes(self) -> bytes:
        """What a signature covers: the canonical JSON (sorted keys, no spaces) without "signature"."""
        canonical = type(self).from_dict(self.to_dict()).to_dict()
        canonical.pop("signature", None)
        return _dump(canonical)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "F32", "F16", "I64", ...

    @classmethod
    def from_fields(cls, f: _Fields) -> TensorSpec:
        name = f.text("name")
        if not name:
            raise f.fail("name", "empty")
        shape = tuple(f.each("shape", _read_dim))
        return cls(name, shape, f.text("dtype", choices=SAFETENSORS_DTYPES))


def _read_dim(value: object, name: str) -> int:
    if not _is_int(value) or value < 0:
        raise ProtocolError(name, f"expected a non-negative integer, got {value!r}")
    return int(value)


@dataclass
class TransferManifest(_Message):
    """Describes one chunked tensor transfer; published after all of its chunks."""

    kind: str  # "global" | "update" | "statistics" (BatchNorm statistics measured on a global model)
    transfer_id: str  # 32 lowercase hex
    sender: str  # device id or "aggregator"
    round: int
    model_version: int
    num_samples: int  # n_k, the FedAvg weight (a claim, at most MAX_NUM_SAMPLES); 0 for global
    tensors: list[TensorSpec]
    payload_bytes: int
    payload_sha256: str
    chunk_size: int  # data bytes per chunk (the last may be shorter)
    chunk_sha256: list[str]  # sha256 of each chunk's data, header excluded
    metrics: dict[str, float | None] = field(default_factory=dict)  # claims of the sender; null: not finite
    codec: str = "safetensors"
    signature: str = ""  # Ed25519 over signing_bytes(), base64; "" = unsigned (see fedwire/signing.py)
    protocol: int = PROTOCOL_VERSION
    # Download codec (PROTOCOL.md section 5.2), global transfers only. Both are left out of the JSON when unset,
    # so a manifest without them is byte for byte what earlier versions sent.
    base_version: int | None = None  # codec int8-delta: the global version this delta applies to; patch: the same
    model_sha256: str = ""  # sha256 of the safetensors payload of the model the receiver rebuilds

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)

    @classmethod
    def from_fields(cls, f: _Fields) -> TransferManifest:
        manifest = cls(
            kind=f.text("kind", choices=TRANSFER_KINDS),
            transfer_id=f.text("transfer_id", pattern=_ID_HEX),
            sender=f.device_id("sender"),
            round=f.integer("round"),
            model_version=f.integer("model_version"),
            num_samples=f.integer("num_samples", maximum=MAX_NUM_SAMPLES),
            tensors=[TensorSpec.from_fields(item) for item in f.items("tensors")],
            payload_bytes=f.integer("payload_bytes", minimum=1),
            payload_sha256=f.text("payload_sha256", pattern=_SHA256_HEX),
            chunk_size=f.integer("chunk_size", minimum=1),
            chunk_sha256=f.each("chunk_sha256", _matching(_SHA256_HEX)),
            metrics=f.float_map("metrics", {}, nullable=True),
            codec=f.text("codec", default="safetensors", choices=CODECS),
            signature=f.text("signature", default="", pattern=_SIGNATURE_B64),
            base_version=f.integer("base_version", nullable=True) if "base_version" in f._obj else None,
            model_sha256=f.text("model_sha256", default="", pattern=_SHA256_OR_EMPTY),
        )
        _check_manifest_consistency(manifest)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        # A metric that is not finite (a diverged train loss) travels as null (PROTOCOL.md section 4).
        obj["metrics"] = {k: None if _is_real(v) and not _fits_float(v) else v for k, v in obj["metrics"].items()}
        if obj["base_version"] is None:
            del obj["base_version"]
        if not obj["model_sha256"]:
            del obj["model_sha256"]
        return obj


def _check_manifest_consistency(m: TransferManifest) -> None:
    expected_chunks = -(-m.payload_bytes // m.chunk_size)
    if m.chunk_count != expected_chunks:
        raise ProtocolError(
            "chunk_sha256",
            f"{m.chunk_count} hashes, but {m.payload_bytes} bytes in chunks of {m.chunk_size} make {expected_chunks}",
        )
    names = [spec.name for spec in m.tensors]
    if len(set(names)) != len(names):
        raise ProtocolError("tensors", "duplicate tensor names")
    if m.base_version is not None:
        if m.kind != "global" or m.codec == "safetensors":
            raise ProtocolError("base_version", "only a compressed global transfer (a delta) names a base version")
        if m.codec == "patch" and m.base_version != m.model_version:
            raise ProtocolError("base_version", f"a patch completes the version it names: {m.base_version} is not "
                                f"model_version {m.model_version}")
        if m.codec != "patch" and m.base_version >= m.model_version:
            raise ProtocolError("base_version", f"{m.base_version} is not older than model_version {m.model_version}")
        if not m.model_sha256:
            raise ProtocolError("model_sha256", "a delta must name the sha256 of the model it rebuilds")
    elif m.kind == "global" and m.codec != "safetensors":
        raise ProtocolError("base_version", f"a global transfer with codec {m.codec} must name its base version")


UPLOAD_CODECS = ("safetensors", "int8-delta", "topk-int8-delta")  # train.codec; see compression.py
DOWNLOAD_CODECS = ("safetensors", "int8-delta")  # train.download_codec
# train.method: "arcface", a classifier head over the device's labelled people (edge_agent.trainer); "camera",
# one owner's camera adaptation of the face-api descriptor (model_zoo.camera_adapt, edge_agent.camera_trainer).
TRAIN_METHODS = ("arcface", "camera")


def _require(condition: bool, name: str, reason: str) -> None:
    if not condition:
        raise ProtocolError(name, reason)


@dataclass(frozen=True)
class CameraLossWeights:
    """The camera-adaptation loss terms' weights (model_zoo.camera_adapt says what each term is)."""

    pairs: float = 1.0
    align: float = 2.0
    clean: float = 0.5
    bank: float = 1.0
    push: float = 1.0
    spread: float = 10.0  # small in value (a squared distance mismatch): it needs the weight to matter


@dataclass(frozen=True)
class CameraTraining:
    """train.camera: how devices adapt with method "camera" (model_zoo.camera_adapt.AdaptConfig takes its
    defaults from here: one set for the experiment, the aggregator and the devices)."""

    steps: int = 8  # Adam steps per round
    batch: int = 8  # images per loss term per step
    lr: float = 1e-2  # scale/shift: values near 1 and 0, large steps are fine
    personal_lr: float = 2e-5  # the personal part's conv and projection weights: pretrained, easily wrecked
    l2sp: float = 1e-2  # pull of every trained tensor towards version 0
    weights: CameraLossWeights = field(default_factory=CameraLossWeights)

    def check(self) -> None:
        _require(1 <= self.steps <= 10000, "camera.steps", "must be in [1, 10000]")
        _require(1 <= self.batch <= 1024, "camera.batch", "must be in [1, 1024]")
        _require(0 < self.lr <= 1, "camera.lr", "must be in (0, 1]")
        _require(0 < self.personal_lr <= 1, "camera.personal_lr", "must be in (0, 1]")
        _require(0 <= self.l2sp <= 1e5, "camera.l2sp", "must be in [0, 1e5]")
        for name, value in dataclasses.asdict(self.weights).items():
            _require(0 <= value <= 1e4, f"camera.weights.{name}", "must be in [0, 1e4]")


@dataclass
class TrainSettings:
    """How devices train in a round: the `train:` section of aggregator.yaml, announced in every round's `train`.

    The one set of defaults for both sides: the aggregator writes every field, the agent reads exactly these
    (an unknown or malformed field is a ProtocolError naming it, so no device trains on a setting it does not
    understand). A new setting is a field with its default here and its range in check(); a group of
    settings may be a nested dataclass (read the same way).
    """

    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    margin: float = 0.5  # ArcFace additive angular margin of the devices' heads, in radians
    proximal_mu: float = 0.0  # FedProx: devices add mu/2 * ||w - w_global||^2 to their loss (0: plain FedAvg)
    l2sp_alpha: float = 0.0  # L2-SP: devices add alpha/2 * ||w - w_version0||^2, a fixed pull to the pretrained model
    # Single-identity devices: this many fixed random negative class vectors, generated on each device from
    # anchor_seed, join every head as negatives (0: off). See model_zoo/losses/anchors.py.
    negative_anchors: int = 0
    anchor_seed: int = 0
    method: str = "arcface"  # TRAIN_METHODS
    camera: CameraTraining = field(default_factory=CameraTraining)  # method "camera" only
    # Filled in by the aggregator from its own fields (update_codec, update_topk, download_codec, model), never
    # from aggregator.yaml's train: section (AggregatorConfig.check refuses them there).
    codec: str = "safetensors"  # how devices send updates (PROTOCOL.md 5.1)
    codec_topk: float | None = None  # topk-int8-delta only: share of each kernel's elements sent
    download_codec: str = "safetensors"  # informational: each global manifest declares its own codec
    model: dict[str, Any] = field(default_factory=dict)  # backbone arch and constructor kwargs

    SET_BY_AGGREGATOR = ("codec", "codec_topk", "download_codec", "model")

    def check(self) -> None:
        _require(1 <= self.local_epochs <= 1000, "local_epochs", "must be in [1, 1000]")
        _require(0 <= self.proximal_mu <= 100, "proximal_mu", "must be in [0, 100]")
        _require(0 <= self.l2sp_alpha <= 1e5, "l2sp_alpha", "must be in [0, 1e5]")
        _require(0 <= self.negative_anchors <= 65536, "negative_anchors", "must be in [0, 65536] (0 = off)")
        _require(self.anchor_seed >= 0, "anchor_seed", "must be >= 0")
        _require(0 <= self.margin < 1.5, "margin", "must be in [0, 1.5) radians")
        _require(self.method in TRAIN_METHODS, "method", f"{self.method!r} is not one of {list(TRAIN_METHODS)}")
        self.camera.check()
        _require(0 < self.lr <= 10, "lr", "must be in (0, 10]")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.codec in UPLOAD_CODECS, "codec", f"{self.codec!r} is not one of {list(UPLOAD_CODECS)}")
        _require(self.codec_topk is None or 0 < self.codec_topk <= 1, "codec_topk", "must be in (0, 1]")
        _require(self.download_codec in DOWNLOAD_CODECS, "download_codec",
                 f"{self.download_codec!r} is not one of {list(DOWNLOAD_CODECS)}")
        _require(all(isinstance(k, str) for k in self.model), "model", "keys must be strings")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> TrainSettings:
        """Strict: every key a known setting of the right type and range, else a ProtocolError naming it."""
        return cls.from_fields(_Fields(obj, "train."))

    @classmethod
    def from_fields(cls, f: _Fields) -> TrainSettings:
        settings = _read_strict(cls, f)
        try:
            settings.check()
        except ProtocolError as exc:
            raise f.fail(exc.field, exc.reason) from None
        return settings

    def to_dict(self) -> dict[str, Any]:
        """The wire object; codec_topk, download_codec, method and camera only where set, as earlier versions
        sent them (an agent that predates a field refuses it)."""
        obj = dataclasses.asdict(self)
        if obj["method"] == "arcface":
            del obj["method"], obj["camera"]
        if obj["codec_topk"] is None:
            del obj["codec_topk"]
        if obj["download_codec"] == "safetensors":
            del obj["download_codec"]
        return obj


def _read_strict(cls: type[_T], f: _Fields) -> _T:
    """Dataclass `cls` from an object holding only its fields, each read by its annotated type."""
    hints = typing.get_type_hints(cls)
    names = [spec.name for spec in dataclasses.fields(cls)]
    unknown = sorted(set(f._obj) - set(names))
    if unknown:
        raise f.fail(unknown[0], f"unknown setting (known: {', '.join(names)})")
    values = {}
    for name in names:
        if name not in f._obj:
            continue
        hint = hints[name]
        nullable = type(None) in typing.get_args(hint)
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if nullable else hint
        if dataclasses.is_dataclass(base):
            values[name] = _read_strict(base, _Fields(f.mapping(name), f"{f.name(name)}."))
        elif base is int:
            values[name] = f.integer(name, minimum=None, nullable=nullable)
        elif base is float:
            values[name] = f.number(name, nullable=nullable)
        elif base is bool:
            values[name] = f.flag(name)
        elif base is str:
            values[name] = f.text(name)
        elif typing.get_origin(base) is dict:
            values[name] = f.mapping(name)
        else:
            raise TypeError(f"{cls.__name__}.{name}: no wire reader for {hint!r}")
    return cls(**values)

@dataclass(frozen=True)
class DpSettings:
    """Differential privacy of the round (PROTOCOL.md 4.1.2), announced so that devices know and can act on it.

    central: the aggregator clips each update to `clip` and adds N(0, (noise_multiplier * clip)^2) to the sum.
    distributed: each device clips its own update and adds N(0, (noise_multiplier * clip)^2 / noise_shares)."""

    mode: str
    clip: float  # L2 bound of each device's update delta (this round's, when the clip adapts)
    noise_multiplier: float  # z: the sum's noise std is z * clip
    noise_shares: int = 1  # distributed: how many devices split the noise (the round's quorum)

    @classmethod
    def from_fields(cls, f: _Fields) -> DpSettings:
        settings = cls(mode=f.text("mode", choices=DP_MODES), clip=f.number("clip", minimum=0.0),
                       noise_multiplier=f.number("noise_multiplier", minimum=0.0),
                       noise_shares=f.integer("noise_shares", minimum=1))
        if settings.clip <= 0:
            raise f.fail("clip", "must be > 0")
        return settings


@dataclass
class RoundAnnouncement(_Message):
    round: int
    model_version: int
    state: str  # "open" (train) | "statistics" (measure BatchNorm statistics on model_version) | "finished"
    announce_id: str  # 32 lowercase hex, new for every announcement
    deadline: float  # unix seconds
    min_clients: int
    train: TrainSettings  # local training hyper-parameters
    participants: list[str] = field(default_factory=list)  # devices sampled for this round; [] = all
    signature: str = ""  # as in TransferManifest
    protocol: int = PROTOCOL_VERSION
    # Freshness (PROTOCOL.md 8.2), both signed and left out of the JSON when unset (earlier aggregators):
    expires: float | None = None  # aggregator's unix seconds after which agents refuse it; None: never
    federation: float | None = None  # when the aggregator's state dir was created: orders federations
    dp: DpSettings | None = None  # left out of the JSON when unset: the bytes earlier versions sent

    @classmethod
    def from_fields(cls, f: _Fields) -> RoundAnnouncement:
        return cls(
            round=f.integer("round"),
            model_version=f.integer("model_version"),
            state=f.text("state", choices=ROUND_STATES),
            announce_id=f.text("announce_id", pattern=_ID_HEX),
            deadline=f.number("deadline", minimum=0.0),
            min_clients=f.integer("min_clients"),
            train=TrainSettings.from_dict(f.mapping("train")),
            participants=f.each("participants", validate_device_id, default=[]),
            signature=f.text("signature", default="", pattern=_SIGNATURE_B64),
            expires=f.number("expires", minimum=0.0) if "expires" in f._obj else None,
            federation=f.number("federation", minimum=0.0) if "federation" in f._obj else None,
            dp=DpSettings.from_fields(_Fields(f.mapping("dp"), "dp.")) if f.raw("dp", None) is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        obj["train"] = self.train.to_dict()
        for name in ("expires", "federation", "dp"):
            if obj[name] is None:
                del obj[name]
        return obj

    @property
    def freshness(self) -> tuple[float, int, int]:
        """Ordering of announcements: a later federation, then a later round, then a later model version."""
        return (self.federation or 0.0, self.round, self.model_version)


@dataclass
class DeviceStatus(_Message):
    device_id: str
    state: str  # "online" | "training" | "uploading" | "idle" | "offline"
    round: int | None
    timestamp: float  # unix seconds
    detail: str = ""
    protocol: int = PROTOCOL_VERSION
    # Optional, for operators' dashboards (PROTOCOL.md 4.3); left out of the JSON when unset, so a status without
    # them is byte for byte what earlier versions sent.
    profile: str = ""  # the device profile it runs (firmware_configs/)
    model_version: int | None = None  # the global model version it holds
    train_window: str = ""  # "open", or why its training window is closed now

    @classmethod
    def from_fields(cls, f: _Fields) -> DeviceStatus:
        return cls(
            device_id=f.device_id("device_id"),
            state=f.text("state", choices=DEVICE_STATES),
            round=f.integer("round", nullable=True),
            timestamp=f.number("timestamp", minimum=0.0),
            detail=f.text("detail", default=""),
            profile=f.text("profile", default=""),
            model_version=f.integer("model_version", nullable=True) if "model_version" in f._obj else None,
            train_window=f.text("train_window", default=""),
        )

    def to_dict(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        for name, unset in (("profile", ""), ("model_version", None), ("train_window", "")):
            if obj[name] == unset:
                del obj[name]
        return obj


@dataclass
class UpdateAck(_Message):
    device_id: str
    round: int
    transfer_id: str
    accepted: bool
    reason: str = ""
    protocol: int = PROTOCOL_VERSION

    @classmethod
    def from_fields(cls, f: _Fields) -> UpdateAck:
        return cls(
            device_id=f.device_id("device_id"),
            round=f.integer("round"),
            transfer_id=f.text("transfer_id", pattern=_ID_HEX),
            accepted=f.flag("accepted"),
            reason=f.text("reason", default=""),
        )


@dataclass
class RoundSummary(_Message):
    round: int
    model_version: int
    clients: list[str]
    num_samples: int
    bytes_up: int
    bytes_down: int
    train_loss: float | None
    metrics: dict[str, float]  # e.g. val_accuracy
    seconds: float
    protocol: int = PROTOCOL_VERSION

    @classmethod
    def from_fields(cls, f: _Fields) -> RoundSummary:
        return cls(
            round=f.integer("round"),
            model_version=f.integer("model_version"),
            clients=f.each("clients", validate_device_id),
            num_samples=f.integer("num_samples"),
            bytes_up=f.integer("bytes_up"),
            bytes_down=f.integer("bytes_down"),
            train_loss=f.number("train_loss", nullable=True),
            metrics=f.float_map("metrics"),
            seconds=f.number("seconds", minimum=0.0),
        )


# ---- sharded aggregation: between aggregator workers and their reducer (PROTOCOL.md section 11) ----

@dataclass
class ShardClose(_Message):
    """Reducer -> workers (retained): stop accepting updates for `round` and send your partial sum."""

    round: int
    announce_id: str  # of the round's latest announcement, so a stale retained close is never obeyed
    protocol: int = 1

    @classmethod
    def from_fields(cls, f: _Fields) -> ShardClose:
        return cls(f.integer("round"), f.text("announce_id"))


@dataclass
class ShardAccepted(_Message):
    """Worker -> reducer: one more update entered worker `worker`'s partial sum (counts towards the quorum)."""

    round: int
    worker: int
    device_id: str
    num_samples: int
    protocol: int = 1

    @classmethod
    def from_fields(cls, f: _Fields) -> ShardAccepted:
        return cls(f.integer("round"), f.integer("worker"), f.device_id("device_id"), f.integer("num_samples"))


@dataclass
class ShardReport(_Message):
    """Worker -> reducer, after its partial transfer: what the partial sum holds."""

    round: int
    worker: int
    transfer_id: str  # the partial sum's transfer, "" when it holds no update
    clients: dict[str, int] = field(default_factory=dict)  # device -> n_k
    train_losses: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    rejected: int = 0
    forwarded: int = 0  # messages this worker routed to other owners
    protocol: int = 1

    @classmethod
    def from_fields(cls, f: _Fields) -> ShardReport:
        clients = f.mapping("clients")
        for device, n in clients.items():
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise f.fail("clients", f"{device}: {n!r} is not a positive int")
        report = cls(f.integer("round"), f.integer("worker"), f.text("transfer_id"), clients,
                     f.float_map("train_losses"), f.integer("bytes_up"), f.integer("rejected"),
                     f.integer("forwarded"))
        if bool(report.clients) != bool(report.transfer_id):
            raise f.fail("transfer_id", "must be set exactly when clients is not empty")
        return report
