"""Fault scenarios of issue 8, each run against real processes with a PASS/FAIL verdict.

Every scenario starts a real Mosquitto on 127.0.0.1 (persistence on), the real aggregator
(`python -m aggregator serve`) and one or more fleet processes, each running real `EdgeAgent`s
whose only stand-in is the trainer: device k returns the global model + delta_k with n_k samples,
so the exact FedAvg result of any set of accepted updates is known. Faults are real too: SIGTERM or
SIGKILL to Mosquitto, SIGKILL to the aggregator or to a fleet process, a flooding MQTT client, device
clocks an hour off.

    python -m bench.faults                       # every scenario at bench scale, one verdict line each
    python -m bench.faults --only broker-restart --devices 12
    python -m pytest tests/test_faults.py        # the same scenarios, CI-sized

`python -m bench.faults fleet SPEC.json` is the fleet process the scenarios start.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fedwire.broker import MOSQUITTO, MosquittoBroker, free_port, loopback_config  # noqa: F401 (MOSQUITTO: tests)
from fedwire.chunking import build_transfer, unpack_chunk
from fedwire.messages import DeviceStatus, RoundAnnouncement, TransferManifest, UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics

REPO = Path(__file__).resolve().parents[1]
PREFIX = "facefed/faults"
DEVICE_CHUNK_BYTES = 64 * 1024  # 63 chunks per 4 MB update: uploads last long enough to be interrupted
WAIT_S = 90.0

log = logging.getLogger("facefed.bench.faults")


# ---- verdicts -------------------------------------------------------------------------------------


@dataclass
class Verdict:
    scenario: str
    checks: list[tuple[str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, bool(ok)))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)

    def report(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'} {self.scenario} ({self.seconds:.1f} s)"]
        lines += [f"  [{'ok' if ok else 'FAILED'}] {what}" for what, ok in self.checks]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# ---- processes --------------------------------------------------------------------------------------


def persistent_mosquitto(folder: Path, extra_config: str = "") -> MosquittoBroker:
    """A real mosquitto on 127.0.0.1 with persistence on, restartable on the same port (start() again)."""
    (folder / "db").mkdir(parents=True, exist_ok=True)
    return MosquittoBroker(folder, loopback_config(free_port(), extra_config, persistence_dir=folder / "db"))


class Aggregator:
    """`python -m aggregator serve` on a config written here; restartable on the same state dir."""

    def __init__(self, folder: Path, broker: str, **settings) -> None:
        self.folder = folder
        self.state = folder / "state"
        self.config = folder / "aggregator.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        config = {"state_dir": str(self.state), "broker": broker, "topic_prefix": PREFIX, "rounds": 1,
                  "min_clients": 2, "round_timeout_s": 60, "max_chunk_bytes": 256 * 1024, **settings}
        self.config.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = subprocess.Popen([sys.executable, "-m", "aggregator", "serve", "--config", str(self.config)],
                                        stdout=self.log_path(self.starts).open("w"), stderr=subprocess.STDOUT,
                                        cwd=REPO)

    def log_path(self, start: int) -> Path:
        return self.folder / f"aggregator-{start}.log"

    def log_text(self, start: int | None = None) -> str:
        path = self.log_path(start or self.starts)
        return path.read_text() if path.exists() else ""

    def rounds(self) -> list[dict]:
        path = self.state / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def model(self, round_number: int) -> dict[str, np.ndarray]:
        from aggregator.state import StateDir

        return StateDir(self.state).load_round(round_number)

    def rss_mb(self) -> float:
        return _proc_status_kb(self.process.pid, "VmRSS") / 1024

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Device:
    device_id: str
    num_samples: int
    delta: float  # the update is global + delta (every tensor is float32)
    delay_s: float = 0.0  # "training" time before the upload


class Fleet:
    """A process running real EdgeAgents (one thread each) with the known-update trainer."""

    def __init__(self, folder: Path, name: str, broker: str, devices: list[Device], clock_skew_s: float = 0.0) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.devices = devices
        self.spec = self.folder / "fleet.json"
        self.spec.write_text(json.dumps({"broker": broker, "prefix": PREFIX, "folder": str(self.folder),
                                         "clock_skew_s": clock_skew_s,
                                         "devices": [d.__dict__ for d in devices]}))
        self.process = subprocess.Popen([sys.executable, "-m", "bench.faults", "fleet", str(self.spec)],
                                        stdout=(self.folder / "fleet.log").open("w"), stderr=subprocess.STDOUT, cwd=REPO)

    def log_text(self) -> str:
        return (self.folder / "fleet.log").read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def expected_model(start: dict[str, np.ndarray], devices: Iterable[Device]) -> dict[str, np.ndarray]:
    """FedAvg of the known updates, computed here independently of the aggregator's code."""
    devices = list(devices)
    total = sum(d.num_samples for d in devices)
    out = {}
    for name, value in start.items():
        acc = sum(d.num_samples * (value + np.float32(d.delta)).astype(value.dtype).astype(np.float64) for d in devices)
        out[name] = (acc / total).astype(value.dtype)
    return out


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


