"""End-to-end federations through a real MQTT broker: separate agent and aggregator processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from facefed.simulate import SimulationConfig, prepare_partitions, run_simulation, write_run_folder
from fedwire.chunking import Reassembler, build_transfer
from fedwire.codec import encode_tensors, sha256_hex
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


def _run_recorded(cfg: SimulationConfig, recorder: Recorder, on_round=None, rogue: list[MqttLink] = ()):
    """(simulation result, every message the recorder saw); rogue links, opened during the run, are closed."""
    try:
        result = run_simulation(cfg, on_round)
    finally:
        for link in rogue:
            link.close()
    time.sleep(0.5)
    messages = recorder.snapshot()
    recorder.link.close()
    return result, messages


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

    result, messages = _run_recorded(cfg, recorder, on_round, rogue)

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


# ---- download codec: devices rebuild the global model from deltas, or fetch the full one (PROTOCOL.md 5.2) ----

def _delta_agent(monkeypatch, full_models: dict):
    """An EdgeAgent without a broker; _fetch_full_model serves `full_models` (version -> tensors) and counts calls."""
    from types import SimpleNamespace

    from edge_agent.agent import EdgeAgent

    config = SimpleNamespace(topics=Topics("t"), device_id="dev-1", aggregator_key=None,
                             unlock=SimpleNamespace(reembed_after_round=False),
                             state_dir=Path(tempfile.mkdtemp(prefix="agent-state-")))  # its freshness.json
    agent = EdgeAgent(config, trainer=None)
    fetched = []

    def fetch(version, sha256):
        fetched.append(version)
        return full_models.get(version)

    monkeypatch.setattr(agent, "_fetch_full_model", fetch)
    return agent, fetched


def _published(version: int, base: dict, new: dict, residual=None):
    """What the aggregator publishes for `version`: (delta transfer, decoded model, residual)."""
    from fedwire.chunking import CompletedTransfer
    from fedwire.compression import as_global_delta, encode_global_delta

    wire, decoded, residual = encode_global_delta(new, base, residual)
    manifest, _ = build_transfer("global", "aggregator", version, version, wire)
    manifest = as_global_delta(manifest, version - 1, sha256_hex(encode_tensors(decoded)))
    return CompletedTransfer(manifest, wire, manifest.payload_bytes), decoded, residual


def _step(tensors: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in tensors.items()}


def test_agent_rebuilds_deltas_exactly_and_falls_back_to_the_full_model(monkeypatch):
    from fedwire.chunking import CompletedTransfer

    from edge_agent.agent import GlobalModel

    v0 = {"w": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32),
          "b": np.ones(16, np.float32)}
    server, published, residual = v0, {0: v0}, None
    transfers = {}
    for version in range(1, 6):
        transfers[version], server, residual = _published(version, server, _step(server, version), residual)
        published[version] = server
    agent, fetched = _delta_agent(monkeypatch, published)
    full0, _ = build_transfer("global", "aggregator", 0, 0, v0)
    agent._on_global(CompletedTransfer(full0, v0, full0.payload_bytes))
    for version in range(1, 4):  # holds each base: rebuilds from the delta, bit for bit, no full fetch
        agent._on_global(transfers[version])
        assert agent.global_model.version == version
        for name in v0:
            np.testing.assert_array_equal(agent.global_model.tensors[name], published[version][name])
    assert fetched == [] and agent.full_fetches == 0
    agent._on_global(transfers[5])  # missed version 4: the delta 4 -> 5 cannot apply
    assert fetched == [5] and agent.full_fetches == 1 and agent.global_model.version == 5
    np.testing.assert_array_equal(agent.global_model.tensors["w"], published[5]["w"])

    newcomer, fetched = _delta_agent(monkeypatch, {})  # a new device, and the full model is not there (yet)
    newcomer._on_global(transfers[2])
    assert fetched == [2] and newcomer.global_model is None and newcomer._pending_full is not None
    monkeypatch.setattr(newcomer, "_fetch_full_model", lambda version, sha: published[version])
    newcomer._try_full_model(time.time())  # the retry (every GLOBAL_REFETCH_S while a round waits) succeeds
    assert newcomer.global_model.version == 2 and newcomer._pending_full is None

    corrupt, fetched = _delta_agent(monkeypatch, published)
    corrupt.global_model = GlobalModel(2, published[2], sha256_hex(encode_tensors(published[2])))
    bad = transfers[3]
    tampered = {**bad.tensors, "w": bad.tensors["w"].copy()}
    tampered["w"][0, 0] ^= 1  # the payload hash matched in transit, but the rebuilt model is not v3: refused
    corrupt._on_global(CompletedTransfer(bad.manifest, tampered, bad.payload_bytes))
    assert fetched == [3] and corrupt.global_model.version == 3
    np.testing.assert_array_equal(corrupt.global_model.tensors["w"], published[3]["w"])
    malformed, fetched = _delta_agent(monkeypatch, published)
    malformed.global_model = GlobalModel(2, published[2], sha256_hex(encode_tensors(published[2])))
    malformed._on_global(CompletedTransfer(bad.manifest, {"w": bad.tensors["w"]}, bad.payload_bytes))  # no scales
    assert fetched == [3] and malformed.global_model.version == 3


def test_agent_applies_a_statistics_patch_to_the_version_it_holds(monkeypatch):
    from fedwire.chunking import CompletedTransfer
    from fedwire.compression import PATCH, as_global_delta

    v1 = {"w": np.ones((8, 4), np.float32), "bn.running_var": np.ones(4, np.float32)}
    final = {**v1, "bn.running_var": np.full(4, 0.5, np.float32)}
    agent, fetched = _delta_agent(monkeypatch, {1: final})
    full, _ = build_transfer("global", "aggregator", 1, 1, v1)
    agent._on_global(CompletedTransfer(full, v1, full.payload_bytes))
    patch = {"bn.running_var": final["bn.running_var"]}
    manifest, _ = build_transfer("global", "aggregator", 1, 1, patch)
    manifest = as_global_delta(manifest, 1, sha256_hex(encode_tensors(final)), PATCH)
    agent._on_global(CompletedTransfer(manifest, patch, manifest.payload_bytes))
    assert fetched == [] and agent.global_model.version == 1
    assert agent.global_model.sha256 == sha256_hex(encode_tensors(final))
    np.testing.assert_array_equal(agent.global_model.tensors["bn.running_var"], final["bn.running_var"])
    newcomer, fetched = _delta_agent(monkeypatch, {1: final})  # holds nothing: the patch cannot apply
    newcomer._on_global(CompletedTransfer(manifest, patch, manifest.payload_bytes))
    assert fetched == [1] and newcomer.global_model.sha256 == manifest.model_sha256


def _replay_globals(messages, topics: Topics) -> dict[int, dict]:
    """Rebuild every global model a device subscribed to the global topics would hold, from the recorded bytes."""
    from fedwire.compression import decode_update

    reassembler, held, models = Reassembler(), None, {}
    for topic, payload in messages:
        if not topic.startswith(topics.prefix + "/global/") or "/global/full/" in topic or not payload:
            continue  # only what a device's own subscriptions deliver
        kind = topics.parse(topic).kind
        done = (reassembler.add_manifest("global", TransferManifest.from_json(payload), time.time())
                if kind == "global_manifest" else reassembler.add_chunk("global", payload, time.time()))
        if done is None:
            continue
        m = done.manifest
        if m.codec == "safetensors":
            held = done.tensors
        else:
            assert m.base_version in models, f"v{m.model_version} arrived before its base v{m.base_version}"
            held = decode_update(done.tensors, models[m.base_version], m.codec)
        models[m.model_version] = held
    return models


def test_compressed_uploads_and_downloads_over_a_real_broker(broker_url, orl_small, tmp_path):
    """topk-int8-delta uploads and int8-delta downloads, 3 rounds; a device that joins late gets the full model.

    Every version a device rebuilds from deltas is bit for bit the aggregator's checkpoint (no drift), and a
    malformed compressed update is rejected with a reason while the round goes on."""

    prefix = "facefed/e2e-delta"
    topics = Topics(prefix)
    recorder = Recorder(broker_url)
    out = tmp_path / "run"
    cfg = SimulationConfig(data=[orl_small], out=out, clients=3, rounds=3, local_epochs=1, holdout=3,
                           broker=broker_url, topic_prefix=prefix, max_chunk_bytes=64 * 1024, batch_size=16,
                           update_codec="topk-int8-delta", download_codec="int8-delta")
    rogue: list[MqttLink] = []
    round2_open = threading.Event()

    def on_announcement(topic: str, payload: bytes) -> None:
        announcement = RoundAnnouncement.from_json(payload)
        if announcement.round == 2 and announcement.state == "open":
            round2_open.set()

    def on_round(entry: dict) -> None:
        if entry["round"] != 1:
            return
        # a malformed top-k update (indices out of order) sent into round 2 by a device outside the federation
        from fedwire.compression import TOPK_INT8_DELTA, encode_update

        link = MqttLink(broker_url, client_id="test-rogue-delta", on_message=on_announcement,
                        subscriptions=[topics.round])
        link.connect()
        rogue.append(link)
        assert round2_open.wait(60), "round 2 was never announced"
        reference = shared_tensors(load_checkpoint(out / "aggregator" / "checkpoints" / "round-0001.safetensors")[0])
        wire, _ = encode_update({k: v + np.float32(0.01) if v.dtype == np.float32 else v
                                 for k, v in reference.items()}, reference, TOPK_INT8_DELTA, topk=0.1)
        name = next(k for k in wire if k.endswith("#index") and wire[k].size > 1)
        wire[name] = wire[name][::-1].copy()
        manifest, chunks = build_transfer("update", "rogue-c", 2, 1, wire, num_samples=10, codec=TOPK_INT8_DELTA)
        link.publish_transfer(topics.update_manifest("rogue-c"), lambda i: topics.update_chunk("rogue-c", i),
                              manifest, chunks)

    result, messages = _run_recorded(cfg, recorder, on_round, rogue)

    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    checkpoints = {r: shared_tensors(load_checkpoint(out / "aggregator" / "checkpoints" / f"round-{r:04d}.safetensors")[0])
                   for r in range(4)}
    models = _replay_globals(messages, topics)
    assert sorted(models) == [0, 1, 2, 3]
    for version, tensors in models.items():  # drift-free: what devices rebuild is the aggregator's model
        assert sha256_hex(encode_tensors(tensors)) == sha256_hex(encode_tensors(checkpoints[version])), version
    globals_ = [TransferManifest.from_json(p) for t, p in messages if t == topics.global_manifest and p]
    assert [m.codec for m in globals_][:4] == ["safetensors", "int8-delta", "int8-delta", "int8-delta"]
    fulls = [TransferManifest.from_json(p) for t, p in messages if t == topics.global_full_manifest and p]
    assert {m.model_version for m in fulls} >= {1, 2}  # the full model stays retained for devices without the base
    delta_bytes = [m.payload_bytes for m in globals_[1:]]
    assert max(delta_bytes) * 3.5 < globals_[0].payload_bytes  # int8 deltas: well under a third of float32
    assert result.rounds[1]["bytes_down"] < result.rounds[1]["clients"] * globals_[0].payload_bytes / 3.5
    uploads = [TransferManifest.from_json(p) for t, p in messages
               if t.endswith("/manifest") and "/update/client-" in t]
    assert uploads and all(m.codec == "topk-int8-delta" for m in uploads)
    acks = [UpdateAck.from_json(p) for t, p in messages if t == topics.ack("rogue-c")]
    assert acks and not acks[0].accepted and "#index" in acks[0].reason
    assert result.rounds[2]["rejected"] >= 1

    # A device that joins now holds no version: the retained delta v3 does not apply, so it fetches the retained
    # full model over its own short-lived connection, and gets exactly the aggregator's final model.
    from types import SimpleNamespace

    from edge_agent.agent import EdgeAgent
    from fedwire.compression import decode_update  # noqa: F401  (the agent's own path is exercised below)

    config = SimpleNamespace(topics=topics, device_id="late-1", aggregator_key=None, broker=broker_url,
                             protocol="auto", tls=None, unlock=SimpleNamespace(reembed_after_round=False),
                             state_dir=tmp_path / "late-1")
    newcomer = EdgeAgent(config, trainer=None)
    last_delta = globals_[-1]
    reassembler, done = Reassembler(), None
    for topic, payload in messages:  # the retained delta as the newcomer receives it on subscribing
        if topic == topics.global_manifest and payload and TransferManifest.from_json(payload) == last_delta:
            done = reassembler.add_manifest("global", last_delta, time.time())
        elif topic.startswith(prefix + "/global/chunk/") and payload:
            try:
                done = reassembler.add_chunk("global", payload, time.time()) or done
            except Exception:
                pass
    assert done is not None and done.manifest.model_version == 3
    newcomer._on_global(done)
    assert newcomer.full_fetches == 1 and newcomer.global_model.version == 3
    assert sha256_hex(encode_tensors(newcomer.global_model.tensors)) == sha256_hex(encode_tensors(checkpoints[3]))


def test_measured_batchnorm_statistics_over_a_real_broker(mosquitto_broker, orl_small, tmp_path):
    """bn_statistics: measured, with int8-delta downloads. After each round's averaging the devices measure BatchNorm
    statistics on the averaged weights; the round's model carries their n_k-weighted mean, and what a device
    rebuilds from the delta and then the patch is bit for bit the aggregator's checkpoint."""
    from aggregator.strategies.fedavg import fedavg
    from model_zoo.checkpoint import running_statistics
    from model_zoo.train import measure_batchnorm_statistics

    prefix = "facefed/e2e-bn"
    topics = Topics(prefix)
    recorder = Recorder(mosquitto_broker)
    out = tmp_path / "run"
    cfg = SimulationConfig(data=[orl_small], out=out, clients=3, rounds=2, local_epochs=1, holdout=3,
                           broker=mosquitto_broker, topic_prefix=prefix, max_chunk_bytes=64 * 1024, batch_size=16,
                           download_codec="int8-delta", bn_statistics="measured")
    result, messages = _run_recorded(cfg, recorder)

    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert all(r["clients"] == 3 and "val_accuracy_averaged_bn" in r for r in result.rounds[1:])
    checkpoints = {r: shared_tensors(load_checkpoint(out / "aggregator" / "checkpoints" / f"round-{r:04d}.safetensors")[0])
                   for r in range(3)}
    globals_ = [TransferManifest.from_json(p) for t, p in messages if t == topics.global_manifest and p]
    assert [(m.codec, m.model_version) for m in globals_] == [
        ("safetensors", 0), ("int8-delta", 1), ("patch", 1), ("int8-delta", 2), ("patch", 2)]
    patch = globals_[2]
    assert {s.name for s in patch.tensors} == set(running_statistics(checkpoints[1]))  # only the statistics travel
    models = _replay_globals(messages, topics)
    for version in (1, 2):
        assert sha256_hex(encode_tensors(models[version])) == sha256_hex(encode_tensors(checkpoints[version]))

    # What each device sent in round 2's statistics phase: its own measurement of the averaged weights.
    uploads, reassembler = {}, Reassembler()
    for topic, payload in messages:
        parsed = topics.parse(topic) if topic.startswith(prefix + "/update/") else None
        if parsed is None:
            continue
        done = (reassembler.add_manifest(parsed.device_id, TransferManifest.from_json(payload), time.time())
                if parsed.kind == "update_manifest" else reassembler.add_chunk(parsed.device_id, payload, time.time()))
        if done is not None and done.manifest.kind == "statistics" and done.manifest.round == 2:
            uploads[parsed.device_id] = done
    assert sorted(uploads) == ["client-0", "client-1", "client-2"]
    expected = fedavg((done.tensors, done.manifest.num_samples) for done in uploads.values())
    for name, value in expected.items():
        np.testing.assert_array_equal(checkpoints[2][name], value)
    weights = {k: v for k, v in checkpoints[2].items() if k not in expected}
    assert all(np.array_equal(models[2][k], v) for k, v in weights.items())
    # Recomputed here from client-0's images and the averaged weights, as the device does (seed, batch size).
    backbone = load_checkpoint(out / "aggregator" / "checkpoints" / "round-0002.safetensors")[0]
    images = load_dataset(out / "clients" / "client-0" / "data").images
    measured = measure_batchnorm_statistics(backbone, images, batch_size=16, seed=cfg.seed)
    for name, value in uploads["client-0"].tensors.items():
        np.testing.assert_allclose(value, measured[name], rtol=1e-3, atol=1e-3)  # thread counts differ
