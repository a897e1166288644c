"""Differential privacy: the math (fedwire/dp.py), the aggregator's wrapper and accounting (aggregator/dp.py),
its config, and a signed federation over a real broker in which devices add their share of the noise."""

from __future__ import annotations

import json
import logging
import threading
import time

import dp_accounting
import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.dp import DpStrategy, epsilon_after
from aggregator.service import AggregatorService
from aggregator.strategies import FedAvg, FedAvgM
from edge_agent.agent import EdgeAgent
from edge_agent.config import load_agent_config
from edge_agent.trainer import LocalTrainer
from fedwire.config import ConfigError, parse_config
from fedwire.dp import (adaptive_delta_multiplier, clip_delta, delta_of, device_noise_std, l2_norm, next_clip,
                        privatize_update, secure_generator, top_up_std)
from fedwire.errors import ProtocolError
from fedwire.messages import DpSettings, RoundAnnouncement, TrainSettings
from fedwire.signing import load_verify_key, verify
from model_zoo.data import FaceDataset
from tests.test_e2e_federation import Recorder
from tests.test_signing import _write_keys


def _dp_config(**dp) -> AggregatorConfig:
    return parse_config(AggregatorConfig, {"state_dir": "/tmp/unused", "dp": {"noise_multiplier": 1.0, **dp}})


def _model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": (scale * rng.normal(size=(8, 3, 3, 3))).astype(np.float32),
            "bn.running_var": np.abs(rng.normal(size=8)).astype(np.float32) + 1,
            "bn.num_batches_tracked": np.array(5, np.int64)}


# ---- accounting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounds, z, q, delta", [(100, 1.0, 0.1, 1e-5), (50, 0.8, 1.0, 1e-3), (1000, 1.2, 0.01, 1e-3)])
def test_epsilon_matches_the_library_for_known_settings(rounds, z, q, delta):
    eps = epsilon_after(rounds, z, q, delta)
    reference = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    reference.compose(event if q < 1 else dp_accounting.GaussianDpEvent(z), rounds)
    assert eps == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    # An independent method (privacy loss distributions) is tighter than RDP, never looser, and close to it.
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event if q < 1 else dp_accounting.GaussianDpEvent(z), rounds)
    assert pld.get_epsilon(delta) <= eps <= 1.5 * pld.get_epsilon(delta)
    assert epsilon_after(0, z, q, delta) == 0.0 and epsilon_after(rounds // 2, z, q, delta) < eps


def test_sampling_amplifies_and_noise_lowers_epsilon():
    assert epsilon_after(20, 1.0, 0.1, 1e-5) < epsilon_after(20, 1.0, 1.0, 1e-5)
    assert epsilon_after(20, 2.0, 1.0, 1e-5) < epsilon_after(20, 1.0, 1.0, 1e-5)


# ---- the math -------------------------------------------------------------------------------------------------------

def test_clipping_bounds_the_norm_exactly_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        delta = {"a": rng.normal(size=(30, 7)) * scale, "b": rng.normal(size=11) * scale}
        clipped, norm = clip_delta(delta, 1.0)
        assert norm == pytest.approx(l2_norm(delta))
        if norm > 1.0:
            assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-12)
            # only scaled, never turned: the direction is kept
            np.testing.assert_allclose(clipped["a"] * norm, delta["a"], rtol=1e-12)
        else:
            np.testing.assert_array_equal(clipped["a"], delta["a"])


def test_device_update_is_clipped_noised_in_float64_and_keeps_wire_dtypes():
    ref, update = _model(0), _model(1, scale=50.0)
    out = privatize_update(update, ref, clip=2.0, std=0.0, rng=secure_generator(0))
    assert l2_norm(delta_of(out, ref)) == pytest.approx(2.0, rel=1e-5)  # float32 rounding of the wire tensors
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in update.items()}
    assert out["bn.num_batches_tracked"] == update["bn.num_batches_tracked"]
    noisy = privatize_update(update, ref, clip=2.0, std=10.0, rng=secure_generator(0))
    assert (noisy["bn.running_var"] >= 0).all()  # floored, or the aggregator would reject the update


def test_noise_has_the_configured_standard_deviation():
    # 10^6 draws: the sample std's standard error is std / sqrt(2 * 10^6) = 0.07 %; the tolerance is 0.5 %.
    rng = secure_generator(1234)
    z, clip, shares = 1.3, 0.7, 16
    share = device_noise_std(clip, z, shares)
    draws = np.stack([rng.normal(0, share, size=250_000) for _ in range(shares)]).sum(axis=0)
    assert draws.std() == pytest.approx(z * clip, rel=0.005)  # the shares add up to the central noise
    assert top_up_std(clip, z, shares, shares) == 0 and top_up_std(clip, z, shares, 0) == pytest.approx(z * clip)

    # The wrapper: k updates that all equal the global model leave only the noise, of std z C / k, in float64.
    k, reference = 4, {"w": np.zeros(1_000_000, np.float32)}
    dp = _dp_config(noise_multiplier=z, clip=clip).dp
    strategy = DpStrategy(FedAvg(), dp, 1.0, rng=secure_generator(7))
    strategy.begin_round(reference)
    for _ in range(k):
        strategy.accumulate(reference, num_samples=1000)
    noise = strategy.aggregate()["w"]
    assert noise.dtype == np.float32 and noise.std() == pytest.approx(z * clip / k, rel=0.005)
    assert abs(noise.mean()) < 5 * z * clip / k / 1000  # unbiased: 5 standard errors


