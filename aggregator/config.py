"""aggregator.yaml: what the aggregator service reads at start."""

from __future__ import annotations

import inspect
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aggregator.strategies import STRATEGIES
from fedwire.chunking import DEFAULT_MAX_CHUNK_BYTES
from fedwire.config import ConfigError, TlsConfig, load_config, require
from fedwire.messages import DEVICE_MAX_SAMPLES, MAX_NUM_SAMPLES, TrainSettings
from fedwire.mqtt import parse_broker_url
from fedwire.topics import Topics
from model_zoo.backbones import BACKBONES, build_backbone
from model_zoo.checkpoint import load_checkpoint


@dataclass
class ModelConfig:
    arch: str = "mobilefacenet"
    act: Literal["relu", "prelu"] = "relu"  # for backbones that take it (MobileFaceNet)
    embedding_size: int = 128  # likewise
    options: dict[str, Any] = field(default_factory=dict)  # further constructor kwargs, e.g. {trainable: last}
    seed: int = 0
    init_checkpoint: Path | None = None  # start from these weights instead of a seeded init

    def check(self) -> None:
        require(self.arch in BACKBONES, "arch", f"must be one of {', '.join(sorted(BACKBONES))}")
        require(self.embedding_size >= 8, "embedding_size", "must be >= 8")
        require(not {"act", "embedding_size"} & set(self.options), "options",
                "set act and embedding_size as model fields, not options")
        try:  # the constructor knows which values it takes; a pretrained backbone also needs its weights here
            build_backbone(self.arch, **self.backbone_kwargs())
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise ConfigError("options", f"{self.arch} rejects {self.options}: {exc}") from None
        if self.init_checkpoint is not None:
            require(self.init_checkpoint.is_file(), "init_checkpoint", f"no such file: {self.init_checkpoint}")
            try:  # at start, so a truncated file fails here with one line, not in the service with a traceback
                load_checkpoint(self.init_checkpoint)
            except ValueError as exc:
                raise ConfigError("init_checkpoint", str(exc)) from None

    def backbone_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs: act and embedding_size where the backbone takes them, then the options."""
        accepted = inspect.signature(BACKBONES[self.arch]).parameters
        common = {"act": self.act, "embedding_size": self.embedding_size}
        return {**{k: v for k, v in common.items() if k in accepted}, **self.options}


@dataclass
class EvalConfig:
    data: Path | None = None  # held-out identities, any of the three dataset layouts
    every: int = 1

    def check(self) -> None:
        require(self.every >= 1, "every", "must be >= 1")
        if self.data is not None:
            require(self.data.is_dir(), "data", f"no such directory: {self.data}")


@dataclass
class ExportConfig:
    """Deployable files for inference-only devices, written after every round into state_dir/exports."""

    formats: list[str] = field(default_factory=list)  # e.g. [onnx, onnx-int8]
    calibration: Path | None = None  # faces for int8 calibration (any dataset layout)

    def check(self) -> None:
        allowed = ("onnx", "onnx-int8", "tflite", "tflite-int8")
        for i, fmt in enumerate(self.formats):
            require(fmt in allowed, f"formats[{i}]", f"must be one of {', '.join(allowed)}")
        if any(f.endswith("int8") for f in self.formats):
            require(self.calibration is not None and self.calibration.is_dir(), "calibration",
                    "int8 formats need a folder of calibration faces")


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or 'PORT' (on 127.0.0.1) -> (host, port); '[::1]:8080' for IPv6."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080; port 0 = any free port)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


@dataclass
class DashboardConfig:
    """The read-only fleet dashboard (aggregator/dashboard/); off unless `listen` is set (or serve --dashboard)."""

    listen: str | None = None  # HOST:PORT; beyond loopback it needs a token or https with client certificates
    token: str | None = None  # bearer token every request must carry
    token_file: Path | None = None  # the same, read from a file (first line)
    # HTTPS: certfile + keyfile are the page's certificate; ca_cert (the fleet CA) makes browsers present a client
    # certificate it signed.
    https: TlsConfig = field(default_factory=TlsConfig)
    # The dashboard's own broker identity on an mqtts:// broker: the `dashboard` certificate
    # (`facefed-aggregator provision dashboard`), never the aggregator's (the broker would give both one client id).
    mqtt_tls: TlsConfig = field(default_factory=TlsConfig)
    verify_key: Path | None = None  # aggregator's public key; default: signing.pub beside signing_key, if there

    def check(self) -> None:
        if self.listen is None:
            return
        try:
            host, _ = parse_listen(self.listen)
        except ValueError as exc:
            raise ConfigError("listen", str(exc)) from None
        require(self.token is None or len(self.token) >= 16, "token", "must be at least 16 characters")
        if self.token_file is not None:
            require(self.token_file.is_file(), "token_file", f"no such file: {self.token_file}")
            require(len(self.bearer_token() or "") >= 16, "token_file", "must hold a token of at least 16 characters")
        if not is_loopback(host):
            require(self.has_token or (self.https.certfile is not None and self.https.ca_cert is not None), "listen",
                    f"{host} is beyond loopback: set token, token_file or https (certfile, keyfile, ca_cert)")
        if self.verify_key is not None:
            require(self.verify_key.is_file(), "verify_key", f"no such file: {self.verify_key}")

    @property
    def has_token(self) -> bool:
        return self.token is not None or self.token_file is not None

    def bearer_token(self) -> str | None:
        """The token requests must carry: `token`, else the first line of `token_file`, else None (no token)."""
        if self.token is not None or self.token_file is None:
            return self.token
        try:
            lines = self.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("token_file", f"cannot read {self.token_file}: {exc}") from None
        return lines[0].strip() if lines else ""


@dataclass
class DeviceBudgetConfig:
    """What the aggregator takes from one device per round before it drops the rest of that device's messages
    (aggregator/budget.py). null: derived from the model's update size and max_chunk_bytes."""

    transfers: int = 4  # update transfers: the update, resends after transfer faults, BatchNorm statistics
    messages: int | None = None  # null: transfers x (chunks of a whole update + manifest) + 64
    bytes: int | None = None  # null: transfers x the whole update's bytes + 1 MiB
    # The smallest chunks an honest device uploads in (profiles: 128-256 KiB); the derived message budget
    # counts chunks of this size.
    min_chunk_bytes: int = 16 * 1024

    def check(self) -> None:
        require(1 <= self.transfers <= 1000, "transfers", "must be in [1, 1000]")
        require(1024 <= self.min_chunk_bytes <= 256 * 1024 * 1024, "min_chunk_bytes", "must be in [1 KiB, 256 MiB]")
        require(self.messages is None or self.messages >= 1, "messages", "must be >= 1 (or null: derived)")
        require(self.bytes is None or self.bytes >= 1024, "bytes", "must be >= 1024 (or null: derived)")


