"""Fleet load: N simulated devices against a real Mosquitto and the real aggregator, per round measured.

    python -m bench.fleet_load --devices 10 100 1000 --rounds 2 --json runs/fleet_load.json
    python -m bench.fleet_load --devices 1000 --shard-workers 2      # the sharded aggregator (MQTT 5)

Each device is an MqttLink (its own MQTT connection, last will, subscriptions to the round and its ack
topic) inside one of a few device processes. It obeys the round protocol: on an open announcement that
invites it (participants) it publishes an update built with fedwire.chunking.build_transfer and
MqttLink.publish_transfer, exactly as edge_agent does, and waits for its ack. It does not train, and it
does not download the global model: its update has the shapes of the real model (MobileFaceNet, ~1M
parameters) and known values k / 2**16 (facefed.bench_aggregate), so the exact weighted mean of what was
sent is known. An observer client times each round (announcement -> new global model, as received) and
checks the global model against that mean, bit for bit. Broker and aggregator CPU seconds and peak RSS
come from psutil. Per-round evaluation and export are off in the aggregator's config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from facefed.bench_aggregate import ExactMean, client_weight, grid_ints, grid_values
from fedwire.broker import MOSQUITTO, MosquittoBroker, free_port, loopback_config, mosquitto_available
from fedwire.chunking import Reassembler, build_transfer
from fedwire.messages import (
    DeviceStatus,
    RoundAnnouncement,
    RoundSummary,
    TransferManifest,
    UpdateAck,
)
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.1
UPLOAD_THREADS = 4  # concurrent uploads per device process (default of --upload-threads)
ROUND_TIMEOUT_S = 1800.0


# ---- known updates (pure) --------------------------------------------------------------------------------

def update_ints(shapes: dict[str, list[int]], seed: int, round_number: int, device: int) -> dict[str, np.ndarray]:
    """Device `device`'s round-`round_number` update as integers k (values k / 2**16); BatchNorm variances >= 0."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    flat = grid_ints(seed * 100_003 + round_number, device, sum(sizes))
    out, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        part = flat[start:start + size].reshape(shape)
        out[name] = np.abs(part) if "running_var" in name else part
        start += size
    return out


def device_weight(seed: int, round_number: int, device: int) -> int:
    return client_weight(seed * 100_003 + round_number, device)


def upload_offset(seed: int, round_number: int, device: int, spread_s: float) -> float:
    return spread_s * float(np.random.default_rng([seed, round_number, device, 2]).random())


def device_id(device: int) -> str:
    return f"sim-{device:05d}"


def exact_global(shapes: dict[str, list[int]], seed: int, round_number: int, devices: Sequence[int]) -> dict[str, np.ndarray]:
    exact = ExactMean()
    for device in devices:
        exact.add(update_ints(shapes, seed, round_number, device), device_weight(seed, round_number, device))
    return exact.mean()


# ---- device processes ------------------------------------------------------------------------------------