def test_wrapper_weighs_updates_equally_clips_and_hands_the_noised_mean_to_the_inner_strategy():
    ref = {"w": np.zeros(4, np.float32)}
    far, near = {"w": np.array([30.0, 40.0, 0, 0], np.float32)}, {"w": np.array([0, 0, 0.3, 0.4], np.float32)}
    dp = _dp_config(noise_multiplier=1e-9, clip=1.0).dp
    strategy = DpStrategy(FedAvg(), dp, 1.0, rng=secure_generator(0))
    strategy.begin_round(ref)
    strategy.accumulate(far, num_samples=10_000)  # a claimed n_k buys no extra weight
    strategy.accumulate(near, num_samples=1)
    np.testing.assert_allclose(strategy.aggregate()["w"], [0.3, 0.4, 0.15, 0.2], atol=1e-6)
    momentum = DpStrategy(FedAvgM(server_lr=1.0, momentum=0.9), dp, 1.0, rng=secure_generator(0))
    momentum.begin_round(ref)
    momentum.accumulate(near, 1)
    np.testing.assert_allclose(momentum.aggregate()["w"], near["w"], atol=1e-6)
    assert set(momentum.slots) == {"v.w"}  # the server optimizer's state still reaches the checkpoint


def test_adaptive_clipping_tracks_the_target_quantile():
    # Andrew et al.: z_delta = (z^-2 - (2 s)^-2)^(-1/2), and the clip shrinks while most updates pass unclipped.
    assert adaptive_delta_multiplier(1.0, 1.0) == pytest.approx(1 / np.sqrt(0.75))
    with pytest.raises(ValueError):
        adaptive_delta_multiplier(2.0, 1.0)
    rng = secure_generator(0)
    assert next_clip(1.0, 10, 10, 1e-9, 0.5, 0.2, rng)[0] == pytest.approx(np.exp(-0.1))
    assert next_clip(1.0, 0, 10, 1e-9, 0.5, 0.2, rng)[0] == pytest.approx(np.exp(0.1))

    dp = _dp_config(noise_multiplier=0.5, clip=10.0, adaptive={"target_quantile": 0.5, "count_stddev": 1.0}).dp
    strategy = DpStrategy(FedAvg(), dp, 1.0, rng=secure_generator(3))
    norms = np.linspace(0.5, 1.5, 41)  # median 1.0
    for _ in range(60):
        ref = {"w": np.zeros(2, np.float32)}
        strategy.begin_round(ref)
        for n in norms:
            strategy.accumulate({"w": np.array([n, 0], np.float32)}, 1)
        strategy.aggregate()
    assert strategy.clip == pytest.approx(1.0, rel=0.15)
    assert float(strategy.slots["dp.clip"]) == strategy.clip  # saved with the checkpoint, restored after a restart


# ---- config and the wire --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, reason", [
    ({"dp": {"noise_multiplier": 0}}, "dp.noise_multiplier", "must be in (0, 1000]"),
    ({"dp": {"noise_multiplier": 1, "clip": -1}}, "dp.clip", "must be > 0"),
    ({"dp": {"noise_multiplier": 1, "delta": 2}}, "dp.delta", "must be in (0, 1)"),
    ({"dp": {"noise_multiplier": 1, "mode": "local"}}, "dp.mode", "must be one of"),
    ({"dp": {"noise_multiplier": 1, "mode": "distributed", "adaptive": {}}}, "dp.adaptive", "needs mode: central"),
    ({"dp": {"noise_multiplier": 3, "adaptive": {}}}, "dp.adaptive.count_stddev", "must be > noise_multiplier / 2"),
    ({"dp": {"noise_multiplier": 1}, "strategy": "median"}, "dp", "not a mean of the updates"),
    ({"dp": {"noise_multiplier": 1}, "clip_norm": 1.0}, "clip_norm", "dp.clip bounds each update"),
    ({"dp": {"noise_multiplier": 1}, "bn_statistics": "measured"}, "bn_statistics", "without noise"),
])
def test_config_rejects_bad_dp_settings_naming_the_field(fields, field, reason):
    with pytest.raises(ConfigError) as err:
        parse_config(AggregatorConfig, {"state_dir": "/tmp/unused", **fields})
    assert err.value.field == field and reason in err.value.reason