# ---- the broker's view ------------------------------------------------------------------------------


class Watcher:
    """Listens on the broker like a dashboard would: rounds, acks, statuses, summaries and (optionally)
    every update message, so a transfer can be replayed byte for byte."""

    def __init__(self, url: str, record_updates: bool = False) -> None:
        self.topics = Topics(PREFIX)
        self.lock = threading.Lock()
        self.acks: list[UpdateAck] = []
        self.statuses: dict[str, str] = {}
        self.rounds: list[RoundAnnouncement] = []
        self.update_messages: list[tuple[str, bytes]] = []
        self.first_chunk_from: list[str] = []
        self._triggers: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        subscriptions = [f"{PREFIX}/ack/+", f"{PREFIX}/status/+", self.topics.round]
        subscriptions += self.topics.aggregator_subscriptions()[:2] if record_updates else []
        self.link = MqttLink(url, f"faults-watcher-{secrets.token_hex(4)}", self._on_message, subscriptions)
        self.link.connect()

    def when(self, predicate: Callable[[], bool], action: Callable[[], None]) -> None:
        """Run `action` once, on the network thread, right after the message that makes `predicate` true."""
        with self.lock:
            self._triggers.append((predicate, action))

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse(topic)
        with self.lock:
            if parsed.kind == "ack":
                self.acks.append(UpdateAck.from_json(payload))
            elif parsed.kind == "status" and payload:
                self.statuses[parsed.device_id] = DeviceStatus.from_json(payload).state
            elif parsed.kind == "round":
                self.rounds.append(RoundAnnouncement.from_json(payload))
            else:
                if parsed.kind == "update_chunk" and parsed.device_id not in self.first_chunk_from:
                    self.first_chunk_from.append(parsed.device_id)
                self.update_messages.append((topic, payload))
            fired = [trigger for trigger in self._triggers if trigger[0]()]
            for trigger in fired:
                self._triggers.remove(trigger)
        for _, action in fired:
            action()

    def accepted(self) -> list[UpdateAck]:
        with self.lock:
            return [a for a in self.acks if a.accepted]

    def rejected(self) -> list[UpdateAck]:
        with self.lock:
            return [a for a in self.acks if not a.accepted]

    def open_rounds(self) -> set[int]:
        with self.lock:
            return {a.round for a in self.rounds if a.state == "open"}

    def recorded_transfer(self, transfer_id: str) -> list[tuple[str, bytes]]:
        """The chunks and then the manifest of one recorded update transfer."""
        with self.lock:
            messages = list(self.update_messages)
        chunks, manifest = {}, None
        for topic, payload in messages:
            if topic.endswith("/manifest"):
                if TransferManifest.from_json(payload).transfer_id == transfer_id:
                    manifest = (topic, payload)
            elif payload and unpack_chunk(payload)[0].transfer_id == transfer_id:
                chunks[topic] = payload
        return [*chunks.items(), manifest]

    def close(self) -> None:
        self.link.close()


