"""Side-by-side comparison: centralized, local-only and federated training on the same faces.

Every method starts from the same seeded backbone, sees the same training images and runs the same
number of local epochs per client (rounds x local_epochs), and is scored on the same held-out
identities, which no client trains on:

- centralized: all client partitions pooled, the upper bound nobody may do in practice;
- local: each client alone on its own partition (reported as the mean and the worst client);
- fedavg, fedprox and a server optimizer (fedavgm or fedadam): `facefed.simulate.run_simulation`, the
  real MQTT path: broker, aggregator service and one agent process per client;
- single-identity clients (one person per device): plain FedAvg against the negative-anchor remedy
  (model_zoo/losses/anchors.py), both over MQTT.

BatchNorm statistics of a federated model (`bn_statistics`): by default the federated arms keep FedAvg's average
of the statistics each client measured on its own trained weights. With `measured`, the aggregator runs a
statistics phase after each round (PROTOCOL.md 4.1.1: the clients measure the statistics on the averaged weights,
over MQTT) and also scores the model with the averaged statistics, kept in results.json (`uncalibrated`,
`val_accuracy_uncalibrated` per round) and as the `*_averaged_bn` rows: a paired comparison on the same weights.
Which scores higher on held-out identities depends on the clients (BENCHMARKS.md, issue 4): measured where
their images differ in kind (the full preset), averaged where they are alike (ORL alone, the quick preset).

The centralized and local arms are one-device federations in this process (facefed.inprocess.run_inprocess):
the aggregator's round engine with one edge_agent LocalTrainer, device k's own data, seed and head for local
client k (as facefed.simulate gives agent k), one device holding every client's data for centralized. Each
trains exactly as a device does, and the FedAvg of one update is that update, so these arms are what the device
would reach alone; their per-round curves are the engine's evaluations.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aggregator.config import AggregatorConfig
from aggregator.models import FaceModels
from aggregator.rounds import AVERAGED_BN_SUFFIX
from edge_agent.trainer import LocalTrainer
from facefed.inprocess import Device, InProcessModels, run_inprocess
from facefed.simulate import SimulationConfig, SimulationError, run_simulation
from fedwire.config import parse_config
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors
from model_zoo.data import FaceDataset, load_datasets
from model_zoo.metrics import far_key, rank1_accuracy, verification_report
from model_zoo.partition import (cap_per_identity, partition_by_identity, partition_dirichlet, skewed_weights,
                                 split_holdout)
from model_zoo.train import embed_images

log = logging.getLogger("facefed.experiment")

SERVER_STRATEGIES = ("fedavgm", "fedadam")
MAIN_METHODS = ("centralized", "local", "fedavg", "fedprox", "server")  # "server": cfg.server_strategy
SINGLE_FEDAVG, SINGLE_ANCHORS = "single_identity_fedavg", "single_identity_anchors"
TAR_KEY = far_key(1e-2)
LABELS = {"centralized": "centralized (pooled)", "local_mean": "local only, mean client",
          "local_worst": "local only, worst client", "fedavg": "FedAvg", "fedprox": "FedProx",
          "fedavgm": "FedAvgM (server momentum)", "fedadam": "FedAdam (server Adam)",
          SINGLE_FEDAVG: "1 identity/client: FedAvg", SINGLE_ANCHORS: "1 identity/client: FedAvg + anchors",
          "fedavg_averaged_bn": "FedAvg, averaged BN statistics (no pass)"}


class ExperimentError(ValueError):
    pass


@dataclass
class ExperimentConfig:
    data: list[Path]
    out: Path
    clients: int = 4
    rounds: int = 5
    local_epochs: int = 2  # per round; every method gets rounds x local_epochs epochs per client
    lr: float = 0.05
    margin: float = 0.5
    batch_size: int = 32
    split: str = "identity"  # "identity" or "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration
    size_skew: float = 1.0  # identity split: the largest client holds about this many times the smallest's identities
    holdout: int | None = None  # held-out identities; None: a quarter
    max_per_identity: int | None = None  # cap images per identity (celeb-dev has hundreds)
    seed: int = 0
    proximal_mu: float = 0.01
    server_strategy: str = "fedavgm"
    server_lr: float | None = None  # None: the aggregator's default for the strategy
    fraction_fit: float = 1.0  # federated arms: share of clients sampled per round
    min_clients: int | None = None  # federated arms: round quorum (None: all sampled clients)
    round_timeout_s: float = 600.0  # federated arms: round deadline; late updates are dropped
    single_identity_clients: int = 0  # > 0: also run the single-identity comparison with this many devices
    negative_anchors: int = 64
    # Federated arms: "averaged" (FedAvg of the clients' BatchNorm statistics) or "measured" (a statistics phase
    # after each round; both are then scored, see the module docstring).
    bn_statistics: str = "averaged"
    methods: tuple[str, ...] = MAIN_METHODS
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # torch threads in this process
    jobs: int = 1  # arms run at the same time; per-arm wall times then overlap
    preset: str | None = None  # for the record only

    def check(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ExperimentError(what)

        need(bool(self.data), "data: give at least one dataset folder")
        for path in self.data:
            need(Path(path).is_dir(), f"data: no such dataset folder: {path}")
        need(3 <= self.clients <= 20, f"clients must be in [3, 20], got {self.clients}")
        need(self.rounds >= 1 and self.local_epochs >= 1,
             f"rounds and local_epochs must be >= 1, got {self.rounds} and {self.local_epochs}")
        need(0 < self.lr <= 10, f"lr must be in (0, 10], got {self.lr}")
        need(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        need(self.split in ("identity", "dirichlet"), f"split must be identity or dirichlet, got {self.split!r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(self.size_skew >= 1, f"size_skew must be >= 1 (1 = equal clients), got {self.size_skew}")
        need(self.holdout is None or self.holdout >= 2, f"holdout must be >= 2 identities, got {self.holdout}")
        need(self.max_per_identity is None or self.max_per_identity >= 2,
             f"max_per_identity must be >= 2, got {self.max_per_identity}")
        need(0 < self.proximal_mu <= 100, f"proximal_mu must be in (0, 100] (0 is plain FedAvg), got {self.proximal_mu}")
        need(self.server_strategy in SERVER_STRATEGIES,
             f"server_strategy must be one of {', '.join(SERVER_STRATEGIES)}, got {self.server_strategy!r}")
        need(self.server_lr is None or self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")
        need(0 < self.fraction_fit <= 1, f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        need(self.min_clients is None or 1 <= self.min_clients <= self.clients,
             f"min_clients must be in [1, clients={self.clients}], got {self.min_clients}")
        need(self.round_timeout_s > 0, f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        need(self.single_identity_clients == 0 or 3 <= self.single_identity_clients <= 20,
             f"single_identity_clients must be 0 (off) or in [3, 20], got {self.single_identity_clients}")
        need(1 <= self.negative_anchors <= 65536, f"negative_anchors must be in [1, 65536], got {self.negative_anchors}")
        unknown = set(self.methods) - set(MAIN_METHODS)
        need(not unknown, f"unknown methods {sorted(unknown)}; known: {', '.join(MAIN_METHODS)}")
        need(self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        need(1 <= self.jobs <= 16, f"jobs must be in [1, 16], got {self.jobs}")
        need(self.bn_statistics in ("averaged", "measured"),
             f"bn_statistics must be averaged or measured, got {self.bn_statistics!r}")


PRESETS: dict[str, dict] = {
    # One local epoch per round: with 2, the first rounds' client models (disjoint identities, from a random
    # start) drifted so far apart that their average scored below the random model (0.58 held-out accuracy).
    # ORL alone, 4 clients of unequal size, 6 rounds x 1 epoch (at 4, FedAvg led local-only by 1 point only).
    # Reduced to the arms the ordering is about, so it fits 5 minutes on 2 cores: no server-optimizer arm and no
    # single-identity comparison (the full preset has both).
    "quick": {"datasets": ("orl",), "clients": 4, "rounds": 6, "local_epochs": 1, "holdout": 10, "size_skew": 2.0,
              "batch_size": 16, "single_identity_clients": 0, "methods": ("centralized", "local", "fedavg", "fedprox"),
              "jobs": 3},
    # ORL + Yale + celeb-dev (8 images per person: celeb-dev has hundreds), 6 clients of unequal size. 10 rounds
    # (10 epochs per client for every method): at 8, FedAvg was still rising by about a point per round while
    # local-only had levelled off at 0.83-0.85 from epoch 3 on. Measured BatchNorm statistics: with clients whose
    # images differ in kind (grey ORL / Yale, colour celeb-dev) they scored higher than the averaged ones at every
    # round of the 8-round run; both are reported (the *_averaged_bn rows).
    "full": {"datasets": ("orl", "yale", "celeb-dev"), "clients": 6, "rounds": 10, "local_epochs": 1, "holdout": 16,
             "size_skew": 3.0, "max_per_identity": 8, "batch_size": 16, "single_identity_clients": 8, "jobs": 3,
             "bn_statistics": "measured"},
}


def preset_config(name: str, datasets_root: Path, out: Path, **overrides) -> ExperimentConfig:
    """An ExperimentConfig from a preset; overrides (None values ignored) replace preset fields."""
    if name not in PRESETS:
        raise ExperimentError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    settings = dict(PRESETS[name])
    data = [Path(datasets_root) / d for d in settings.pop("datasets")]
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig(data=settings.pop("data", data), out=out, preset=name, **settings)


@dataclass
class Setup:
    """The data every method shares."""

    clients: list[FaceDataset]
    holdout: FaceDataset
    single_clients: list[FaceDataset]  # one identity each (empty: comparison off)
    identities: int
    images: int


def prepare_setup(cfg: ExperimentConfig) -> Setup:
    dataset = load_datasets(cfg.data)
    if cfg.max_per_identity is not None:
        dataset = dataset.subset(cap_per_identity(dataset.labels, cfg.max_per_identity, cfg.seed))
    num_ids = dataset.num_classes
    holdout = cfg.holdout if cfg.holdout is not None else max(2, num_ids // 4)
    if num_ids - holdout < max(cfg.clients, cfg.single_identity_clients):
        raise ExperimentError(f"{num_ids} identities cannot give {max(cfg.clients, cfg.single_identity_clients)} "
                              f"clients plus {holdout} held out; lower --clients or --holdout")
    train_idx, holdout_idx = split_holdout(dataset.labels, holdout, cfg.seed)
    train = dataset.subset(train_idx)
    if cfg.split == "identity":
        weights = skewed_weights(cfg.clients, cfg.size_skew) if cfg.size_skew > 1 else None
        parts = partition_by_identity(train.labels, cfg.clients, cfg.seed, weights)
    else:
        parts = partition_dirichlet(train.labels, cfg.clients, cfg.alpha, cfg.seed)
    single = []
    if cfg.single_identity_clients:
        chosen = np.random.default_rng(cfg.seed + 1).choice(train.num_classes, cfg.single_identity_clients,
                                                             replace=False)
        single = [train.subset(np.flatnonzero(train.labels == c)) for c in sorted(chosen)]
    return Setup([train.subset(p) for p in parts], dataset.subset(holdout_idx), single, num_ids, len(dataset))


def alone_config(cfg: ExperimentConfig, state_dir: Path) -> AggregatorConfig:
    """The aggregator of a one-device arm: the federated arms' model, seed and train settings, a quorum of one."""
    return parse_config(AggregatorConfig, {
        "state_dir": str(state_dir), "rounds": cfg.rounds, "min_clients": 1,
        "model": {"arch": "mobilefacenet", "act": "relu", "seed": cfg.seed},
        "train": {"local_epochs": cfg.local_epochs, "lr": cfg.lr, "margin": cfg.margin}})