@dataclass
class AdaptiveClipConfig:
    """Andrew et al. 2021: the clip follows a quantile of the update norms, learned from a noised count."""

    target_quantile: float = 0.5  # share of updates that should pass unclipped
    learning_rate: float = 0.2  # eta of the geometric update C <- C exp(-eta (b - quantile))
    count_stddev: float = 1.0  # std of the noise on the count of unclipped updates (the paper: clients / 20)

    def check(self) -> None:
        require(0 < self.target_quantile < 1, "target_quantile", "must be in (0, 1)")
        require(0 < self.learning_rate <= 10, "learning_rate", "must be in (0, 10]")
        require(self.count_stddev > 0, "count_stddev", "must be > 0")


@dataclass
class DpConfig:
    """Client-level DP-FedAvg (aggregator/dp.py): clip each update, add Gaussian noise, account epsilon."""

    noise_multiplier: float  # z: the noise on the sum of clipped updates has std z * clip
    clip: float = 1.0  # L2 bound of each device's update delta (the starting bound with adaptive clipping)
    # central: the aggregator (trusted) clips and adds the noise; distributed: each device clips its own update
    # and adds its share, so no update leaves a device in the clear.
    mode: Literal["central", "distributed"] = "central"
    delta: float = 1e-5  # epsilon is reported at this delta; keep it below 1 / (number of devices)
    epsilon_budget: float | None = None  # stop training before a round would take epsilon past this
    adaptive: AdaptiveClipConfig | None = None  # central mode only

    def check(self) -> None:
        require(0 < self.noise_multiplier <= 1000, "noise_multiplier", "must be in (0, 1000]")
        require(self.clip > 0, "clip", "must be > 0")
        require(0 < self.delta < 1, "delta", "must be in (0, 1)")
        require(self.epsilon_budget is None or self.epsilon_budget > 0, "epsilon_budget",
                "must be > 0 (or null for no budget)")
        if self.adaptive is not None:
            require(self.mode == "central", "adaptive",
                    "needs mode: central (the aggregator must see each update's norm to count the unclipped ones)")
            require(self.noise_multiplier < 2 * self.adaptive.count_stddev, "adaptive.count_stddev",
                    f"must be > noise_multiplier / 2 = {self.noise_multiplier / 2:g} (part of the privacy budget "
                    "goes to the noised count)")


