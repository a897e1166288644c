"""aggregator.yaml: what the aggregator service reads at start."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedwire.chunking import DEFAULT_MAX_CHUNK_BYTES
from fedwire.config import ConfigError, TlsConfig, load_config, require
from fedwire.mqtt import parse_broker_url
from fedwire.topics import Topics
from model_zoo.backbones import BACKBONES, build_backbone


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

    def backbone_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs: act and embedding_size where the backbone takes them, then the options."""
        accepted = inspect.signature(BACKBONES[self.arch]).parameters
        common = {"act": self.act, "embedding_size": self.embedding_size}
        return {**{k: v for k, v in common.items() if k in accepted}, **self.options}


@dataclass
class TrainSettings:
    """Announced with each round; devices use them over their profile defaults."""

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

    def check(self) -> None:
        require(self.local_epochs >= 1, "local_epochs", "must be >= 1")
        require(0 <= self.proximal_mu <= 100, "proximal_mu", "must be in [0, 100]")
        require(0 <= self.l2sp_alpha <= 1e5, "l2sp_alpha", "must be in [0, 1e5]")
        require(0 <= self.negative_anchors <= 65536, "negative_anchors", "must be in [0, 65536] (0 = off)")
        require(self.anchor_seed >= 0, "anchor_seed", "must be >= 0")
        require(0 <= self.margin < 1.5, "margin", "must be in [0, 1.5) radians")
        require(0 < self.lr <= 10, "lr", "must be in (0, 10]")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")


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
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    shard_workers: int = 1  # > 1: workers share the update stream via MQTT 5 shared subscriptions (docs/scale-out.md)
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
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.min_clients >= 1, "min_clients", "must be >= 1")
        require(self.round_timeout_s > 0, "round_timeout_s", "must be > 0")
        require(1024 <= self.max_chunk_bytes <= 256 * 1024 * 1024, "max_chunk_bytes", "must be in [1 KiB, 256 MiB]")
        require(self.max_update_bytes >= self.max_chunk_bytes, "max_update_bytes", "must be >= max_chunk_bytes")
        require(self.clip_norm is None or self.clip_norm > 0, "clip_norm", "must be > 0 (or null for no clipping)")
        require(0 <= self.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")
        require(self.server_lr is None or self.server_lr > 0, "server_lr", "must be > 0")
        require(0 < self.fraction_fit <= 1, "fraction_fit", "must be in (0, 1]")
        if self.signing_key is not None:
            require(self.signing_key.is_file(), "signing_key", f"no such file: {self.signing_key}")
        require(1 <= self.shard_workers <= 256, "shard_workers", "must be in [1, 256]")
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
            require(self.strategy in ("fedavg", "fedavgm", "fedadam"), "shard_workers",
                    f"works with fedavg, fedavgm and fedadam (sums are additive); {self.strategy} needs every "
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