def evaluate(backbone: torch.nn.Module, holdout: FaceDataset) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """(metrics, ROC) on the held-out identities, named like the aggregator's per-round metrics."""
    embeddings = embed_images(backbone, holdout.images)
    report = verification_report(embeddings, holdout.labels)
    metrics = {"val_accuracy": report.accuracy, "eer": report.eer, "tar_at_far": dict(report.tar_at_far),
               "rank1": rank1_accuracy(embeddings, holdout.labels),
               "genuine_pairs": report.genuine_pairs, "impostor_pairs": report.impostor_pairs}
    return metrics, (report.fpr, report.tpr)


def _curve_point(round_number: int, metrics: dict) -> dict:
    return {"round": round_number, "val_accuracy": metrics["val_accuracy"], "eer": metrics["eer"],
            f"tar_at_far_{TAR_KEY}": metrics["tar_at_far"][TAR_KEY]}


Outcome = tuple[dict, list[dict], tuple | None, float]  # (final metrics, curve, ROC, seconds)


class Runner:
    """Runs the arms, up to cfg.jobs at a time (threads; the federated ones in their own processes)."""

    def __init__(self, cfg: ExperimentConfig, setup: Setup, say: Callable[[str], None], progress: bool) -> None:
        self.cfg, self.setup, self.say = cfg, setup, say
        self.bars = progress and cfg.jobs == 1  # concurrent bars would overwrite each other: lines only then
        self.results: dict[str, dict] = {}
        self.rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._uncalibrated: dict[str, tuple[dict, list[dict]]] = {}  # federated arm -> scores with averaged BN
        # The round-0 model of the in-process arms, built once here: it seeds torch's global generator, which
        # the arms' threads must not do (the federated arms' aggregators build the same one in their processes).
        self.initial = FaceModels(alone_config(cfg, cfg.out / "runs")).initial_tensors()

    def run(self) -> None:
        cfg, setup = self.cfg, self.setup
        tasks: dict[str, Callable[[], Outcome]] = {}
        if "centralized" in cfg.methods:
            tasks["centralized"] = lambda: self._train_alone("centralized", _concat(setup.clients), cfg.seed)
        if "local" in cfg.methods:
            for k, data in enumerate(setup.clients):
                # Device k's seed, as facefed.simulate gives agent k: its head and batches match its federated self.
                tasks[f"local client-{k}"] = (lambda k=k, data=data:
                                              self._train_alone(f"local client-{k}", data, cfg.seed + 1000 * k))
        if "fedavg" in cfg.methods:
            tasks["fedavg"] = lambda: self._federated("fedavg", setup.clients)
        if "fedprox" in cfg.methods:
            tasks["fedprox"] = lambda: self._federated("fedprox", setup.clients,
                                                       train_extra={"proximal_mu": cfg.proximal_mu})
        if "server" in cfg.methods:
            tasks[cfg.server_strategy] = lambda: self._federated(cfg.server_strategy, setup.clients,
                                                                 strategy=cfg.server_strategy)
        if setup.single_clients:
            tasks[SINGLE_FEDAVG] = lambda: self._federated(SINGLE_FEDAVG, setup.single_clients)
            tasks[SINGLE_ANCHORS] = lambda: self._federated(
                SINGLE_ANCHORS, setup.single_clients,
                train_extra={"negative_anchors": cfg.negative_anchors, "anchor_seed": cfg.seed})
        with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            # The federated arms are the longest chains (rounds in sequence): started first, the pool's tail is short.
            order = sorted(tasks, key=lambda name: name == "centralized" or name.startswith("local "))
            futures = {name: pool.submit(tasks[name]) for name in order}
            outcomes = {name: future.result() for name, future in futures.items()}
        local = [outcomes.pop(name) for name in list(outcomes) if name.startswith("local client-")]
        if "centralized" in outcomes:
            self._record("centralized", *outcomes.pop("centralized"))
        if local:
            self._record_local(local)
        for name, outcome in outcomes.items():
            self._record(name, *outcome)
        if "fedavg" in self._uncalibrated:  # plain FedAvg as aggregated, for the record (its own row and curve)
            metrics, curve = self._uncalibrated["fedavg"]
            row = {**metrics, "curve": curve, "seconds": self.results["fedavg"]["seconds"]}
            self.results = {k: v for name, result in self.results.items()
                            for k, v in ([(name, result), ("fedavg" + AVERAGED_BN_SUFFIX, row)] if name == "fedavg"
                                         else [(name, result)])}

    def _bar(self, name: str, total: int) -> tqdm:
        return tqdm(total=total, desc=name, unit="round", file=sys.stderr, disable=not self.bars, leave=False)

    def _line(self, name: str, round_number: int, metrics: dict, extra: str = "") -> None:
        self.say(f"[{name}] round {round_number:2d}/{self.cfg.rounds} | held-out acc {metrics['val_accuracy']:.3f} | "
                 f"EER {metrics['eer']:.3f} | TAR@1e-2 {metrics[f'tar_at_far_{TAR_KEY}']:.3f}{extra}")

    def _train_alone(self, name: str, data: FaceDataset, device_seed: int) -> Outcome:
        """What one device would do with this data and no federation: a federation of that device alone."""
        cfg, holdout = self.cfg, self.setup.holdout
        start = time.time()
        home = cfg.out / "runs" / name.replace(" ", "-")
        config = alone_config(cfg, home / "aggregator")
        backbone = build_backbone("mobilefacenet", act="relu")  # weights replaced by each round's
        scored: dict[int, tuple[dict, tuple]] = {}  # round -> (metrics, ROC)
        bar = self._bar(name, cfg.rounds)

        def evaluate_round(round_number: int, tensors: dict[str, np.ndarray]) -> dict[str, float]:
            load_shared_tensors(backbone, tensors)
            scored[round_number] = evaluate(backbone, holdout)
            point = _curve_point(round_number, scored[round_number][0])
            if round_number:
                bar.update()
                self._line(name, round_number, point)
            return {k: v for k, v in point.items() if k != "round"}

        device = Device("device", LocalTrainer(data, home / "device", cfg.batch_size, augment=True, seed=device_seed))
        try:
            engine = run_inprocess(config, [device], InProcessModels(config, self.initial, evaluate_round))
        finally:
            bar.close()
        curve = [{"round": e["round"], **{k: e[k] for k in ("val_accuracy", "eer", f"tar_at_far_{TAR_KEY}")},
                  **({"train_loss": e["train_loss"]} if e["round"] else {})} for e in engine.state.read_log()]
        metrics, roc = scored[cfg.rounds]
        return metrics, curve, roc, time.time() - start

    def _record_local(self, runs: list[Outcome]) -> None:
        per_client = [metrics for metrics, _, _, _ in runs]
        seconds = sum(run[3] for run in runs)
        mean = {"val_accuracy": _mean(m["val_accuracy"] for m in per_client),
                "eer": _mean(m["eer"] for m in per_client),
                "tar_at_far": {k: _mean(m["tar_at_far"][k] for m in per_client) for k in per_client[0]["tar_at_far"]},
                "rank1": _mean(m["rank1"] for m in per_client),
                "clients": [{"n": len(d), "identities": d.num_classes, **m}
                            for d, m in zip(self.setup.clients, per_client)]}
        mean_curve = [{key: (point["round"] if key == "round" else _mean(run[1][i][key] for run in runs))
                       for key in ("round", "val_accuracy", "eer", f"tar_at_far_{TAR_KEY}")}
                      for i, point in enumerate(runs[0][1])]
        worst = min(range(len(runs)), key=lambda k: per_client[k]["val_accuracy"])
        best = max(range(len(runs)), key=lambda k: per_client[k]["val_accuracy"])
        self._record("local_mean", mean, mean_curve, None, seconds)
        self._record("local_worst", {**per_client[worst], "client": f"client-{worst}"}, runs[worst][1], runs[worst][2],
                     seconds)
        self.rocs["local, best client"] = runs[best][2]

    def _federated(self, name: str, clients: list[FaceDataset], strategy: str = "fedavg",
                   train_extra: dict | None = None) -> Outcome:
        cfg = self.cfg
        sim = SimulationConfig(
            data=list(cfg.data), out=cfg.out / "runs" / name, clients=len(clients), rounds=cfg.rounds,
            local_epochs=cfg.local_epochs, lr=cfg.lr, margin=cfg.margin, seed=cfg.seed, batch_size=cfg.batch_size,
            strategy=strategy, server_lr=cfg.server_lr if strategy in SERVER_STRATEGIES else None,
            fraction_fit=cfg.fraction_fit, min_clients=_quorum(cfg.min_clients, len(clients), cfg.clients),
            round_timeout_s=cfg.round_timeout_s, train_extra=dict(train_extra or {}),
            bn_statistics=cfg.bn_statistics,
        )
        bar = self._bar(name, cfg.rounds)

        def on_round(entry: dict) -> None:
            if entry["round"] == 0:
                return
            bar.update()
            self._line(name, entry["round"], entry, f" | {entry['clients']} clients | "
                       f"{entry['bytes'] / 1e6:.1f} MB | {entry['seconds']:.1f} s")

        start = time.time()
        try:
            result = run_simulation(sim, on_round, partitions=(clients, self.setup.holdout))
        finally:
            bar.close()
        backbone, _ = load_checkpoint(result.final_checkpoint)
        metrics, roc = evaluate(backbone, self.setup.holdout)
        curve = [{"round": e["round"], "val_accuracy": e["val_accuracy"], "eer": e["eer"],
                  f"tar_at_far_{TAR_KEY}": e[f"tar_at_far_{TAR_KEY}"], "clients": e["clients"],
                  "train_loss": e.get("train_loss")} for e in result.rounds]
        metrics["client_updates"] = sum(e["clients"] for e in result.rounds)
        if cfg.bn_statistics == "measured":
            self._keep_averaged_bn(name, result.rounds, curve)
            metrics["uncalibrated"] = self._uncalibrated[name][0]
            self._line(name, cfg.rounds, curve[-1], f" | measured BN statistics (averaged: "
                       f"{metrics['uncalibrated']['val_accuracy']:.3f})")
        return metrics, curve, roc, time.time() - start

    def _keep_averaged_bn(self, name: str, rounds: list[dict], curve: list[dict]) -> None:
        """The aggregator's scores of each round's model with averaged BatchNorm statistics (before the devices
        measured them), beside the measured ones."""
        keys = ("val_accuracy", "eer", f"tar_at_far_{TAR_KEY}")  # round 0 has no statistics phase: as it is
        averaged = [{**point, **{k: entry.get(k + AVERAGED_BN_SUFFIX, point[k]) for k in keys}}
                    for entry, point in zip(rounds, curve)]
        for point, before in zip(curve, averaged):
            point["val_accuracy_uncalibrated"] = before["val_accuracy"]
        last = rounds[-1]
        final = {"val_accuracy": last["val_accuracy" + AVERAGED_BN_SUFFIX], "eer": last["eer" + AVERAGED_BN_SUFFIX],
                 "rank1": last["rank1" + AVERAGED_BN_SUFFIX],
                 "tar_at_far": {key[len("tar_at_far_"):-len(AVERAGED_BN_SUFFIX)]: value for key, value in last.items()
                                if key.startswith("tar_at_far_") and key.endswith(AVERAGED_BN_SUFFIX)}}
        self._uncalibrated[name] = (final, averaged)

    def _record(self, name: str, metrics: dict, curve: list[dict], roc, seconds: float) -> None:
        self.results[name] = {**metrics, "curve": curve, "seconds": round(seconds, 1)}
        if roc is not None:
            self.rocs[LABELS.get(name, name)] = roc
        self.say(f"== {name}: held-out acc {metrics['val_accuracy']:.3f}, EER {metrics['eer']:.3f}, "
                 f"TAR@1e-2 {metrics['tar_at_far'][TAR_KEY]:.3f} ({seconds:.0f} s)")