def replay(url: str, messages: list[tuple[str, bytes]]) -> None:
    link = MqttLink(url, f"faults-replay-{secrets.token_hex(4)}", lambda t, p: None, [])
    link.connect()
    try:
        for topic, payload in messages:
            link.publish(topic, payload)
    finally:
        link.close()


@dataclass
class Setup:
    folder: Path
    broker: MosquittoBroker
    aggregator: Aggregator | None = None
    fleets: list[Fleet] = field(default_factory=list)
    watcher: Watcher | None = None

    def close(self) -> None:
        for fleet in self.fleets:
            fleet.stop()
        if self.aggregator is not None:
            self.aggregator.stop()
        if self.watcher is not None:
            self.watcher.close()
        self.broker.stop()


def _devices(count: int, first: int = 0, delay_s: float = 0.0, stagger_s: float = 0.0, prefix: str = "dev") -> list[Device]:
    return [Device(f"{prefix}-{k:02d}", num_samples=10 + 7 * k, delta=0.01 * (k + 1), delay_s=delay_s + stagger_s * i)
            for i, k in enumerate(range(first, first + count))]


@contextmanager
def _scenario(folder: Path, verdict: Verdict, record_updates: bool = False, broker_config: str = "") -> Iterator[Setup]:
    """A broker and a watcher for one scenario. A wait that times out fails the verdict; at the end everything
    started is stopped and the verdict timed."""
    start = time.monotonic()
    broker = persistent_mosquitto(folder / "broker", broker_config)
    broker.start()
    setup = Setup(folder, broker, watcher=Watcher(broker.url, record_updates))
    try:
        yield setup
    except TimeoutError as exc:
        verdict.check(str(exc), False)
    finally:
        setup.close()
        verdict.seconds = time.monotonic() - start


def _wait_online(setup: Setup, devices: list[Device]) -> None:
    wait_until(lambda: all(setup.watcher.statuses.get(d.device_id) == "online" for d in devices), WAIT_S,
               "every device to come online")


def _finish(setup: Setup, verdict: Verdict, rounds: int, timeout: float = WAIT_S) -> None:
    """Wait for the aggregator and the fleets to finish; their exit codes are checks."""
    try:
        code = setup.aggregator.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    verdict.check(f"aggregator finished all {rounds} round(s) and exited 0 (got {code})", code == 0)
    for fleet in setup.fleets:
        if fleet.process.poll() is None and fleet.process.returncode is None:
            try:
                fleet.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass


def _check_rounds(setup: Setup, verdict: Verdict, expected_clients: dict[int, list[Device]]) -> None:
    """Each round logged once, with exactly the expected devices, and its model equal to their FedAvg."""
    logged = setup.aggregator.rounds()
    numbers = [entry["round"] for entry in logged]
    verdict.check(f"rounds.jsonl holds each round once: {numbers}", numbers == list(range(len(expected_clients) + 1)))
    by_round = {entry["round"]: entry for entry in logged}
    for number, devices in expected_clients.items():
        entry = by_round.get(number, {})
        want = sorted(d.device_id for d in devices)
        verdict.check(f"round {number}: averaged exactly {len(want)} devices (got {entry.get('client_ids')})",
                      entry.get("client_ids") == want)
        verdict.check(f"round {number}: n = {sum(d.num_samples for d in devices)} (got {entry.get('num_samples')})",
                      entry.get("num_samples") == sum(d.num_samples for d in devices))
        if number not in by_round:
            continue
        diff = max_abs_diff(setup.aggregator.model(number), expected_model(setup.aggregator.model(number - 1), devices))
        verdict.check(f"round {number}: global model equals the FedAvg of those updates (max |diff| {diff:.1e})",
                      diff <= 1e-6)


# ---- scenarios -------------------------------------------------------------------------------------


