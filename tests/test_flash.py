"""A flashed bundle, installed into a temporary root, joins a hardened broker and completes a signed round."""

import json
import os
import stat
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml

from edge_agent.flash import FlashError, FlashRequest, build_bundle
from fedwire import pki_layout
from model_zoo.data import load_dataset, save_folders, shared_dataset_dir

pytestmark = pytest.mark.e2e


def test_bundle_refuses_an_unprovisioned_device(hardened_broker, tmp_path):
    with pytest.raises(FlashError, match="provision cam-z"):
        build_bundle(FlashRequest("rpi4", "cam-z", hardened_broker.url, hardened_broker.pki, tmp_path / "b"))


def test_flashed_device_installs_and_trains_a_signed_round(hardened_broker, tmp_path):
    orl = shared_dataset_dir("orl")
    if orl is None:
        pytest.skip("ORL dataset not found (set FACEFED_DATA_ROOT)")
    bundle = build_bundle(FlashRequest("x86-dev", "cam-a", hardened_broker.url, hardened_broker.pki,
                                       tmp_path / "cam-a.tar.gz"))
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        key_mode = tar.getmember("facefed-cam-a/tls/device.key").mode
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert "facefed-cam-a/keys/aggregator-signing.pub" in names and "facefed-cam-a/install.sh" in names
    assert stat.S_IMODE(key_mode) == 0o600
    assert not any(name.endswith("ca.key") or "signing.key" in name for name in names)  # no fleet secrets

    prefix = tmp_path / "root" / "opt" / "facefed"
    env = {**os.environ, "FACEFED_VENV_SYSTEM_SITE": "1", "PIP_NO_INDEX": "1"}
    subprocess.run(["sh", str(tmp_path / "unpacked" / "facefed-cam-a" / "install.sh"), f"--prefix={prefix}",
                    "--no-systemd"], check=True, env=env, timeout=300)
    assert (prefix / "venv" / "bin" / "facefed-agent").exists()
    faces = load_dataset(orl)
    save_folders(faces.subset(np.flatnonzero(faces.labels < 3)), prefix / "faces")

    layout = pki_layout.aggregator_files(hardened_broker.pki)
    aggregator_yaml = tmp_path / "aggregator.yaml"
    aggregator_yaml.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "broker": hardened_broker.url, "rounds": 1, "min_clients": 1,
        "round_timeout_s": 240, "signing_key": str(layout.signing_key),
        "tls": {"ca_cert": str(pki_layout.ca_files(hardened_broker.pki).cert),
                "certfile": str(layout.client.cert), "keyfile": str(layout.client.key)},
        "train": {"local_epochs": 1},
    }))
    aggregator = subprocess.Popen([sys.executable, "-m", "aggregator", "serve", "--config", str(aggregator_yaml)],
                                  stdout=(tmp_path / "aggregator.log").open("w"), stderr=subprocess.STDOUT)
    try:
        agent = subprocess.run([str(prefix / "venv" / "bin" / "facefed-agent"), "run", "--config",
                                str(prefix / "agent.yaml"), "--exit-when-finished"],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert agent.returncode == 0, agent.stdout[-2000:] + agent.stderr[-3000:]
        assert aggregator.wait(timeout=60) == 0
    finally:
        if aggregator.poll() is None:
            aggregator.kill()
    rounds = [json.loads(line) for line in (tmp_path / "state" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["round"] == 1 and rounds[-1]["client_ids"] == ["cam-a"]
    assert "refused" not in agent.stderr  # every model it loaded was signed by the aggregator
    assert (prefix / "state" / "head.safetensors").exists()


def test_a_camera_bundle_ships_the_bank_and_trains_on_the_frames_unlock_keeps(hardened_broker, tmp_path):
    from edge_agent.config import load_agent_config

    bank = tmp_path / "bank" / "person-a"
    bank.mkdir(parents=True)
    (bank / "0.png").write_bytes(b"not checked here")
    wheel = tmp_path / "facefed_edge-0.0.0-py3-none-any.whl"
    wheel.write_bytes(b"stands in for the wheel")
    root = build_bundle(FlashRequest("rpi4", "cam-a", hardened_broker.url, hardened_broker.pki, tmp_path / "out",
                                     wheel=wheel, camera_bank=tmp_path / "bank", camera="door-night,face_px=32",
                                     keep_frames=50))
    assert (root / "bank" / "person-a" / "0.png").is_file()
    config = load_agent_config(root / "agent.yaml")  # validates: the frames folder need not exist yet
    assert config.camera_training.bank == root / "bank" and config.camera_training.camera == "door-night,face_px=32"
    assert config.unlock.keep_frames == 50
    assert config.data == config.unlock.frames_dir(config.unlock.store_dir(config.state_dir))
    with pytest.raises(FlashError, match="--camera"):
        build_bundle(FlashRequest("rpi4", "cam-a", hardened_broker.url, hardened_broker.pki, tmp_path / "bad",
                                  wheel=wheel, camera_bank=tmp_path / "bank", camera="corridor,jpeg=500"))