@dataclass
class DeviceCounters:
    bytes_up: int = 0
    uploads: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def run_devices(broker: str, prefix: str, first: int, count: int, shapes: dict[str, list[int]], seed: int,
                spread_s: float, upload_threads: int = UPLOAD_THREADS) -> dict:
    """One device process: `count` devices, each its own MQTT connection; returns when the federation finishes.

    A device uploads at a fixed offset in [0, spread_s) after it sees the announcement (its "training time")."""
    topics = Topics(prefix)
    events: queue.Queue[tuple[int, str, bytes]] = queue.Queue()
    links: dict[int, MqttLink] = {}
    for device in range(first, first + count):
        dev = device_id(device)
        offline = DeviceStatus(dev, "offline", None, time.time(), "connection lost").to_json()
        link = MqttLink(broker, client_id=f"fleet-{dev}", subscriptions=[topics.round, topics.ack(dev)],
                        on_message=lambda topic, payload, d=device: events.put((d, topic, payload)),
                        will=(topics.status(dev), offline, True), keepalive=120)
        link.connect(timeout=60)
        link.publish(topics.status(dev), DeviceStatus(dev, "online", None, time.time()).to_json(), retain=True)
        links[device] = link
    print(json.dumps({"ready": count}), flush=True)
    counters, lock = DeviceCounters(), threading.Lock()
    uploads: queue.PriorityQueue[tuple[float, int, RoundAnnouncement | None]] = queue.PriorityQueue()

    def uploader() -> None:
        while (job := uploads.get())[2] is not None:
            start, device, ann = job
            time.sleep(max(0.0, start - time.monotonic()))
            dev = device_id(device)
            tensors = {name: grid_values(ints) for name, ints in update_ints(shapes, seed, ann.round, device).items()}
            manifest, chunks = build_transfer("update", dev, ann.round, ann.model_version, tensors,
                                              num_samples=device_weight(seed, ann.round, device),
                                              metrics={"train_loss": 1.0})
            sent = links[device].publish_transfer(topics.update_manifest(dev), lambda i, dev=dev: topics.update_chunk(dev, i),
                                                  manifest, chunks)
            with lock:
                counters.bytes_up += sent
                counters.uploads += 1

    threads = [threading.Thread(target=uploader, daemon=True) for _ in range(upload_threads)]
    for thread in threads:
        thread.start()
    handled: set[tuple[int, str]] = set()
    finished: set[int] = set()
    while len(finished) < count:
        device, topic, payload = events.get()
        if topic == topics.round:
            ann = RoundAnnouncement.from_json(payload)
            if ann.state == "finished":
                finished.add(device)
            elif (device, ann.announce_id) not in handled:
                handled.add((device, ann.announce_id))
                if ann.participants and device_id(device) not in ann.participants:
                    counters.skipped += 1
                else:
                    uploads.put((time.monotonic() + upload_offset(seed, ann.round, device, spread_s), device, ann))
        else:
            ack = UpdateAck.from_json(payload)
            with lock:
                if ack.accepted:
                    counters.accepted += 1
                else:
                    counters.rejected += 1
                    counters.reasons.append(ack.reason)
    for _ in threads:
        uploads.put((float("inf"), -1, None))
    for thread in threads:
        thread.join()
    for device, link in links.items():
        dev = device_id(device)
        link.publish(topics.status(dev), DeviceStatus(dev, "offline", None, time.time(), "done").to_json(), retain=True)
        link.close()
    return counters.__dict__


# ---- observer: times rounds and keeps each new global model ------------------------------------------------