def scenario_broker_restart(folder: Path, devices: int = 4, sig: int = signal.SIGKILL, down_s: float = 1.0) -> Verdict:
    """Mosquitto is killed while agents upload round 1, and restarted on the same port (persistence on)."""
    verdict = Verdict(f"broker-restart ({signal.Signals(sig).name}, {devices} devices)")
    with _scenario(folder, verdict, record_updates=True) as setup:
        fleet_devices = _devices(devices, stagger_s=0.05)
        setup.fleets.append(Fleet(folder, "fleet", setup.broker.url, fleet_devices))
        _wait_online(setup, fleet_devices)
        setup.aggregator = Aggregator(folder / "aggregator", setup.broker.url, rounds=2, min_clients=devices)
        killed = threading.Event()

        def restart_broker() -> None:
            setup.broker.kill(sig)
            killed.set()
            time.sleep(down_s)
            setup.broker.start()

        restarter = threading.Thread(target=restart_broker)
        setup.watcher.when(lambda: bool(setup.watcher.first_chunk_from), restarter.start)
        setup.aggregator.start()
        wait_until(killed.is_set, WAIT_S, "the first update chunk (then the broker is killed)")
        restarter.join()
        _finish(setup, verdict, rounds=2)
        _check_rounds(setup, verdict, {1: fleet_devices, 2: fleet_devices})
        verdict.check("the aggregator reconnected to the restarted broker",
                      "reconnected to" in setup.aggregator.log_text())
        fleet_log = setup.fleets[0].log_text()
        verdict.check("every agent reconnected", fleet_log.count("reconnected to") >= devices)
        verdict.check("all agents exited cleanly", setup.fleets[0].process.poll() == 0)
        verdict.notes.append(f"uploads resent after the restart: {fleet_log.count('again')}")
    return verdict


def scenario_aggregator_sigkill(folder: Path, devices: int = 6, kill_after_acks: int = 3) -> Verdict:
    """The aggregator is SIGKILLed right after its k-th accepted ack of round 1, then restarted."""
    verdict = Verdict(f"aggregator-sigkill (after {kill_after_acks} acks, {devices} devices)")
    with _scenario(folder, verdict, record_updates=True) as setup:
        fleet_devices = _devices(devices, stagger_s=0.6)
        setup.fleets.append(Fleet(folder, "fleet", setup.broker.url, fleet_devices))
        _wait_online(setup, fleet_devices)
        setup.aggregator = agg = Aggregator(folder / "aggregator", setup.broker.url, rounds=2, min_clients=devices)
        watcher = setup.watcher
        acked_before_kill: list[UpdateAck] = []

        def kill() -> None:
            agg.process.send_signal(signal.SIGKILL)
            acked_before_kill.extend(watcher.accepted())

        watcher.when(lambda: len([a for a in watcher.acks if a.accepted]) >= kill_after_acks, kill)
        agg.start()
        wait_until(lambda: agg.process.poll() is not None, WAIT_S, f"{kill_after_acks} acks (then SIGKILL)")
        verdict.check("the aggregator died of SIGKILL mid-round", agg.process.returncode == -signal.SIGKILL)
        verdict.check("round 1 was not closed before the kill", [e["round"] for e in agg.rounds()] == [0])
        # While it is down, devices keep uploading and an update acknowledged before the crash is replayed
        # byte for byte: the broker queues all of it for the aggregator's persistent session.
        replayed = acked_before_kill[0]
        replay(setup.broker.url, watcher.recorded_transfer(replayed.transfer_id))
        time.sleep(1.0)
        agg.start()
        _finish(setup, verdict, rounds=2)
        restarted = agg.log_text()
        acked_ids = sorted({a.device_id for a in acked_before_kill})
        verdict.check(f"the restart restored the acknowledged updates of {acked_ids}",
                      all(d in restarted for d in acked_ids) and "restored" in restarted)
        round1 = next((e for e in agg.rounds() if e["round"] == 1), {})
        verdict.check("no acknowledged update was lost", set(acked_ids) <= set(round1.get("client_ids", [])))
        verdict.check(f"the replayed update of {replayed.device_id} was acknowledged again",
                      sum(1 for a in watcher.accepted() if a.transfer_id == replayed.transfer_id) >= 2)
        _check_rounds(setup, verdict, {1: fleet_devices, 2: fleet_devices})
        verdict.notes.append(f"{len(acked_before_kill)} acks seen before the kill: {acked_ids}")
    return verdict