def test_announcement_carries_dp_settings_and_stays_byte_identical_without_them():
    plain = RoundAnnouncement(1, 0, "open", "a" * 32, 100.0, 2, TrainSettings(lr=0.1))
    assert b'"dp"' not in plain.to_json()
    with_dp = RoundAnnouncement(1, 0, "open", "a" * 32, 100.0, 2, TrainSettings(), dp=DpSettings("distributed", 0.5, 1.1, 3))
    assert RoundAnnouncement.from_json(with_dp.to_json()).dp == DpSettings("distributed", 0.5, 1.1, 3)
    bad = json.loads(with_dp.to_json())
    bad["dp"]["mode"] = "local"
    with pytest.raises(ProtocolError, match="dp.mode"):
        RoundAnnouncement.from_dict(bad)


# ---- a signed federation with distributed noise, and the budget stop --------------------------------------------

def test_devices_add_their_noise_share_from_the_signed_announcement_and_the_budget_stops_training(
        embedded_broker, tmp_path, caplog):
    private, public = _write_keys(tmp_path)
    z, clip, delta = 0.9, 0.05, 1e-3
    budget = (epsilon_after(2, z, 1.0, delta) + epsilon_after(3, z, 1.0, delta)) / 2  # room for 2 of 5 rounds
    config = parse_config(AggregatorConfig, {
        "state_dir": str(tmp_path / "aggregator"), "broker": embedded_broker, "rounds": 5, "min_clients": 2,
        "round_timeout_s": 120, "signing_key": str(private), "model": {"embedding_size": 16},
        "train": {"local_epochs": 1, "lr": 0.05},
        "dp": {"mode": "distributed", "noise_multiplier": z, "clip": clip, "delta": delta, "epsilon_budget": budget},
    })
    recorder = Recorder(embedded_broker)
    agents = []
    for k in range(2):
        home = tmp_path / f"dev-{k}"
        (home / "faces").mkdir(parents=True)
        (home / "agent.yaml").write_text(f"device_id: dev-{k}\ndata: faces\nstate_dir: state\nbroker: {embedded_broker}\n"
                                         f"aggregator_key: {public}\nexit_when_finished: true\n")
        agent_config = load_agent_config(home / "agent.yaml")
        images = np.random.default_rng(k).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
        faces = FaceDataset(images, np.array([0, 0, 1, 1]), [f"p{k}a", f"p{k}b"])
        agents.append(EdgeAgent(agent_config, LocalTrainer(faces, agent_config.state_dir, 4, False, k)))
    service = AggregatorService(config)
    threads = [threading.Thread(target=x.run, daemon=True) for x in (service, *agents)]
    with caplog.at_level(logging.WARNING, logger="facefed.aggregator"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    time.sleep(0.3)
    messages = recorder.snapshot()
    recorder.link.close()
    assert not any(t.is_alive() for t in threads), "the federation did not finish"

    rounds = [json.loads(line) for line in (tmp_path / "aggregator" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # stopped by the budget, not by `rounds: 5`
    for r in rounds:
        assert r["epsilon"] == pytest.approx(epsilon_after(r["round"], z, 1.0, delta)) and r["dp_delta"] == delta
    assert rounds[2]["epsilon"] <= budget
    assert any("privacy budget reached" in rec.message and "stopping training" in rec.message for rec in caplog.records)

    verify_key = load_verify_key(public)
    opened = [RoundAnnouncement.from_json(p) for t, p in messages if t == "facefed/round"]
    opened = [a for a in opened if a.state == "open"]
    assert opened and all(a.dp == DpSettings("distributed", clip, z, 2) for a in opened)
    for announcement in opened:
        verify(announcement, verify_key)  # the settings are covered by the aggregator's signature
    assert all(agent.rounds_trained == 2 and not agent.last_refusal for agent in agents)

    # What left each device is its clipped update plus its noise share, never the update in the clear: the
    # distance from the global model is the share's norm (C z / sqrt(2) per coordinate), far beyond the clip.
    global0 = service.state.load_round(0)
    from fedwire.chunking import Reassembler
    from fedwire.messages import TransferManifest
    reassembler = Reassembler()
    uploads = []
    for topic, payload in messages:
        if topic.startswith("facefed/update/dev-0/"):
            done = (reassembler.add_manifest("dev-0", TransferManifest.from_json(payload), time.time())
                    if topic.endswith("manifest") else reassembler.add_chunk("dev-0", payload, time.time()))
            if done is not None and done.manifest.round == 1:
                uploads.append(done.tensors)
    assert uploads
    moved = delta_of(uploads[0], global0)
    coordinates = sum(v.size for v in moved.values())
    expected = device_noise_std(clip, z, 2) * np.sqrt(coordinates)
    assert l2_norm(moved) == pytest.approx(expected, rel=0.05)
    assert l2_norm(moved) > 100 * clip
