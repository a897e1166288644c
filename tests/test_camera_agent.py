"""train.method camera in production: the aggregator service and edge agents, configured from YAML as an operator
would, over a real MQTT broker (face-api weights and celeb-dev needed)."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator.config import AggregatorConfig
from edge_agent.cli import _trainer
from edge_agent.config import load_agent_config
from edge_agent.unlock.analyzer import load_model
from edge_agent.unlock.reembed import global_model_path
from edge_agent.unlock.store import Enrolment, TemplateStore
from facefed.inprocess import Device
from facefed.over_broker import run_over_broker
from fedwire.config import ConfigError, parse_config
from model_zoo.backbones import FaceApiResNet
from model_zoo.camera import DOMAINS, capture_frames
from model_zoo.checkpoint import load_checkpoint, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, save_folders, shared_dataset_dir
from model_zoo.faceapi import default_models_dir

CELEB = shared_dataset_dir("celeb-dev")
pytestmark = pytest.mark.skipif(CELEB is None or not default_models_dir().is_dir(),
                                reason="needs ../shared/datasets/celeb-dev and the face-api weights")

CAMERA_MODEL = {"arch": "faceapi-resnet", "options": {"trainable": "all", "shared": "scale_shift", "personal": "last"}}


def _aggregator_config(state_dir: Path, **overrides) -> AggregatorConfig:
    raw = {"state_dir": str(state_dir), "rounds": 2, "min_clients": 2, "round_timeout_s": 600,
           "model": CAMERA_MODEL, "train": {"method": "camera", "camera": {"steps": 2, "batch": 2}}, **overrides}
    return parse_config(AggregatorConfig, yaml.safe_load(yaml.safe_dump(raw)))


def _device(home: Path, owner: str, photos: np.ndarray, bank: Path, rng, camera: str = "corridor"
            ) -> tuple[Path, np.ndarray]:
    """A device's home as an operator sets it up: the owner enrolled for unlock (templates of version 0), camera
    frames of the owner in data/<owner>/, agent.yaml with a camera_training section. Returns (agent.yaml,
    the enrolled chips)."""
    chips, frames = photos[:3], capture_frames(photos[3:9], DOMAINS["corridor"], rng)
    save_folders(FaceDataset(frames, np.zeros(len(frames), int), [owner]), home / "data")
    embedder, ref = load_model(None)
    TemplateStore(home / "state" / "unlock").save(Enrolment(owner, chips, embedder.embed(chips), ref))
    path = home / "agent.yaml"
    path.write_text(yaml.safe_dump({"device_id": home.name, "data": "data", "state_dir": "state",
                                    "camera_training": {"bank": str(bank), "camera": camera, "bank_per_identity": 2}}))
    return path, chips


def test_camera_method_federates_the_shared_part_and_each_device_unlocks_on_its_own_model(tmp_path):
    celeb = load_dataset(CELEB)
    people = [np.flatnonzero(celeb.labels == k)[:9] for k in range(6)]
    save_folders(celeb.subset(np.concatenate([p[:2] for p in people[2:]])), tmp_path / "bank")
    rng = np.random.default_rng(0)
    # door-0 is told its camera's domain; door-1 measures its camera on its frames and enrolment.
    homes = {f"door-{k}": _device(tmp_path / "fleet" / f"door-{k}", celeb.identities[k], celeb.images[people[k]],
                                  tmp_path / "bank", rng, camera) for k, camera in enumerate(["corridor", "measured"])}
    devices = [Device(device_id, _trainer(load_agent_config(path))) for device_id, (path, _) in homes.items()]
    config = _aggregator_config(tmp_path / "aggregator")

    engine = run_over_broker(config, devices, None, tmp_path / "fleet")
    told, measured = (device.trainer.data.device.camera for device in devices)
    assert told == DOMAINS["corridor"]
    assert measured.grey and abs(measured.face_px - 28) <= 4 and measured != told  # from 6 frames of the owner

    # What travels is the shared part alone: face-api's per-channel scales and shifts outside the personal stage.
    shared_names, personal_names = FaceApiResNet(trainable="all", shared="scale_shift", personal="last").parts()
    assert sorted(engine.global_tensors) == sorted(shared_names)
    assert sum(t.size for t in engine.global_tensors.values()) == 6080
    rounds = engine.state.read_log()
    assert [r["clients"] for r in rounds[1:]] == [2, 2]
    assert all(r["bytes_up"] / r["clients"] < 2 * 4 * 6080 for r in rounds[1:])
    # The global checkpoints load as they are (the rest of the net from the pretrained weights on this machine).
    first, _ = load_checkpoint(engine.state.root / "checkpoints" / "round-0000.safetensors")
    final, _ = load_checkpoint(engine.state.root / "checkpoints" / "round-0002.safetensors")
    assert isinstance(final, FaceApiResNet) and final.shared == "scale_shift"
    assert any(not np.array_equal(a, shared_tensors(final)[n]) for n, a in shared_tensors(first).items())

    for device_id, (path, chips) in homes.items():
        state = path.parent / "state"
        personal = state / "camera_personal.safetensors"
        assert personal.exists() and oct(personal.stat().st_mode & 0o777) == "0o600"
        # Unlock re-embedded the owner with this device's own model: the global shared part and its personal part.
        enrolment = TemplateStore(state / "unlock").load_all()[0]
        assert enrolment.model_version == 2
        own, _ = load_checkpoint(global_model_path(state / "unlock", 2))
        assert own.arch_kwargs.get("shared", "tail") == "tail"  # a whole net: unlock and export take it as is
        own_tail = dict(own.tail.named_parameters(prefix="tail"))
        global_tail = dict(final.tail.named_parameters(prefix="tail"))
        assert all(np.array_equal(own_tail[n].detach().numpy(), engine.global_tensors[n]) for n in shared_names)
        assert any(not np.array_equal(own_tail[n].detach().numpy(), global_tail[n].detach().numpy())
                   for n in personal_names)
        assert np.allclose(enrolment.embeddings, load_model(global_model_path(state / "unlock", 2))[0].embed(chips),
                           atol=1e-5)


def test_camera_method_is_refused_at_start_with_a_model_that_cannot_take_it(tmp_path):
    with pytest.raises(ConfigError, match="train.method"):
        _aggregator_config(tmp_path, model={"arch": "faceapi-resnet", "options": {"trainable": "last"}})
    with pytest.raises(ConfigError, match="bn_statistics"):
        _aggregator_config(tmp_path, bn_statistics="measured")
    with pytest.raises(ConfigError, match="camera.steps"):
        _aggregator_config(tmp_path, train={"method": "camera", "camera": {"steps": 0}})


def test_agent_config_for_camera_training_fails_at_start_with_the_field(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "agent.yaml"
    for section, field in [({"bank": "nowhere"}, "camera_training.bank"),
                           ({"bank": ".", "camera": "corridor,face_px=abc"}, "camera_training.camera")]:
        path.write_text(yaml.safe_dump({"device_id": "door-0", "data": "data", "state_dir": "state",
                                        "camera_training": section}))
        with pytest.raises(ConfigError, match=field):
            load_agent_config(path)


def test_a_device_without_frames_yet_skips_rounds_until_unlock_has_kept_some(tmp_path):
    from aggregator.models import train_settings
    from edge_agent.trainer import CannotTrain
    from model_zoo.backbones import build_backbone

    celeb = load_dataset(CELEB)
    save_folders(celeb.subset(np.flatnonzero(celeb.labels == 3)[:2]), tmp_path / "bank")
    photos = celeb.images[celeb.labels == 0][:9]
    home = tmp_path / "door-0"
    path, _ = _device(home, celeb.identities[0], photos, tmp_path / "bank", np.random.default_rng(0))
    frames = home / "data"
    frames.rename(home / "later")  # a freshly flashed device: enrolled, no unlock yet
    trainer = _trainer(load_agent_config(path))  # the config loads: its frames folder may not exist yet
    settings = train_settings(_aggregator_config(tmp_path / "aggregator", train={"method": "camera", "camera": {
        "steps": 1, "batch": 2}}))
    initial = shared_tensors(build_backbone("faceapi-resnet", **CAMERA_MODEL["options"]))
    with pytest.raises(CannotTrain, match="nothing to adapt on yet"):
        trainer.train_round(1, initial, settings)
    assert trainer.num_samples == 0
    (home / "later").rename(frames)  # unlock has kept frames since: the next round reads them
    result = trainer.train_round(2, initial, settings)
    assert trainer.num_samples == result.result.num_samples == 6
    assert sorted(result.tensors) == sorted(initial)
