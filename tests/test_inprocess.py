"""The in-process federation: the round engine with the devices' own LocalTrainers, no broker."""

import numpy as np

from aggregator.config import AggregatorConfig
from edge_agent.trainer import LocalTrainer
from facefed.inprocess import Device, run_inprocess
from fedwire.config import parse_config
from model_zoo.checkpoint import load_checkpoint
from model_zoo.data import FaceDataset


def _faces(seed: int) -> FaceDataset:
    images = np.random.default_rng(seed).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    return FaceDataset(images, np.array([0, 0, 1, 1]), [f"p{seed}a", f"p{seed}b"])


def _nan_everywhere(ann, update, global_tensors):
    return {name: np.full_like(value, np.nan) for name, value in update.items()}


def test_devices_train_through_the_engine_and_a_bad_update_is_left_out(tmp_path):
    config = parse_config(AggregatorConfig, {
        "state_dir": str(tmp_path / "aggregator"), "rounds": 1, "min_clients": 3, "model": {"embedding_size": 8},
        "train": {"local_epochs": 1, "lr": 0.05}, "bn_statistics": "measured"})
    devices = [Device(f"dev-{k}", LocalTrainer(_faces(k), tmp_path / f"dev-{k}", 4, False, k)) for k in range(2)]
    devices.append(Device("liar", LocalTrainer(_faces(9), tmp_path / "liar", 4, False, 9), tamper=_nan_everywhere))
    engine = run_inprocess(config, devices)

    assert engine.done and engine.model_version == 1
    assert [s.clients for s in engine.publisher.summaries] == [["dev-0", "dev-1"]]
    log = engine.state.read_log()
    assert [e["round"] for e in log] == [0, 1] and log[1]["rejected"] == 1
    assert log[1]["bytes_up"] == sum(sum(d.upload_bytes) for d in devices)  # both phases, as the wire would carry
    # The statistics phase ran too, measured by the same trainers on the averaged weights.
    assert [a.state for a in engine.publisher.announcements] == ["open", "statistics"]
    _, meta = load_checkpoint(engine.state.checkpoint_path(1))  # what an agent loads
    assert meta["round"] == 1 and (tmp_path / "dev-0" / "head.safetensors").exists()
