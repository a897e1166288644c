"""End-to-end federations through a real MQTT broker: separate agent and aggregator processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from facefed.simulate import SimulationConfig, prepare_partitions, run_simulation, write_run_folder
from fedwire.chunking import Reassembler, build_transfer
from fedwire.messages import DeviceStatus, RoundAnnouncement, TransferManifest, UpdateAck
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics
from model_zoo.checkpoint import load_checkpoint, shared_tensors
from model_zoo.data import load_dataset

pytestmark = pytest.mark.e2e

DATA_ROOT = Path(os.environ.get("FACEFED_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
ORL = DATA_ROOT / "orl"


@pytest.fixture(scope="module")
def orl_small(tmp_path_factory):
    """15 ORL identities (3 clients x 4 + 3 held out) written as a folder-per-identity dataset."""
    if not ORL.is_dir():
        pytest.skip(f"ORL dataset not found at {ORL} (set FACEFED_DATA_ROOT)")
    from model_zoo.data import save_folders

    dataset = load_dataset(ORL)
    keep = np.flatnonzero(dataset.labels < 15)
    root = tmp_path_factory.mktemp("orl15")
    save_folders(dataset.subset(keep), root)
    return root


class Recorder:
    """Subscribes to '#' and keeps every message, as an eavesdropper on the broker would."""

    def __init__(self, url: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(url, client_id="test-recorder", on_message=self._on, subscriptions=["#"])
        self.link.connect()

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)


def _rogue_messages(url: str, topics: Topics, global_specs: dict[str, tuple]) -> MqttLink:
    """Garbage and a wrong-shape update, published once round 1 is open."""
    round_open = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        announcement = RoundAnnouncement.from_json(payload)
        if announcement.round == 1 and announcement.state == "open":
            round_open.set()

    link = MqttLink(url, client_id="test-rogue", on_message=on_message, subscriptions=[topics.round])
    link.connect()
    assert round_open.wait(60), "round 1 was never announced"
    link.publish(topics.update_manifest("rogue-a"), b"\x00\xffnot json at all")
    link.publish(topics.update_chunk("rogue-a", 0), b"garbage chunk")
    link.publish(topics.status("rogue-a"), b"{broken")
    wrong = {name: np.zeros(tuple(d + 1 for d in shape) or (1,), np.float32) for name, shape in global_specs.items()}
    manifest, chunks = build_transfer("update", "rogue-b", 1, 0, wrong, num_samples=10)
    link.publish_transfer(topics.update_manifest("rogue-b"), lambda i: topics.update_chunk("rogue-b", i),
                          manifest, chunks)
    return link


def test_federation_over_real_broker(broker_url, orl_small, tmp_path):
    prefix = "facefed/e2e"
    topics = Topics(prefix)
    recorder = Recorder(broker_url)
    out = tmp_path / "run"
    cfg = SimulationConfig(data=[orl_small], out=out, clients=3, rounds=2, local_epochs=1, holdout=3,
                           broker=broker_url, topic_prefix=prefix, max_chunk_bytes=64 * 1024, batch_size=16)
    rogue: list[MqttLink] = []

    def on_round(entry: dict) -> None:
        if entry["round"] == 0:  # round 1 is being announced now
            initial = load_checkpoint(out / "aggregator" / "checkpoints" / "round-0000.safetensors")[0]
            specs = {k: v.shape for k, v in shared_tensors(initial).items()}
            rogue.append(_rogue_messages(broker_url, topics, specs))

    try:
        result = run_simulation(cfg, on_round)
    finally:
        for link in rogue:
            link.close()
    time.sleep(0.5)
    messages = recorder.snapshot()
    recorder.link.close()

    # Rounds completed with all three honest clients, and the model changed each round.
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert all(r["clients"] == 3 for r in result.rounds[1:])
    assert result.rounds[1]["rejected"] >= 1  # the wrong-shape update
    assert all(r["bytes"] > 0 and r["train_loss"] is not None for r in result.rounds[1:])
    assert "val_accuracy" in result.rounds[-1]
    checkpoints = [shared_tensors(load_checkpoint(out / "aggregator" / "checkpoints" / f"round-{r:04d}.safetensors")[0])
                   for r in range(3)]
    for before, after in zip(checkpoints, checkpoints[1:]):
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert (out / "metrics.jsonl").exists() and (out / "training_curves.png").stat().st_size > 1000
    assert (out / "final.safetensors").exists()

    # The wrong-shape update got a reasoned rejection on its ack topic.
    acks = [UpdateAck.from_json(p) for t, p in messages if t == topics.ack("rogue-b")]
    assert acks and not acks[0].accepted and "shape" in acks[0].reason

    _assert_only_backbone_left_devices(messages, topics, checkpoints[0], out)


def _assert_only_backbone_left_devices(messages, topics: Topics, backbone: dict, out: Path) -> None:
    """Every byte a device published is a status, an update manifest or a chunk of backbone tensors."""
    backbone_specs = {k: (v.shape, v.dtype) for k, v in backbone.items()}
    heads = [load_file(str(p)) for p in out.glob("clients/client-*/state/head.safetensors")]
    assert len(heads) == 3
    head_probes = [next(iter(h.values())).tobytes()[:64] for h in heads]
    reassembler = Reassembler()
    completed = []
    device_topics = 0
    for topic, payload in messages:
        parsed = topics.parse(topic) if topic.startswith(topics.prefix + "/") else None
        sender = parsed.device_id if parsed else None
        if sender is None or not sender.startswith("client-") or parsed.kind == "ack":
            continue  # acks are the aggregator's replies to the device
        device_topics += 1
        assert parsed.kind in {"status", "update_manifest", "update_chunk"}, topic
        for probe in head_probes:
            assert probe not in payload, f"head weights leaked on {topic}"
        if parsed.kind == "status":
            DeviceStatus.from_json(payload)
            assert len(payload) < 1024
        elif parsed.kind == "update_manifest":
            manifest = TransferManifest.from_json(payload)
            assert set(manifest.metrics) <= {"train_loss", "train_accuracy", "train_seconds", "local_epochs"}
            done = reassembler.add_manifest(sender, manifest, time.time())
            completed += [done] if done else []
        else:
            done = reassembler.add_chunk(sender, payload, time.time())
            completed += [done] if done else []
    assert device_topics > 0
    assert len(completed) == 6  # 3 clients x 2 rounds
    for transfer in completed:
        assert {k: (v.shape, v.dtype) for k, v in transfer.tensors.items()} == backbone_specs


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logged_rounds(state: Path) -> list[int]:
    path = state / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def test_aggregator_killed_mid_run_resumes_at_the_right_round(embedded_broker, orl_small, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = SimulationConfig(data=[orl_small], out=out, clients=2, rounds=3, local_epochs=1, holdout=3,
                           broker=embedded_broker, batch_size=16)
    clients, holdout = prepare_partitions(load_dataset(orl_small), cfg)
    aggregator_yaml, agent_yamls = write_run_folder(cfg, clients, holdout, embedded_broker, "facefed/restart")
    state = out / "aggregator"

    def start_aggregator(log_name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "aggregator", "serve", "--config", str(aggregator_yaml)],
                                stdout=(out / log_name).open("w"), stderr=subprocess.STDOUT)

    aggregator = start_aggregator("aggregator-1.log")
    agents = [subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(p), "--exit-when-finished"],
                               stdout=(out / f"agent-{k}.log").open("w"), stderr=subprocess.STDOUT)
              for k, p in enumerate(agent_yamls)]
    try:
        _wait_for(lambda: 1 in _logged_rounds(state), 180, "round 1 to complete")
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait(timeout=10)
        completed_before = max(_logged_rounds(state))
        aggregator = start_aggregator("aggregator-2.log")
        assert aggregator.wait(timeout=240) == 0, (out / "aggregator-2.log").read_text()[-3000:]
        for agent in agents:
            assert agent.wait(timeout=60) == 0
    finally:
        for proc in [aggregator, *agents]:
            if proc.poll() is None:
                proc.kill()
    restarted_log = (out / "aggregator-2.log").read_text()
    assert f"round {completed_before} complete" in restarted_log
    assert f"round {completed_before + 1} open" in restarted_log
    assert "round 1 open" not in restarted_log
    rounds = _logged_rounds(state)
    assert rounds == [0, 1, 2, 3], rounds  # each round logged exactly once, none lost
