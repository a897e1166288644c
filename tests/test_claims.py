"""A device's claims (n_k, train loss) bounded, and nothing non-finite reaching a global model: the pure parts.
The same attacks through a real broker and a running aggregator are in test_attacks_claims.py."""

import json
import time

import numpy as np
import pytest

from aggregator.claims import bound_sample_count, clamp_note, claimed_loss
from aggregator.config import AggregatorConfig
from aggregator.strategies import NonFiniteResult, WeightedSum
from aggregator.validation import UpdateRejected, model_problem
from fedwire.chunking import build_transfer
from fedwire.config import ConfigError, parse_config
from fedwire.errors import ProtocolError
from fedwire.messages import DEVICE_MAX_SAMPLES, MAX_NUM_SAMPLES, TransferManifest
from fedwire.mqtt import MqttLink


def _manifest_json(**changes) -> bytes:
    manifest, _ = build_transfer("update", "cam-a", 1, 0, {"w": np.ones(3, np.float32)}, num_samples=10,
                                 metrics={"train_loss": 0.5})
    return json.dumps({**json.loads(manifest.to_json()), **changes}).encode()


@pytest.mark.parametrize("claim", [10**400, 10**308, MAX_NUM_SAMPLES + 1])
def test_a_sample_count_beyond_2_53_is_a_protocol_error_checked_as_an_integer(claim):
    with pytest.raises(ProtocolError, match="above the maximum") as info:
        TransferManifest.from_json(_manifest_json(num_samples=claim))
    assert info.value.field == "num_samples" and len(str(info.value)) < 120  # no 400 digits in the log
    assert TransferManifest.from_json(_manifest_json(num_samples=MAX_NUM_SAMPLES)).num_samples == MAX_NUM_SAMPLES


def test_a_huge_integer_metric_is_a_protocol_error_not_an_overflow():
    with pytest.raises(ProtocolError, match="finite number") as info:
        TransferManifest.from_json(_manifest_json(metrics={"train_loss": 10**400}))
    assert info.value.field == "metrics.train_loss"


def test_a_non_finite_train_loss_travels_as_null():
    manifest, _ = build_transfer("update", "cam-a", 1, 0, {"w": np.ones(3, np.float32)}, num_samples=10,
                                 metrics={"train_loss": float("nan"), "train_accuracy": np.float32(0.25)})
    sent = json.loads(manifest.to_json())
    assert sent["metrics"] == {"train_loss": None, "train_accuracy": 0.25}
    assert TransferManifest.from_json(manifest.to_json()).metrics["train_loss"] is None


@pytest.mark.parametrize("weighting, claimed, n_k, weight, clamped", [
    ("samples", 40, 40, 40, None),
    ("capped", 40, 40, 40, None),
    ("capped", 10**12, 100, 100, 10**12),
    ("uniform", 40, 40, 1, None),
    ("uniform", 10**12, 100, 1, 10**12),
])
def test_each_weighting_bounds_the_claim(weighting, claimed, n_k, weight, clamped):
    count = bound_sample_count(claimed, weighting, cap=100)
    assert (count.n_k, count.weight, count.clamped_from) == (n_k, weight, clamped)
    if clamped:
        assert clamp_note(count, 100) == f"claimed num_samples {claimed} clamped to max_samples_per_update 100"


def test_weighting_samples_rejects_a_claim_above_the_cap():
    with pytest.raises(UpdateRejected, match="above max_samples_per_update 100"):
        bound_sample_count(101, "samples", cap=100)
    with pytest.raises(UpdateRejected, match="positive"):
        bound_sample_count(0, "capped", cap=100)


def test_the_round_loss_is_the_median_of_the_claims():
    assert claimed_loss({"a": 0.5, "b": 0.7, "liar": 1e30}) == 0.7
    assert claimed_loss({}) is None