def run_experiment(cfg: ExperimentConfig, say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run every arm, write the report folder and return results.json's content."""
    cfg.check()
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise ExperimentError(f"output folder {cfg.out} is not empty; choose a new --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads if cfg.jobs == 1 else 1)  # concurrent arms: one thread each
    try:
        return _run(cfg, say, progress, start)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ExperimentConfig, say: Callable[[str], None], progress: bool, start: float) -> dict:
    setup = prepare_setup(cfg)
    sizes = [len(c) for c in setup.clients]
    say(f"{setup.identities} identities / {setup.images} images; held out: {setup.holdout.num_classes} identities "
        f"({len(setup.holdout)} images); {cfg.clients} clients, n_k = {sizes}; "
        f"{cfg.rounds} rounds x {cfg.local_epochs} local epochs; {cfg.jobs} arm(s) at a time")
    runner = Runner(cfg, setup, say, progress)
    try:
        runner.run()
    except SimulationError as exc:
        raise ExperimentError(f"a federated arm failed: {exc}") from exc
    results = dict(runner.results)
    results["summary"] = _summary(results)
    results["setup"] = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("data", "out")},
        "data": [str(p) for p in cfg.data], "identities": setup.identities, "images": setup.images,
        "client_sizes": sizes, "client_identities": [c.num_classes for c in setup.clients],
        "holdout_identities": setup.holdout.num_classes, "holdout_images": len(setup.holdout),
        "single_identity_sizes": [len(c) for c in setup.single_clients],
        "epochs_per_client": cfg.rounds * cfg.local_epochs, "seconds": round(time.time() - start, 1),
    }
    _write_report(cfg, results, runner.rocs)
    return results