class Observer:
    def __init__(self, broker: str, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.reassembler = Reassembler()
        self.lock = threading.Lock()
        self.announced: dict[int, float] = {}  # round -> time its (first) open announcement arrived
        self.globals: dict[int, tuple[float, dict[str, np.ndarray]]] = {}  # model version -> (time, tensors)
        self.summaries: dict[int, RoundSummary] = {}
        self.finished = threading.Event()
        subs = [self.topics.round, self.topics.global_manifest, self.topics.global_chunk("+"), self.topics.round_summary]
        self.link = MqttLink(broker, client_id=f"fleet-observer-{secrets.token_hex(3)}", on_message=self._on_message,
                             subscriptions=subs)

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.time()
        parsed = self.topics.parse(topic)
        with self.lock:
            if parsed.kind == "round":
                ann = RoundAnnouncement.from_json(payload)
                if ann.state == "finished":
                    self.finished.set()
                else:
                    self.announced.setdefault(ann.round, now)
            elif parsed.kind == "summary":
                summary = RoundSummary.from_json(payload)
                self.summaries[summary.round] = summary
            elif payload:
                if parsed.kind == "global_manifest":
                    done = self.reassembler.add_manifest("global", TransferManifest.from_json(payload), now)
                else:
                    done = self.reassembler.add_chunk("global", payload, now)
                if done is not None:
                    self.globals[done.manifest.model_version] = (now, done.tensors)


# ---- processes and measurements ------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of each watched process tree, every SAMPLE_S."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.processes = processes
        self.peak_mb = {name: 0.0 for name in processes}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, process in self.processes.items():
                self.peak_mb[name] = max(self.peak_mb[name], tree_rss_mb(process))
            time.sleep(SAMPLE_S)


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in _tree(process):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def tree_cpu_s(process: psutil.Process) -> float:
    total = 0.0
    for p in _tree(process):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def start_mosquitto(workdir: Path) -> MosquittoBroker:
    if not mosquitto_available():
        raise SystemExit(f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto), or pass --broker")
    # max_queued_messages 0: no cap on messages queued for a slow subscriber (the aggregator): mosquitto's
    # default of 1000 silently drops QoS 1 messages once a fleet's uploads outrun the aggregator.
    broker = MosquittoBroker(workdir, loopback_config(free_port(), "max_queued_messages 0\nmax_connections -1\n"))
    broker.start()
    return broker


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def model_shapes(arch: str) -> dict[str, list[int]]:
    import torch

    from model_zoo.backbones import build_backbone
    from model_zoo.checkpoint import shared_tensors

    torch.manual_seed(0)
    return {name: list(value.shape) for name, value in sorted(shared_tensors(build_backbone(arch)).items())}


def run_fleet(devices: int, rounds: int, shard_workers: int, processes: int, broker: str | None, seed: int,
              arch: str, workdir: Path, spread_s: float = 0.0, upload_threads: int = UPLOAD_THREADS) -> dict:
    """One federation of `devices` simulated devices; returns per-round figures."""
    shapes = model_shapes(arch)
    (workdir / "shapes.json").write_text(json.dumps(shapes))
    prefix = f"fleet{secrets.token_hex(4)}"
    mosquitto = None
    if broker is None:
        mosquitto = start_mosquitto(workdir)
        broker = mosquitto.url
    config = workdir / "aggregator.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "state_dir": str(workdir / "state"), "broker": broker, "topic_prefix": prefix, "rounds": rounds,
        "min_clients": devices, "round_timeout_s": ROUND_TIMEOUT_S, "max_update_bytes": 64 * 2**20,
        "model": {"arch": arch, "seed": seed}, "eval": {"data": None}, "export": {"formats": []},
        "shard_workers": shard_workers}))
    observer = Observer(broker, prefix)
    observer.link.connect()
    procs = max(1, min(processes, devices))
    bounds = np.linspace(0, devices, procs + 1).astype(int)
    device_procs = [subprocess.Popen(
        [sys.executable, "-m", "bench.fleet_load", "--device-process", str(lo), str(hi - lo), "--broker", broker,
         "--prefix", prefix, "--seed", str(seed), "--shapes", str(workdir / "shapes.json"), "--spread", str(spread_s),
         "--upload-threads", str(upload_threads)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    for proc in device_procs:  # every device connected and subscribed before the first round opens
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a device process died while connecting")
    command = [sys.executable, "-m", "aggregator", "serve", "--config", str(config)]
    if shard_workers > 1:
        command.append("--spawn-workers")
    agg_log = (workdir / "aggregator.log").open("w")
    aggregator = subprocess.Popen(command, cwd=REPO_ROOT, stdout=agg_log, stderr=subprocess.STDOUT)
    watched = {"aggregator": psutil.Process(aggregator.pid)}
    if mosquitto is not None:
        watched["broker"] = psutil.Process(mosquitto.process.pid)
    sampler = Sampler(watched)
    sampler.start()
    cpu_marks: list[dict[str, float]] = []
    try:
        for r in range(1, rounds + 1):
            wait_for(lambda r=r: r in observer.announced or aggregator.poll() is not None, ROUND_TIMEOUT_S)
            cpu_marks.append({name: tree_cpu_s(p) for name, p in watched.items()})
            wait_for(lambda r=r: r in observer.globals or aggregator.poll() is not None, ROUND_TIMEOUT_S)
            if aggregator.poll() is not None and r not in observer.globals:
                raise RuntimeError(f"aggregator exited ({aggregator.returncode}); see {workdir / 'aggregator.log'}")
        cpu_marks.append({name: tree_cpu_s(p) for name, p in watched.items()})
        wait_for(lambda: rounds in observer.summaries and observer.finished.is_set(), 60)
        counters = [json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1]) for proc in device_procs]
        aggregator.wait(timeout=60)
    finally:
        sampler.stop.set()
        for proc in [*device_procs, aggregator]:
            stop(proc)
        observer.link.close()
        if mosquitto is not None:
            mosquitto.stop()
    return {"devices": devices, "rounds": rounds_report(observer, cpu_marks, shapes, seed, rounds),
            "shard_workers": shard_workers, "device_processes": len(device_procs), "spread_s": spread_s,
            "concurrent_uploads": len(device_procs) * upload_threads,
            "peak_rss_mb": dict(sampler.peak_mb), "device_counters": merge_counters(counters),
            "params": int(sum(np.prod(s) for s in shapes.values())), "arch": arch}


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("fleet did not progress in time")
        time.sleep(0.02)


def rounds_report(observer: Observer, cpu_marks: list[dict[str, float]], shapes: dict, seed: int,
                  rounds: int) -> list[dict]:
    out = []
    for r in range(1, rounds + 1):
        summary = observer.summaries[r]
        devices = [int(dev.split("-")[1]) for dev in summary.clients]
        expected = exact_global(shapes, seed, r, devices)
        seen_at, tensors = observer.globals[r]
        exact = set(tensors) == set(expected) and all(np.array_equal(tensors[k], expected[k]) for k in expected)
        latency = seen_at - observer.announced[r]
        cpu = {name: cpu_marks[r][name] - cpu_marks[r - 1][name] for name in cpu_marks[r]}
        out.append({"round": r, "updates": len(summary.clients), "latency_s": latency,
                    "aggregator_cpu_ms_per_update": 1000 * cpu["aggregator"] / max(len(summary.clients), 1),
                    "updates_per_s": len(summary.clients) / latency, "aggregator_round_s": summary.seconds,
                    "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down,
                    "cpu_s": cpu, "exact": bool(exact)})
    return out


def merge_counters(counters: list[dict]) -> dict:
    merged = {key: sum(c[key] for c in counters) for key in ("bytes_up", "uploads", "accepted", "rejected", "skipped")}
    merged["reasons"] = sorted({reason for c in counters for reason in c["reasons"]})
    return merged


def markdown(results: Sequence[dict]) -> str:
    lines = [("| devices | workers | spread s | round | updates | announce → global s | updates/s | aggregator CPU s | CPU ms/update | "
             "broker CPU s | aggregator peak RSS MB | broker peak RSS MB | MB up | exact |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rounds"]:
            lines.append(
                f"| {res['devices']} | {res['shard_workers']} | {res['spread_s']:g} | {r['round']} | {r['updates']} | "
                f"{r['latency_s']:.2f} | {r['updates_per_s']:.1f} | {r['cpu_s']['aggregator']:.1f} | "
                f"{r['aggregator_cpu_ms_per_update']:.0f} | {r['cpu_s'].get('broker', float('nan')):.1f} | "
                f"{res['peak_rss_mb']['aggregator']:.0f} | {res['peak_rss_mb'].get('broker', float('nan')):.0f} | "
                f"{r['bytes_up'] / 1e6:.0f} | {'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000], help="fleet sizes (default 10 100 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per fleet (default 2)")
    parser.add_argument("--shard-workers", type=int, default=1,
                        help="1: the single-process aggregator (default); >1: reducer + workers over MQTT 5 $share")
    parser.add_argument("--processes", type=int, default=4, help="device processes (default 4)")
    parser.add_argument("--broker", help="use this MQTT 5 broker instead of starting mosquitto (then no broker figures)")
    parser.add_argument("--arch", default="mobilefacenet", help="model whose shapes the updates have")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.0, metavar="S",
                        help="each device uploads at a random offset in [0, S) s after the announcement, as if "
                        "training took that long (default 0: all at once, the worst case for the aggregator)")
    parser.add_argument("--upload-threads", type=int, default=UPLOAD_THREADS, metavar="T",
                        help=f"uploads in progress at once per device process (default {UPLOAD_THREADS}); with "
                        "--processes P at most P*T devices upload at the same time")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="keep logs and state in this folder instead of a temp dir")
    parser.add_argument("--device-process", nargs=2, type=int, metavar=("FIRST", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    if args.device_process is not None:
        first, count = args.device_process
        shapes = json.loads(args.shapes.read_text())
        print(json.dumps(run_devices(args.broker, args.prefix, first, count, shapes, args.seed, args.spread,
                                     args.upload_threads)), flush=True)
        return 0
    if min(args.devices) < 1 or min(args.rounds, args.shard_workers, args.processes, args.upload_threads) < 1:
        parser.error("--devices, --rounds, --shard-workers, --processes and --upload-threads must be >= 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    results = []
    for devices in args.devices:
        workdir = Path(tempfile.mkdtemp(prefix=f"fleet-{devices}-", dir=args.keep))
        try:
            results.append(run_fleet(devices, args.rounds, args.shard_workers, args.processes, args.broker,
                                     args.seed, args.arch, workdir, args.spread, args.upload_threads))
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
        rows = markdown(results[-1:]).splitlines()
        print("\n".join(rows if len(results) == 1 else rows[2:]), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0 if all(r["exact"] for res in results for r in res["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