def scenario_devices_vanish(folder: Path, devices: int = 10, vanish_fraction: float = 0.3,
                            round_timeout_s: float = 8.0) -> Verdict:
    """30% of the devices (their whole process) are SIGKILLed mid-upload; quorum is unreachable, so the
    deadline closes the round with the rest."""
    doomed_count = max(1, round(devices * vanish_fraction))
    verdict = Verdict(f"devices-vanish ({doomed_count} of {devices} SIGKILLed mid-round)")
    with _scenario(folder, verdict, record_updates=True) as setup:
        survivors = _devices(devices - doomed_count)
        doomed = _devices(doomed_count, first=devices - doomed_count, delay_s=1.0)
        setup.fleets += [Fleet(folder, "survivors", setup.broker.url, survivors),
                         Fleet(folder, "doomed", setup.broker.url, doomed)]
        _wait_online(setup, survivors + doomed)
        setup.aggregator = agg = Aggregator(folder / "aggregator", setup.broker.url, rounds=1, min_clients=devices,
                                            round_timeout_s=round_timeout_s)
        doomed_ids = {d.device_id for d in doomed}
        watcher = setup.watcher
        watcher.when(lambda: bool(doomed_ids & set(watcher.first_chunk_from)),
                     lambda: setup.fleets[1].process.send_signal(signal.SIGKILL))
        agg.start()
        _finish(setup, verdict, rounds=1)
        verdict.check("the vanished devices' last wills said offline",
                      all(watcher.statuses.get(d) == "offline" for d in doomed_ids))
        verdict.check(f"the deadline closed round 1 with {len(survivors)} of {devices}",
                      f"closing with {len(survivors)} of {devices} clients" in agg.log_text())
        _check_rounds(setup, verdict, {1: survivors})
    return verdict


def scenario_flood(folder: Path, devices: int = 4, flood_mb: int = 256, max_update_mb: int = 16) -> Verdict:
    """One device floods garbage, oversized and never-finished transfers while the others train."""
    verdict = Verdict(f"flood ({flood_mb} MB of junk from one device, {devices} honest devices)")
    with _scenario(folder, verdict) as setup:
        honest = _devices(devices, delay_s=1.5, stagger_s=0.3)
        setup.fleets.append(Fleet(folder, "fleet", setup.broker.url, honest))
        _wait_online(setup, honest)
        # The device budget is lifted: this scenario tests what validation and reassembly do with junk, in bounded
        # memory; scenario_message_flood tests the budget, which would drop this flooder after ~17 MB.
        setup.aggregator = agg = Aggregator(folder / "aggregator", setup.broker.url, rounds=1, min_clients=devices,
                                            max_update_bytes=max_update_mb << 20,
                                            device_budget={"messages": 10**9, "bytes": 2**50})
        agg.start()
        wait_until(lambda: 1 in setup.watcher.open_rounds(), WAIT_S, "round 1 to open")
        baseline = agg.rss_mb()
        peak = [baseline]
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set() and agg.process.poll() is None:
                try:
                    peak[0] = max(peak[0], agg.rss_mb())
                except (FileNotFoundError, KeyError, ProcessLookupError):
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        sent = _flood(setup.broker.url, "flooder", flood_mb << 20)
        _finish(setup, verdict, rounds=1)
        sampler_stop.set()
        sampler.join()
        growth = peak[0] - baseline
        # The flooder's buffered transfer, honest updates being decoded, and a backlog of the aggregator's
        # inbound queue (not byte-bounded yet: how much waits there depends on how fast it drains).
        bound = 4 * max_update_mb + 64
        verdict.check(f"aggregator RSS grew {growth:.0f} MB over its {baseline:.0f} MB baseline while "
                      f"{sent / 2**20:.0f} MB of junk arrived (bound {bound} MB)", growth <= bound)
        rejected = [a for a in setup.watcher.rejected() if a.device_id == "flooder"]
        verdict.check(f"the flooder's updates were refused with reasons ({len(rejected)} rejection acks)",
                      len(rejected) >= 3 and all(a.reason for a in rejected))
        verdict.check("the flooder never got an update accepted",
                      not any(a.device_id == "flooder" for a in setup.watcher.accepted()))
        verdict.check("junk was logged and dropped", "dropped" in agg.log_text())
        _check_rounds(setup, verdict, {1: honest})
    return verdict


