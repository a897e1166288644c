"""Sharded aggregation: 2 workers share the update stream through MQTT 5 shared subscriptions on a real
Mosquitto, a reducer adds their partial sums, and the global model equals the exact weighted mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.strategies import WeightedSum
from aggregator.sharded import ShardReducer, owner
from fedwire.config import ConfigError
from fedwire.errors import ProtocolError
from fedwire.messages import ShardReport
from fedwire.mqtt import unshared
from fedwire.topics import ShardTopics

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_owner_is_stable_and_spreads_devices() -> None:
    owners = [owner(f"sim-{i:05d}", 4) for i in range(400)]
    assert owners == [owner(f"sim-{i:05d}", 4) for i in range(400)]
    assert all(60 < owners.count(w) < 140 for w in range(4))


def test_topics_route_and_unshare() -> None:
    shard = ShardTopics("fleet/a")
    routed = shard.route(3, "fleet/a/update/cam-1/chunk/7")
    assert routed == "fleet/a/shard/route/3/update/cam-1/chunk/7"
    assert shard.unroute(routed, 3) == "fleet/a/update/cam-1/chunk/7"
    assert shard.unroute(routed, 2) is None
    assert shard.parse("fleet/a/shard/partial/1/chunk/0") == ("partial_chunk", 1)
    assert unshared("$share/g/fleet/a/update/+/manifest") == "fleet/a/update/+/manifest"


def test_partial_sums_merge_to_the_single_process_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [({"w": rng.standard_normal(50).astype(np.float32)}, int(n)) for n in rng.integers(1, 100, 9)]
    single, parts = WeightedSum(), [WeightedSum(), WeightedSum()]
    for i, (tensors, n) in enumerate(updates):
        single.add(tensors, n)
        parts[i % 2].add(tensors, n)
    merged = WeightedSum()
    for part in parts:
        merged.merge(WeightedSum.from_sums(part.sums, {"w": np.dtype(np.float32)}, part.total_weight, part.count))
    assert np.array_equal(merged.mean()["w"], single.mean()["w"]) and merged.mean()["w"].dtype == np.float32


def test_report_rejects_inconsistent_fields() -> None:
    good = ShardReport(1, 0, "ab" * 16, {"cam-1": 3})
    assert ShardReport.from_json(good.to_json()) == good
    with pytest.raises(ProtocolError):
        ShardReport.from_json(ShardReport(1, 0, "", {"cam-1": 3}).to_json())


@pytest.mark.parametrize("fields, reason", [
    ({"shard_workers": 0}, "must be in [1, 256]"),
    ({"shard_workers": 2}, "needs an MQTT 5 broker"),  # embedded amqtt broker
    ({"shard_workers": 2, "broker": "mqtt://127.0.0.1:1883", "protocol": "3.1.1"}, "needs MQTT 5"),
    ({"shard_workers": 2, "broker": "mqtt://127.0.0.1:1883", "strategy": "median"}, "needs every update"),
])
def test_config_rejects_unsupported_sharding(tmp_path: Path, fields: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match="shard_workers") as info:
        AggregatorConfig(state_dir=tmp_path, **fields).check()
    assert reason in str(info.value)


def test_broker_without_mqtt5_fails_at_start_with_a_clear_error(tmp_path: Path, embedded_broker: str) -> None:
    config = AggregatorConfig(state_dir=tmp_path, broker=embedded_broker, shard_workers=2)
    with pytest.raises(ConnectionError, match="needs an MQTT 5 broker with shared subscriptions"):
        ShardReducer(config).run()


@pytest.mark.e2e
def test_two_workers_and_reducer_give_the_exact_weighted_mean(tmp_path: Path, mosquitto_broker: str) -> None:
    """12 simulated devices (bench/fleet_load.py: real manifests and chunks, acks awaited), 2 rounds."""
    out = tmp_path / "fleet.json"
    # Its own process group: on a timeout, the bench's aggregator and device processes go too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fleet_load", "--devices", "12", "--rounds", "2", "--shard-workers", "2",
         "--processes", "2", "--broker", mosquitto_broker, "--json", str(out), "--keep", str(tmp_path / "runs")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "runs").glob("*/aggregator.log"))
    assert proc.returncode == 0, output + logs
    [result] = json.loads(out.read_text())
    assert [r["updates"] for r in result["rounds"]] == [12, 12]
    assert all(r["exact"] for r in result["rounds"])
    counters = result["device_counters"]
    assert counters["accepted"] == 24 and counters["rejected"] == 0
    assert "forwarded" in logs  # both workers saw other owners' messages through the shared subscription