def _summary(results: dict) -> dict:
    """The headline differences, in points of held-out accuracy / TAR (only those whose arms ran)."""
    summary = {}

    def acc(name: str) -> float:
        return results[name]["val_accuracy"]

    if {"fedavg", "local_mean"} <= set(results):
        summary["fedavg_minus_local_mean_acc_pts"] = round(100 * (acc("fedavg") - acc("local_mean")), 2)
    if {"fedavg", "centralized"} <= set(results):
        summary["centralized_minus_fedavg_acc_pts"] = round(100 * (acc("centralized") - acc("fedavg")), 2)
    raw = "fedavg" + AVERAGED_BN_SUFFIX
    if {raw, "local_mean", "centralized"} <= set(results):
        summary["fedavg_averaged_bn_minus_local_mean_acc_pts"] = round(100 * (acc(raw) - acc("local_mean")), 2)
        summary["centralized_minus_fedavg_averaged_bn_acc_pts"] = round(100 * (acc("centralized") - acc(raw)), 2)
    if {SINGLE_FEDAVG, SINGLE_ANCHORS} <= set(results):
        summary["single_identity_anchors_minus_fedavg_tar_pts"] = round(
            100 * (results[SINGLE_ANCHORS]["tar_at_far"][TAR_KEY] - results[SINGLE_FEDAVG]["tar_at_far"][TAR_KEY]), 2)
    return summary


