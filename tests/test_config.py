from pathlib import Path

import pytest
import yaml

from aggregator.config import load_aggregator_config
from edge_agent.config import load_agent_config
from fedwire.config import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_aggregator_defaults_and_relative_paths(tmp_path):
    cfg = load_aggregator_config(_write(tmp_path / "a.yaml", {"state_dir": "state", "rounds": 3}))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.rounds == 3 and cfg.min_clients == 2 and cfg.max_chunk_bytes == 256 * 1024
    assert cfg.model.act == "relu"


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"rounds": 0}, "rounds", ">= 1"),
        ({"rounds": "ten"}, "rounds", "expected an integer"),
        ({"min_clients": True}, "min_clients", "expected an integer"),
        ({"broker": "http://x:1"}, "broker", ""),
        ({"topic_prefix": "a/#"}, "topic_prefix", "wildcards"),
        ({"model": {"act": "tanh"}}, "model.act", "one of"),
        ({"train": {"lr": -1}}, "train.lr", "(0, 10]"),
        ({"train": {"l2sp_alpha": -1}}, "train.l2sp_alpha", "[0, 1e5]"),
        ({"download_codec": "gzip"}, "download_codec", "one of"),
        ({"bn_statistics": "pooled"}, "bn_statistics", "one of"),
        ({"bn_statistics": "measured", "shard_workers": 2, "broker": "mqtt://127.0.0.1:1883"}, "bn_statistics",
         "shard_workers: 1"),
        ({"eval": {"data": "missing-dir"}}, "eval.data", "no such directory"),
        ({"colour": "blue"}, "colour", "unknown field"),
    ],
)
def test_bad_aggregator_config_names_field_and_reason(tmp_path, data, field, reason):
    path = _write(tmp_path / "a.yaml", {"state_dir": "s", **data})
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(path)
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(_write(tmp_path / "a.yaml", {"rounds": 2}))
    assert info.value.field == "state_dir"


def test_agent_config_merges_profile_then_device_section(tmp_path):
    (tmp_path / "faces").mkdir()
    path = _write(tmp_path / "agent.yaml", {
        "device_id": "cam-01", "data": "faces", "state_dir": "st", "profile": "rpi4",
        "device": {"threads": 2},
    })
    cfg = load_agent_config(path)
    assert cfg.device.name == "rpi4"
    assert cfg.device.threads == 2  # the config's override
    assert cfg.device.batch_size == 16  # from the rpi4 profile
    assert cfg.data == tmp_path / "faces"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"device_id": "bad id/with+"}, "device_id"),
        ({"profile": "toaster"}, "profile"),
        ({"device": {"batch_size": "big"}}, "device.batch_size"),
        ({"device": {"threads": 0}}, "device.threads"),
        ({"data": "nowhere"}, "data"),
        ({"broker": "mqtt://"}, "broker"),
    ],
)
def test_bad_agent_config_names_the_field(tmp_path, data, field):
    (tmp_path / "faces").mkdir()
    base = {"device_id": "cam-01", "data": "faces", "state_dir": "st"}
    with pytest.raises(ConfigError) as info:
        load_agent_config(_write(tmp_path / "agent.yaml", {**base, **data}))
    assert info.value.field == field


def test_bundled_profiles_are_valid(tmp_path):
    from firmware_configs import profile_names

    (tmp_path / "faces").mkdir()
    assert {"x86-dev", "rpi4"} <= set(profile_names())
    for name in profile_names():
        cfg = load_agent_config(_write(tmp_path / f"{name}.yaml", {
            "device_id": "d1", "data": "faces", "state_dir": "st", "profile": name}))
        assert cfg.device.name == name


def test_a_bad_custom_profile_names_field_and_reason(tmp_path):
    (tmp_path / "faces").mkdir()
    profile = _write(tmp_path / "my-board.yaml", {"name": "my-board", "camera": {"fps": 0},
                                                  "train_window": {"only_when_charging": "yes"}})
    base = {"device_id": "d1", "data": "faces", "state_dir": "st", "profile": str(profile)}
    with pytest.raises(ConfigError) as info:
        load_agent_config(_write(tmp_path / "agent.yaml", base))
    assert info.value.field == "device.camera.fps" and "[1, 240]" in info.value.reason
    profile.write_text("name: my-board\ntrain_window: {only_when_charging: 'yes'}\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(tmp_path / "agent.yaml")
    assert info.value.field == "device.train_window.only_when_charging"