@dataclass
class AggregatorConfig:
    state_dir: Path
    broker: str | None = None  # None: start an embedded broker on 127.0.0.1:embedded_port
    embedded_port: int = 1883
    topic_prefix: str = "facefed"
    protocol: Literal["auto", "3.1.1", "5"] = "auto"
    client_id: str = "facefed-aggregator"
    rounds: int = 10
    min_clients: int = 2
    round_timeout_s: float = 600.0
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    max_update_bytes: int = 64 * 1024 * 1024
    signing_key: Path | None = None  # Ed25519 PEM: sign every global manifest and round announcement
    tls: TlsConfig = field(default_factory=TlsConfig)  # files for an mqtts:// broker
    strategy: Literal["fedavg", "fedavgm", "fedadam", "median", "trimmed_mean"] = "fedavg"
    server_lr: float | None = None  # fedavgm/fedadam step size; None: 1.0 for fedavgm, 0.01 for fedadam
    update_codec: Literal["safetensors", "int8-delta", "topk-int8-delta"] = "safetensors"  # announced: how devices send updates
    update_topk: float = 0.1  # topk-int8-delta: share of each kernel's elements a device sends (announced)
    # How the global model is published: safetensors (float32, full) or int8-delta (a delta against the previous
    # version, the full model retained on {prefix}/global/full/... for devices that lack it). PROTOCOL.md 5.2.
    download_codec: Literal["safetensors", "int8-delta"] = "safetensors"
    # BatchNorm running statistics of each new global model: "averaged" (FedAvg of the statistics each device
    # measured on its own trained weights) or "measured" (a statistics phase after each round: devices measure
    # them on the averaged weights themselves with forward passes, and those are averaged with weights n_k;
    # PROTOCOL.md 4.1.1). Which scores higher on held-out people depends on the fleet (BENCHMARKS.md, issue 4):
    # measured where devices' images differ in kind, averaged where they are alike or hold one person each.
    bn_statistics: Literal["averaged", "measured"] = "averaged"
    fraction_fit: float = 1.0  # share of the known devices sampled into each round
    seed: int = 0  # client sampling
    clip_norm: float | None = None  # bound each update's L2 distance from the global model
    trim_fraction: float = 0.2  # trimmed_mean: share of values dropped at each end, per coordinate
    # n_k is a device's claim (aggregator/claims.py, PROTOCOL.md 4.2.1): the most one update may claim, and what
    # it weighs. samples: weight n_k, a claim above the cap is rejected; capped: weight min(n_k, cap), a claim above
    # is clamped; uniform: weight 1 (a claim above is clamped). The default cap is what the largest device can hold.
    max_samples_per_update: int = DEVICE_MAX_SAMPLES
    weighting: Literal["samples", "capped", "uniform"] = "samples"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    device_budget: DeviceBudgetConfig = field(default_factory=DeviceBudgetConfig)
    # Device ids whose updates are refused, one per line: `facefed-aggregator revoke` keeps PKI/revoked.txt (read at
    # start and again whenever the file changes).
    revoked_devices: Path | None = None
    shard_workers: int = 1  # > 1: workers share the update stream via MQTT 5 shared subscriptions (docs/scale-out.md)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    dp: DpConfig | None = None  # differential privacy (README, Privacy); off when unset

    def check(self) -> None:
        if self.broker is not None:
            try:
                parse_broker_url(self.broker)
            except ValueError as exc:
                raise ConfigError("broker", str(exc)) from None
        require(0 <= self.embedded_port <= 65535, "embedded_port", "must be a TCP port (0 = any free port)")
        require(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "#+"),
                "topic_prefix", "must be non-empty without MQTT wildcards")
        for name in TrainSettings.SET_BY_AGGREGATOR:
            require(getattr(self.train, name) == getattr(TrainSettings(), name), f"train.{name}",
                    "is announced from the aggregator's own fields (update_codec, update_topk, download_codec, model)")
        if self.train.method == "camera":  # devices adapt face-api's scales and shifts and keep a personal part
            options = self.model.options
            require(self.model.arch == "faceapi-resnet" and options.get("shared") == "scale_shift", "train.method",
                    "camera needs model: {arch: faceapi-resnet, options: {shared: scale_shift, ...}}")
            require(self.bn_statistics == "averaged", "bn_statistics",
                    "measured has nothing to measure with train.method camera (face-api has no BatchNorm)")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.min_clients >= 1, "min_clients", "must be >= 1")
        require(self.round_timeout_s > 0, "round_timeout_s", "must be > 0")
        require(1024 <= self.max_chunk_bytes <= 256 * 1024 * 1024, "max_chunk_bytes", "must be in [1 KiB, 256 MiB]")
        require(self.max_update_bytes >= self.max_chunk_bytes, "max_update_bytes", "must be >= max_chunk_bytes")
        require(self.clip_norm is None or self.clip_norm > 0, "clip_norm", "must be > 0 (or null for no clipping)")
        require(0 <= self.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")
        require(self.server_lr is None or self.server_lr > 0, "server_lr", "must be > 0")
        require(1 <= self.max_samples_per_update <= MAX_NUM_SAMPLES, "max_samples_per_update",
                "must be in [1, 2^53]")
        require(0 < self.fraction_fit <= 1, "fraction_fit", "must be in (0, 1]")
        if self.signing_key is not None:
            require(self.signing_key.is_file(), "signing_key", f"no such file: {self.signing_key}")
        if self.revoked_devices is not None:
            require(self.revoked_devices.is_file(), "revoked_devices", f"no such file: {self.revoked_devices}")
        require(1 <= self.shard_workers <= 256, "shard_workers", "must be in [1, 256]")
        require(self.dashboard.listen is None or self.broker is not None or self.embedded_port != 0, "dashboard",
                "needs the broker's address: set broker, or an embedded_port other than 0")
        require(self.dashboard.listen is None or self.dashboard.mqtt_tls.certfile is None
                or self.dashboard.mqtt_tls.certfile != self.tls.certfile, "dashboard.mqtt_tls",
                "use the dashboard's own certificate, not the aggregator's (one certificate = one client id)")
        require(0 < self.update_topk <= 1, "update_topk", "must be in (0, 1]")
        require(self.download_codec == "safetensors" or self.shard_workers == 1, "download_codec",
                "int8-delta downloads need shard_workers: 1 (workers read the global model as float32)")
        require(self.bn_statistics == "averaged" or self.shard_workers == 1, "bn_statistics",
                "measured needs shard_workers: 1 (the statistics phase is not sharded)")
        if self.shard_workers > 1:
            require(self.broker is not None, "shard_workers",
                    "needs an MQTT 5 broker with shared subscriptions (set broker: mqtt://...; the embedded "
                    "amqtt broker speaks only MQTT 3.1.1)")
            require(self.protocol != "3.1.1", "shard_workers", "needs MQTT 5 (protocol: 5 or auto), not 3.1.1")
            require(self.weighting != "uniform", "weighting",
                    "uniform needs shard_workers: 1 (shard reports weigh partial sums by their n_k)")
            partial = sorted(name for name, cls in STRATEGIES.items() if cls.supports_partial_sums)
            require(STRATEGIES[self.strategy].supports_partial_sums, "shard_workers",
                    f"works with {', '.join(partial)} (sums are additive); {self.strategy} needs every "
                    "update in one process")

        if self.dp is not None:
            # The sensitivity C / k of the noised mean holds for a linear rule over equally weighted updates:
            # aggregator/dp.py weighs every update 1 (n_k is a claim), and clips with dp.clip itself.
            require(self.strategy in ("fedavg", "fedavgm", "fedadam"), "dp",
                    f"works with fedavg, fedavgm and fedadam; {self.strategy} is not a mean of the updates, so "
                    "noise calibrated to the clip does not bound what one update changes")
            require(self.clip_norm is None, "clip_norm", "leave it unset with dp: dp.clip bounds each update")
            require(self.shard_workers == 1, "dp", "needs shard_workers: 1 (the noise is added once, in one process)")
            require(self.bn_statistics == "averaged", "bn_statistics",
                    "must be averaged with dp: the statistics phase would release measured statistics without noise")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def load_aggregator_config(path: str | Path, overrides: dict | None = None) -> AggregatorConfig:
    return load_config(AggregatorConfig, path, overrides)
