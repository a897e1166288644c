"""Issue 14 item 8: the operator path as a new operator walks it (bundle layout, installer, example configs,
corrupted model files)."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
import yaml

from aggregator import pki
from aggregator.cli import main as aggregator_main
from aggregator.config import AggregatorConfig
from edge_agent.cli import main as agent_main
from edge_agent.config import DeviceProfile
from edge_agent.flash import FlashError, FlashRequest, build_bundle
from facefed.cli import main as facefed_main
from fedwire.config import ConfigError, parse_config
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, save_checkpoint
from model_zoo.data import FaceDataset, save_folders


@pytest.fixture
def fleet_pki(tmp_path):
    folder = tmp_path / "pki"
    pki.init_ca(folder)
    pki.issue_aggregator_identity(folder)
    pki.issue_device_cert(folder, "cam-01")
    return folder


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_flash_to_a_folder_and_to_a_tarball_give_the_same_layout_and_a_pinned_torch(fleet_pki, tmp_path):
    wheel = tmp_path / "facefed_edge-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")  # never installed here: the layout is what is checked
    folder = build_bundle(FlashRequest("rpi4", "cam-01", "mqtts://broker.lan:8883", fleet_pki, tmp_path / "out",
                                       wheel=wheel))
    assert folder == tmp_path / "out" / "facefed-cam-01"
    archive = build_bundle(FlashRequest("rpi4", "cam-01", "mqtts://broker.lan:8883", fleet_pki,
                                        tmp_path / "cam-01.tar.gz", wheel=wheel))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert _files(folder) == _files(tmp_path / "unpacked" / "facefed-cam-01")
    assert {"agent.yaml", "install.sh", "tls/device.key", "keys/aggregator-signing.pub"} <= _files(folder)
    script = (folder / "install.sh").read_text()
    assert 'TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"' in script
    assert "--exit-when-finished" in script and "--no-systemd" in script
    termux = build_bundle(FlashRequest("android-termux", "cam-01", "mqtts://b:8883", fleet_pki, tmp_path / "t",
                                       wheel=wheel))
    assert 'TORCH="system"' in (termux / "install.sh").read_text()
    with pytest.raises(FlashError, match="not empty"):  # never over an existing bundle
        build_bundle(FlashRequest("rpi4", "cam-01", "mqtts://b:8883", fleet_pki, tmp_path / "out", wheel=wheel))


def test_a_profile_torch_choice_is_validated():
    profile = {"name": "p", "torch": "torch==2.13.0; rm -rf /"}
    with pytest.raises(ConfigError, match="torch: must not hold shell metacharacters"):
        parse_config(DeviceProfile, profile)
    with pytest.raises(ConfigError, match="torch: must be pip arguments"):
        parse_config(DeviceProfile, {"name": "p", "torch": "numpy"})


def test_example_configs_show_the_fleet_fields(capsys):
    assert aggregator_main(["example-config"]) == 0
    aggregator = yaml.safe_load(capsys.readouterr().out)
    assert {"eval", "tls", "signing_key"} <= set(aggregator) and set(aggregator["eval"]) == {"data", "every"}
    assert agent_main(["example-config"]) == 0
    agent = yaml.safe_load(capsys.readouterr().out)
    assert {"tls", "aggregator_key", "exit_when_finished", "max_clock_skew_s"} <= set(agent)


def test_a_truncated_or_corrupted_checkpoint_gives_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, build_backbone("mobilefacenet"), {})
    data = good.read_bytes()
    truncated, garbled = tmp_path / "truncated.safetensors", tmp_path / "garbled.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbled.write_bytes(b"\xff" * 64 + data[64:])
    faces = tmp_path / "faces"
    save_folders(FaceDataset(np.zeros((4, 112, 112, 3), np.uint8), np.array([0, 0, 1, 1]), ["a", "b"]), faces)
    for bad in (truncated, garbled):
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            load_checkpoint(bad)
        assert facefed_main(["evaluate", "--model", str(bad), "--data", str(faces)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and bad.name in err
        with pytest.raises(ConfigError, match="init_checkpoint: .*not a readable checkpoint"):
            parse_config(AggregatorConfig, {"state_dir": str(tmp_path / "s"), "model": {"init_checkpoint": str(bad)}})
    exported = tmp_path / "model.onnx"  # an export whose sidecar was cut short
    exported.write_bytes(b"onnx bytes")
    exported.with_suffix(".json").write_text('{"format": "facefed-ex')
    assert facefed_main(["evaluate", "--model", str(exported), "--data", str(faces)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.json: not a usable sidecar" in err


def test_a_truncated_checkpoint_in_the_state_dir_stops_serve_with_one_line(tmp_path, capsys):
    state = tmp_path / "state"
    (state / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    checkpoint = state / "checkpoints" / "round-0001.safetensors"
    save_checkpoint(checkpoint, build_backbone("mobilefacenet"), {})
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # what a full disk or a power cut leaves
    config = tmp_path / "aggregator.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "embedded_port": 0}))
    assert aggregator_main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "round-0001.safetensors" in err and "Traceback" not in err