def _flood(url: str, device_id: str, total_bytes: int) -> int:
    """Publish junk on one device's update topics; returns the bytes sent."""
    t = Topics(PREFIX)
    link = MqttLink(url, f"faults-{device_id}", lambda topic, payload: None, [])
    link.connect()
    rng = np.random.default_rng(0)
    sent = 0
    block = rng.bytes(256 * 1024)
    fake_id = secrets.token_bytes(16)
    try:
        for _ in range(20):  # not JSON, and JSON that is not a manifest
            link.publish(t.update_manifest(device_id), b"\x00\xffnot json")
            link.publish(t.update_manifest(device_id), b'{"protocol": 1, "kind": "update"}')
        # A manifest announcing a 1 TB payload in one chunk: refused before any chunk is kept.
        huge, _ = build_transfer("update", device_id, 1, 0, {"w": np.zeros(4, np.float32)}, num_samples=5)
        fields = json.loads(huge.to_json())
        fields.update(payload_bytes=10**12, chunk_size=10**12)
        link.publish(t.update_manifest(device_id), json.dumps(fields).encode())
        # A valid update of the wrong shapes: refused with a reason.
        manifest, chunks = build_transfer("update", device_id, 1, 0, {"w": np.zeros(4, np.float32)}, num_samples=5)
        link.publish_transfer(t.update_manifest(device_id), lambda i: t.update_chunk(device_id, i), manifest, chunks)
        index = 0
        while sent < total_bytes:
            # Chunks of a transfer whose manifest never comes (bounded by max_update_bytes, then dropped),
            # interleaved with chunks that are not chunks at all.
            header = b"FWC1" + fake_id + index.to_bytes(4, "big") + (10**6).to_bytes(4, "big")
            pending = [(t.update_chunk(device_id, index), header + block), (t.update_chunk(device_id, 0), block)]
            for topic, payload in pending:
                link.publish(topic, payload, qos=0)
                sent += len(payload)
            index += 1
        link.publish(t.update_manifest(device_id), b"sentinel: not json")  # QoS 1: everything before it is out
    finally:
        link.close()
    return sent


def scenario_message_flood(folder: Path, devices: int = 3, messages: int = 30_000, qos: int = 1,
                           broker_limits: bool = True) -> Verdict:
    """One device publishes `messages` tiny messages at full speed on its update topics while the honest
    devices upload round 1. broker_limits: the broker runs with broker-config's limits (off: mosquitto's
    defaults, as before issue 14)."""
    verdict = Verdict(f"message-flood ({messages} tiny QoS {qos} messages from one device, {devices} honest devices"
                      f"{'' if broker_limits else ', mosquitto defaults'})")
    limits = ""
    if broker_limits:
        from aggregator.broker_config import BrokerLimits, render_limits

        limits = render_limits(BrokerLimits())
    with _scenario(folder, verdict, broker_config=limits) as setup:
        honest = _devices(devices, delay_s=1.5, stagger_s=0.5)  # they upload while the flood arrives
        setup.fleets.append(Fleet(folder, "fleet", setup.broker.url, honest))
        _wait_online(setup, honest)
        setup.aggregator = agg = Aggregator(folder / "aggregator", setup.broker.url, rounds=1, min_clients=devices)
        agg.start()
        wait_until(lambda: 1 in setup.watcher.open_rounds(), WAIT_S, "round 1 to open")
        started = time.monotonic()
        sent = _tiny_flood(setup.broker.url, "flooder", messages, qos)
        flood_s = time.monotonic() - started
        _finish(setup, verdict, rounds=1)
        round_s = next((e["seconds"] for e in agg.rounds() if e["round"] == 1), float("nan"))
        verdict.notes.append(f"{sent} messages in {flood_s:.2f} s ({sent / max(flood_s, 1e-9):.0f}/s); "
                             f"round 1 took {round_s} s")
        announced = [a for a in setup.watcher.rounds if a.round == 1 and a.state == "open"]
        verdict.check(f"round 1 was announced once ({len(announced)}), not again after a lost update",
                      len(announced) == 1)
        broker_log = setup.broker.log_text()
        verdict.check("mosquitto dropped no outgoing message",
                      "Outgoing messages are being dropped" not in broker_log)
        verdict.check("the flooder was dropped with a logged reason",
                      "dropping every message from flooder for the rest of the round: over its budget" in agg.log_text())
        verdict.check("no honest device had to send its update again (none was lost)",
                      "sending the unacknowledged update" not in setup.fleets[0].log_text())
        _check_rounds(setup, verdict, {1: honest})
    return verdict


