"""A whole federation on one machine: broker, aggregator and K agents as OS processes.

Each agent process gets only its own partition, written to its own folder, and runs
exactly what `facefed-agent run` runs; the aggregator is `facefed-aggregator serve`.
Everything talks over MQTT on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from fedwire.broker import EmbeddedBroker
from model_zoo.data import FaceDataset, load_datasets, save_folders
from model_zoo.partition import partition_by_identity, partition_dirichlet, split_holdout

log = logging.getLogger("facefed.simulate")


@dataclass
class SimulationConfig:
    data: list[Path]
    out: Path
    clients: int = 3
    rounds: int = 10
    local_epochs: int = 2
    lr: float = 0.05
    margin: float = 0.5  # ArcFace margin of the devices' heads
    split: str = "identity"  # "identity" or "dirichlet"
    alpha: float = 0.5
    holdout: int | None = None  # held-out identities; None = a quarter of them
    seed: int = 0
    broker: str | None = None  # None = embedded broker on a free loopback port
    topic_prefix: str | None = None  # None = a fresh one per run, so runs can share a broker
    arch: str = "mobilefacenet"
    act: str = "relu"
    model_options: dict = field(default_factory=dict)  # further backbone kwargs, e.g. {"trainable": "last"}
    batch_size: int = 32
    threads_per_agent: int = 1
    max_chunk_bytes: int = 256 * 1024
    update_codec: str = "safetensors"  # or "int8-delta" / "topk-int8-delta": compressed uploads
    download_codec: str = "safetensors"  # or "int8-delta": global models published as deltas (PROTOCOL.md 5.2)
    trunk_precision: str = "fp32"  # or "int8": devices run a frozen pretrained trunk in int8
    round_timeout_s: float = 600.0
    timeout_s: float = 3600.0
    extra_agent_args: list[str] = field(default_factory=list)
    strategy: str = "fedavg"  # server optimizer: fedavg, fedavgm, fedadam, median, trimmed_mean
    server_lr: float | None = None  # fedavgm/fedadam step size; None: the aggregator's default
    fraction_fit: float = 1.0  # share of the devices sampled into each round
    min_clients: int | None = None  # round quorum; None: every client (or every sampled one)
    train_extra: dict = field(default_factory=dict)  # further announced train settings, e.g. {"proximal_mu": 0.01}
    bn_statistics: str = "averaged"  # or "measured": a statistics phase after each round (aggregator.yaml)
    dashboard_port: int | None = None  # serve the fleet dashboard on 127.0.0.1:PORT while the federation runs
    dp: dict | None = None  # aggregator.yaml's dp section, e.g. {"clip": 1.0, "noise_multiplier": 1.0}


@dataclass
class SimulationResult:
    rounds: list[dict]
    final_checkpoint: Path
    metrics_path: Path
    plot_path: Path | None
    seconds: float


class SimulationError(RuntimeError):
    pass


def prepare_partitions(dataset: FaceDataset, cfg: SimulationConfig) -> tuple[list[FaceDataset], FaceDataset]:
    """Split identities into held-out and training, then training across clients."""
    num_ids = len(dataset.identities)
    holdout = cfg.holdout if cfg.holdout is not None else max(2, num_ids // 4)
    if num_ids - holdout < cfg.clients:
        raise SimulationError(f"{num_ids} identities cannot give {cfg.clients} clients plus {holdout} held out")
    train_idx, holdout_idx = split_holdout(dataset.labels, holdout, cfg.seed)
    train = dataset.subset(train_idx)
    if cfg.split == "identity":
        parts = partition_by_identity(train.labels, cfg.clients, cfg.seed)
    elif cfg.split == "dirichlet":
        parts = partition_dirichlet(train.labels, cfg.clients, cfg.alpha, cfg.seed)
    else:
        raise SimulationError(f"unknown split {cfg.split!r} (identity or dirichlet)")
    return [train.subset(p) for p in parts], dataset.subset(holdout_idx)


def write_run_folder(cfg: SimulationConfig, clients: list[FaceDataset], holdout: FaceDataset,
                     broker_url: str, prefix: str) -> tuple[Path, list[Path]]:
    """Partitions on disk plus one config per process; returns (aggregator.yaml, agent.yamls)."""
    out = cfg.out.resolve()  # configs resolve relative paths against their own folder, not the cwd
    save_folders(holdout, out / "eval" / "holdout")
    aggregator_cfg = {
        "state_dir": str(out / "aggregator"),
        "broker": broker_url,
        "topic_prefix": prefix,
        "rounds": cfg.rounds,
        "min_clients": cfg.min_clients if cfg.min_clients is not None else cfg.clients,
        "strategy": cfg.strategy,
        "server_lr": cfg.server_lr,
        "fraction_fit": cfg.fraction_fit,
        "round_timeout_s": cfg.round_timeout_s,
        "max_chunk_bytes": cfg.max_chunk_bytes,
        "update_codec": cfg.update_codec,
        "download_codec": cfg.download_codec,
        "bn_statistics": cfg.bn_statistics,
        "model": {"arch": cfg.arch, "act": cfg.act, "options": cfg.model_options, "seed": cfg.seed},
        "train": {"local_epochs": cfg.local_epochs, "lr": cfg.lr, "margin": cfg.margin, **cfg.train_extra},
        "eval": {"data": str(out / "eval" / "holdout")},
        **({"dp": cfg.dp} if cfg.dp else {}),
    }
    if cfg.dashboard_port is not None:
        aggregator_cfg["dashboard"] = {"listen": f"127.0.0.1:{cfg.dashboard_port}"}
    aggregator_path = out / "aggregator.yaml"
    aggregator_path.write_text(yaml.safe_dump(aggregator_cfg, sort_keys=False))
    agent_paths = []
    for k, part in enumerate(clients):
        home = out / "clients" / f"client-{k}"
        save_folders(part, home / "data")
        agent_cfg = {
            "device_id": f"client-{k}",
            "data": str(home / "data"),
            "state_dir": str(home / "state"),
            "profile": "x86-dev",
            "broker": broker_url,
            "topic_prefix": prefix,
            "seed": cfg.seed + 1000 * k,
            "exit_when_finished": True,
            "device": {"threads": cfg.threads_per_agent, "batch_size": cfg.batch_size,
                       "max_chunk_bytes": cfg.max_chunk_bytes, "trunk_precision": cfg.trunk_precision},
        }
        path = home / "agent.yaml"
        path.write_text(yaml.safe_dump(agent_cfg, sort_keys=False))
        agent_paths.append(path)
    return aggregator_path, agent_paths


def run_simulation(cfg: SimulationConfig, on_round: Callable[[dict], None] | None = None,
                   partitions: tuple[list[FaceDataset], FaceDataset] | None = None) -> SimulationResult:
    """Run the federation; partitions=(clients, holdout) uses those instead of loading and splitting cfg.data."""
    start = time.time()
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise SimulationError(f"output folder {cfg.out} is not empty; choose a new --out")
    if partitions is not None and len(partitions[0]) != cfg.clients:
        raise SimulationError(f"{len(partitions[0])} client partitions given for {cfg.clients} clients")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if partitions is None:
        dataset = load_datasets(cfg.data)
        clients, holdout = prepare_partitions(dataset, cfg)
        log.info("%d identities / %d images: %d clients (%s), %d held-out identities", len(dataset.identities),
                 len(dataset), len(clients), ", ".join(str(len(c)) for c in clients), len(holdout.identities))
    else:
        clients, holdout = partitions
    broker = None
    url = cfg.broker
    if url is None:
        broker = EmbeddedBroker(port=0)
        url = broker.start()
        log.info("embedded broker at %s", url)
    prefix = cfg.topic_prefix or f"facefed/sim-{secrets.token_hex(4)}"
    aggregator_yaml, agent_yamls = write_run_folder(cfg, clients, holdout, url, prefix)
    logs = cfg.out / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        aggregator = _spawn([sys.executable, "-m", "aggregator", "serve", "--config", str(aggregator_yaml)],
                            logs / "aggregator.log")
        processes.append(aggregator)
        for k, path in enumerate(agent_yamls):
            processes.append(_spawn([sys.executable, "-m", "edge_agent", "run", "--config", str(path),
                                     "--exit-when-finished", *cfg.extra_agent_args], logs / f"client-{k}.log"))
        rounds = _follow_rounds(cfg, aggregator, processes, on_round, start)
        _wait_all(processes[1:], timeout_s=60.0)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None:
            broker.stop()
    return _write_outputs(cfg, rounds, time.time() - start)


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    handle = log_path.open("w")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _follow_rounds(cfg: SimulationConfig, aggregator: subprocess.Popen, processes: list[subprocess.Popen],
                   on_round: Callable[[dict], None] | None, start: float) -> list[dict]:
    """Tail the aggregator's rounds log until the last round or a failure."""
    log_path = cfg.out / "aggregator" / "rounds.jsonl"
    seen: list[dict] = []
    while True:
        entries = _read_jsonl(log_path)
        for entry in entries[len(seen):]:
            seen.append(entry)
            if on_round is not None:
                on_round(entry)
        if seen and seen[-1]["round"] >= cfg.rounds:
            return seen
        code = aggregator.poll()
        if code == 0 and cfg.dp and cfg.dp.get("epsilon_budget") and seen:
            return _read_jsonl(log_path)  # the privacy budget ended training early
        if code is not None:
            raise SimulationError(f"aggregator exited with code {code} after {len(seen)} log entries; "
                                  f"see {cfg.out / 'logs' / 'aggregator.log'}:\n{_tail(cfg.out / 'logs' / 'aggregator.log')}")
        for k, proc in enumerate(processes[1:]):
            if proc.poll() not in (None, 0):
                path = cfg.out / "logs" / f"client-{k}.log"
                raise SimulationError(f"agent client-{k} exited with code {proc.returncode}; see {path}:\n{_tail(path)}")
        if time.time() - start > cfg.timeout_s:
            raise SimulationError(f"simulation exceeded {cfg.timeout_s:.0f} s")
        time.sleep(0.25)


def _wait_all(processes: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            log.warning("agent pid %d did not exit after the final round; stopping it", proc.pid)


def _write_outputs(cfg: SimulationConfig, rounds: list[dict], seconds: float) -> SimulationResult:
    from facefed.plots import plot_training_curves

    metrics_path = cfg.out / "metrics.jsonl"
    with metrics_path.open("w") as out:
        for entry in rounds:
            out.write(json.dumps(entry, sort_keys=True) + "\n")
    final = cfg.out / "final.safetensors"
    shutil.copyfile(cfg.out / "aggregator" / "checkpoints" / f"round-{rounds[-1]['round']:04d}.safetensors", final)
    plot_path = plot_training_curves(rounds, cfg.out / "training_curves.png")
    return SimulationResult(rounds, final, metrics_path, plot_path, seconds)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return entries


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