def test_an_update_that_would_overflow_the_sum_is_refused_and_the_sum_kept():
    acc = WeightedSum()
    acc.add({"w": np.array([1.0, 2.0])}, 3)
    with pytest.raises(NonFiniteResult, match="weighted sum"):
        acc.add({"w": np.array([1e300, 0.0])}, 10**12)  # float64 tensors: n_k * w overflows
    with pytest.raises(ValueError, match="at most 2\\^53"):
        acc.add({"w": np.array([1.0, 1.0])}, 10**400)  # an int compare, no OverflowError
    assert (acc.count, acc.total_weight) == (1, 3)
    np.testing.assert_array_equal(acc.mean()["w"], [1.0, 2.0])
    other = WeightedSum.from_sums({"w": np.array([1.7e308, 0.0])}, {"w": np.dtype(np.float64)}, 1, 1)
    with pytest.raises(NonFiniteResult, match="merged"):
        other.merge(WeightedSum.from_sums({"w": np.array([1.7e308, 0.0])}, {"w": np.dtype(np.float64)}, 1, 1))


def test_the_guard_names_what_must_not_be_published():
    good = {"bn.running_var": np.ones(2, np.float32), "w": np.zeros(2, np.float32)}
    assert model_problem(good) is None
    assert "NaN or Inf" in model_problem({**good, "w": np.array([0.0, np.inf], np.float32)})
    assert "negative BatchNorm variance" in model_problem({**good, "bn.running_var": np.array([1.0, -1.0], np.float32)})


def test_config_bounds_the_cap_and_keeps_uniform_single_process(tmp_path):
    config = parse_config(AggregatorConfig, {"state_dir": str(tmp_path)})
    assert (config.max_samples_per_update, config.weighting) == (DEVICE_MAX_SAMPLES, "samples")
    for fields, field in [({"max_samples_per_update": 0}, "max_samples_per_update"),
                          ({"max_samples_per_update": 2**60}, "max_samples_per_update"),
                          ({"weighting": "loudest"}, "weighting"),
                          ({"weighting": "uniform", "shard_workers": 2, "broker": "mqtt://127.0.0.1:1883"},
                           "weighting")]:
        with pytest.raises(ConfigError) as info:
            parse_config(AggregatorConfig, {"state_dir": str(tmp_path), **fields})
        assert info.value.field == field


def test_example_config_states_the_default_cap(capsys):
    from aggregator.cli import main

    assert main(["example-config"]) == 0
    assert f"max_samples_per_update: {DEVICE_MAX_SAMPLES}\n" in capsys.readouterr().out


def test_a_non_finite_model_in_the_state_dir_is_never_published(embedded_broker, tmp_path, capsys):
    """The guard before signing: a resumed checkpoint holding NaN stops the service with one line, unpublished."""
    import torch

    from aggregator.cli import main
    from aggregator.state import StateDir
    from model_zoo.backbones import build_backbone
    from model_zoo.checkpoint import shared_tensors, spec_of

    backbone = build_backbone(embedding_size=8)
    with torch.no_grad():
        next(backbone.parameters()).fill_(float("nan"))
    StateDir(tmp_path / "state").save_round(1, shared_tensors(backbone), spec_of(backbone), {"model_version": 1}, {"round": 1})
    (tmp_path / "aggregator.yaml").write_text(f"state_dir: state\nbroker: {embedded_broker}\nrounds: 2\n"
                                              "model: {embedding_size: 8}\n")
    received = []
    watcher = MqttLink(embedded_broker, "test-watcher", lambda t, p: received.append(t), ["facefed/#"])
    watcher.connect()
    try:
        assert main(["serve", "--config", str(tmp_path / "aggregator.yaml")]) == 1
        # Once our own sentinel is back, anything the aggregator published before it would be too.
        watcher.publish("facefed/sentinel", b"after")
        deadline = time.monotonic() + 10
        while "facefed/sentinel" not in received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("facefed-aggregator: refusing to sign and publish global model v1:") and "NaN" in err
    assert "\n" not in err and "Traceback" not in err
    assert received == ["facefed/sentinel"]  # nothing of the aggregator's reached the broker