def _write_report(cfg: ExperimentConfig, results: dict, rocs: dict) -> None:
    from facefed.plots import plot_method_curves, plot_roc

    (cfg.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False, default=_json_default) + "\n")
    methods = [k for k in results if k not in ("summary", "setup")]
    plot_method_curves({LABELS.get(m, m): [(p["round"], p["val_accuracy"]) for p in results[m]["curve"]]
                        for m in methods}, cfg.out / "accuracy_per_round.png")
    plot_roc(rocs, cfg.out / "roc.png", title="ROC on held-out identities")
    (cfg.out / "report.md").write_text(markdown_report(results))


def markdown_report(results: dict) -> str:
    setup = results["setup"]
    rows = ["| method | held-out acc | EER | TAR@FAR=1e-2 | TAR@FAR=1e-3 | rank-1 | wall s |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name in ("summary", "setup"):
            continue
        rows.append(f"| {LABELS.get(name, name)} | {r['val_accuracy']:.3f} | {r['eer']:.3f} | "
                    f"{r['tar_at_far'][TAR_KEY]:.3f} | {r['tar_at_far'][far_key(1e-3)]:.3f} | {r['rank1']:.3f} | "
                    f"{r['seconds']:.0f} |")
    lines = [
        f"# FaceFed experiment{' (preset ' + setup['preset'] + ')' if setup.get('preset') else ''}", "",
        f"- Data: {', '.join(setup['data'])}: {setup['identities']} identities, {setup['images']} images.",
        f"- Held out (never trained on): {setup['holdout_identities']} identities, {setup['holdout_images']} images.",
        (f"- {setup['clients']} clients ({setup['split']} split), n_k = {setup['client_sizes']}, "
         f"identities per client {setup['client_identities']}."),
        (f"- Budget: {setup['rounds']} rounds x {setup['local_epochs']} local epochs = {setup['epochs_per_client']} "
         f"epochs per client for every method; SGD lr {setup['lr']}, batch {setup['batch_size']}, "
         f"FedProx mu {setup['proximal_mu']}, server optimizer {setup['server_strategy']}, "
         f"fraction_fit {setup['fraction_fit']}."),
    ]
    if setup.get("bn_statistics") == "measured":
        lines.append("- Federated arms: BatchNorm statistics of each round's global model measured by every client on "
                     "its own partition (forward passes only, over MQTT) and averaged with weights n_k; the FedAvg "
                     "row 'averaged BN statistics' is the same weights with the averaged statistics.")
    if setup["single_identity_sizes"]:
        lines.append(f"- Single-identity setting: {len(setup['single_identity_sizes'])} devices with one person each "
                     f"(n_k = {setup['single_identity_sizes']}), {setup['negative_anchors']} negative anchors.")
    lines += [f"- Wall time: {setup['seconds']:.0f} s.", "", *rows, ""]
    lines += [f"- {key}: {value}" for key, value in results["summary"].items()]
    return "\n".join(lines) + "\n"


def _quorum(min_clients: int | None, clients: int, main_clients: int) -> int | None:
    """The configured quorum scaled to an arm with a different client count (single-identity arms)."""
    if min_clients is None:
        return None
    return max(1, round(min_clients * clients / main_clients))


def _concat(parts: list[FaceDataset]) -> FaceDataset:
    """The union of client partitions (disjoint identities or not), labels merged by identity name."""
    names = sorted({name for p in parts for name in p.identities})
    index = {name: i for i, name in enumerate(names)}
    labels = np.concatenate([[index[p.identities[label]] for label in p.labels] for p in parts])
    return FaceDataset(np.concatenate([p.images for p in parts]), labels, names)


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