def _tiny_flood(url: str, device_id: str, count: int, qos: int) -> int:
    """Publish `count` 16-byte messages on one device's chunk topic as fast as the client can; returns count."""
    t = Topics(PREFIX)
    link = MqttLink(url, f"faults-{device_id}", lambda topic, payload: None, [])
    link.connect()
    done = threading.Semaphore(0)
    junk = b"FWC1" + secrets.token_bytes(12)  # one transfer id: it is the message count that must stop it
    try:
        for index in range(count):
            link.publish_nowait(t.update_chunk(device_id, index % 1000), junk, qos=qos, on_acked=done.release)
        for _ in range(count):  # every message reached the broker
            if not done.acquire(timeout=WAIT_S):
                raise TimeoutError("the flooder's messages were not all acknowledged")
    finally:
        link.close()
    return count


def scenario_skew_and_late(folder: Path, devices: int = 4, skew_s: float = 3600.0) -> Verdict:
    """Device clocks +1 h and -1 h off; during round 2, updates for round 1 arrive (a replay and a fresh one)."""
    verdict = Verdict(f"clock-skew-and-late (+/-{skew_s:.0f} s clocks, {devices} devices)")
    with _scenario(folder, verdict, record_updates=True) as setup:
        ahead = _devices(devices // 2, prefix="ahead")
        behind = _devices(devices - devices // 2, first=devices // 2, prefix="behind", delay_s=0.5)
        setup.fleets += [Fleet(folder, "ahead", setup.broker.url, ahead, clock_skew_s=skew_s),
                         Fleet(folder, "behind", setup.broker.url, behind, clock_skew_s=-skew_s)]
        everyone = ahead + behind
        _wait_online(setup, everyone)
        setup.aggregator = agg = Aggregator(folder / "aggregator", setup.broker.url, rounds=2, min_clients=devices + 1,
                                            round_timeout_s=6)
        watcher = setup.watcher
        late: list[UpdateAck] = []

        def send_late_updates() -> None:
            """Round 2 is open: replay a round-1 update, and send a fresh one trained from model v0."""
            round1 = next(a for a in watcher.accepted() if a.round == 1)
            replay(setup.broker.url, watcher.recorded_transfer(round1.transfer_id))
            start_model = agg.model(0)
            manifest, chunks = build_transfer("update", "latecomer", 1, 0, {k: v + 0.5 for k, v in start_model.items()},
                                              num_samples=1000, max_chunk_bytes=DEVICE_CHUNK_BYTES)
            t = Topics(PREFIX)
            replay(setup.broker.url, [*((t.update_chunk("latecomer", i), c) for i, c in enumerate(chunks)),
                                      (t.update_manifest("latecomer"), manifest.to_json())])
            late.extend([round1, UpdateAck("latecomer", 1, manifest.transfer_id, False)])

        agg.start()
        wait_until(lambda: 2 in watcher.open_rounds(), WAIT_S * 2, "round 2 to open")
        send_late_updates()
        _finish(setup, verdict, rounds=2)
        refused = {a.transfer_id: a for a in watcher.rejected() if a.round == 1}
        for sent in late:
            ack = refused.get(sent.transfer_id)
            verdict.check(f"round-1 update {sent.transfer_id[:8]} from {sent.device_id} sent during round 2 was "
                          f"refused with a reason ({ack.reason if ack else 'no ack'})",
                          ack is not None and "round 1 (current 2)" in ack.reason)
        _check_rounds(setup, verdict, {1: everyone, 2: everyone})
    return verdict


SCENARIOS = {
    "broker-restart": lambda folder, n: [scenario_broker_restart(folder / "term", n, signal.SIGTERM),
                                         scenario_broker_restart(folder / "kill", n, signal.SIGKILL)],
    "aggregator-sigkill": lambda folder, n: [scenario_aggregator_sigkill(folder, n, kill_after_acks=n // 2)],
    "devices-vanish": lambda folder, n: [scenario_devices_vanish(folder, n)],
    "flood": lambda folder, n: [scenario_flood(folder, n)],
    "message-flood": lambda folder, n: [scenario_message_flood(folder, n)],
    "clock-skew-and-late": lambda folder, n: [scenario_skew_and_late(folder, n)],
}


# ---- the fleet process --------------------------------------------------------------------------


class KnownUpdateTrainer:
    """The trainer of a simulated device: global + delta, after `delay_s` of "training"."""

    def __init__(self, device: Device) -> None:
        self.device = device

    @property
    def num_samples(self) -> int:
        return self.device.num_samples

    def train_round(self, round_number, global_tensors, settings, progress=False):
        from edge_agent.trainer import RoundResult
        from model_zoo.train import TrainResult

        time.sleep(self.device.delay_s)
        tensors = {k: (v + np.float32(self.device.delta)).astype(v.dtype) for k, v in global_tensors.items()}
        result = TrainResult(loss=1.0 + self.device.delta, accuracy=0.5, num_samples=self.device.num_samples,
                             seconds=self.device.delay_s, epochs=1)
        return RoundResult(tensors, result)


class _SkewedClock:
    """The `time` module as a device whose wall clock is off by `skew_s` sees it."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.skew_s


def run_fleet(spec_path: Path) -> int:
    import edge_agent.agent as agent_module
    from edge_agent.config import AgentConfig
    from fedwire.config import parse_config

    spec = json.loads(spec_path.read_text())
    folder = Path(spec["folder"])
    if spec["clock_skew_s"]:
        agent_module.time = _SkewedClock(spec["clock_skew_s"])
    failures = []

    def run(device: Device) -> None:
        config = parse_config(AgentConfig, {
            "device_id": device.device_id, "data": str(folder), "state_dir": str(folder / device.device_id),
            "broker": spec["broker"], "topic_prefix": spec["prefix"], "exit_when_finished": True,
            "device": {"name": "faults", "max_chunk_bytes": DEVICE_CHUNK_BYTES},
        })
        try:
            agent_module.EdgeAgent(config, KnownUpdateTrainer(device)).run()
        except Exception:
            log.exception("agent %s crashed", device.device_id)
            failures.append(device.device_id)

    threads = [threading.Thread(target=run, args=(Device(**d),), name=d["device_id"]) for d in spec["devices"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    fleet = sub.add_parser("fleet", help="run the agents of a fleet spec (started by the scenarios)")
    fleet.add_argument("spec", type=Path)
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="run only these scenarios")
    parser.add_argument("--devices", type=int, default=10, help="devices per scenario (default 10)")
    parser.add_argument("--keep", type=Path, help="keep logs and state here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    if args.command == "fleet":
        return run_fleet(args.spec)
    logging.getLogger().setLevel(logging.WARNING)
    import tempfile

    root = args.keep or Path(tempfile.mkdtemp(prefix="facefed-faults-"))
    verdicts = []
    for name in args.only or list(SCENARIOS):
        for verdict in SCENARIOS[name](root / name, args.devices):
            print(verdict.report(), flush=True)
            verdicts.append(verdict)
    failed = [v.scenario for v in verdicts if not v.passed]
    print(f"{len(verdicts) - len(failed)} of {len(verdicts)} fault scenarios passed" +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.keep is None and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:
        print(f"logs and state kept in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
