"""The in-process federation: the round engine with the devices' own LocalTrainers, no broker."""

import numpy as np
import torch
from safetensors.torch import load_file

from aggregator.config import AggregatorConfig
from aggregator.models import train_settings
from edge_agent.trainer import LocalTrainer
from facefed.inprocess import Device, run_inprocess
from fedwire.config import parse_config
from fedwire.dp import secure_generator
from model_zoo.checkpoint import load_checkpoint, shared_tensors
from model_zoo.data import FaceDataset
from model_zoo.losses import ArcFaceHead


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


def _alone_config(state_dir, rounds: int):
    return parse_config(AggregatorConfig, {
        "state_dir": str(state_dir), "rounds": rounds, "min_clients": 1, "model": {"embedding_size": 8},
        "train": {"local_epochs": 1, "lr": 0.05}})


def test_a_lone_device_through_the_engine_trains_as_it_would_alone(tmp_path):
    """The experiment's centralized and local arms: FedAvg over one device adds nothing to its training."""
    config = _alone_config(tmp_path / "aggregator", rounds=2)
    engine = run_inprocess(config, [Device("dev", LocalTrainer(_faces(3), tmp_path / "dev", 4, True, 7))])
    federated, _ = load_checkpoint(engine.state.checkpoint_path(2))

    trainer, settings = LocalTrainer(_faces(3), tmp_path / "alone", 4, True, 7), train_settings(config)
    tensors = shared_tensors(load_checkpoint(engine.state.checkpoint_path(0))[0])
    for round_number in (1, 2):
        tensors = trainer.train_round(round_number, tensors, settings).tensors
    assert tensors.keys() == shared_tensors(federated).keys()
    assert all(np.array_equal(tensors[k], v) for k, v in shared_tensors(federated).items())


def test_a_trainers_fresh_head_ignores_torchs_global_generator(tmp_path):
    """Trainers side by side in one process (parallel experiment arms) cannot shift each other's heads, and the
    head is the one a device seeded torch for before (the federated figures stand)."""
    settings = train_settings(_alone_config(tmp_path / "aggregator", rounds=1))
    heads = []
    for k, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        trainer = LocalTrainer(_faces(3), tmp_path / f"dev-{k}", 4, False, 7)
        trainer.prepare(settings)
        heads.append(load_file(str(trainer.head_path))["weight"])
    torch.manual_seed(7)
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], ArcFaceHead(8, 2).weight.detach())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    head = ArcFaceHead(8, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(head.weight.detach(), heads[0]) and torch.equal(torch.rand(3), expected)  # global untouched


def test_the_driver_samples_among_its_devices_and_a_seeded_dp_generator_repeats_its_noise(tmp_path):
    def run(name: str, noise_seed: int):
        config = parse_config(AggregatorConfig, {
            "state_dir": str(tmp_path / name / "aggregator"), "rounds": 1, "min_clients": 1, "fraction_fit": 0.5,
            "model": {"embedding_size": 8}, "train": {"local_epochs": 1, "lr": 0.05},
            "dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-3}})
        devices = [Device(f"dev-{k}", LocalTrainer(_faces(k), tmp_path / name / f"dev-{k}", 4, False, k))
                   for k in range(2)]
        engine = run_inprocess(config, devices, dp_rng=secure_generator(noise_seed))
        return engine, shared_tensors(load_checkpoint(engine.state.checkpoint_path(1))[0])

    engine, first = run("a", 5)
    (announced,) = engine.publisher.announcements
    assert len(announced.participants) == 1 and engine.publisher.summaries[0].clients == announced.participants
    _, again = run("b", 5)
    _, other = run("c", 6)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_a_device_that_unloads_after_each_turn_trains_exactly_as_one_that_keeps_its_backbone(tmp_path):
    """bench/dp_utility.py's fleet of 1,000 frees every backbone after its turn; its figures must not move."""
    finals = []
    for unload in (False, True):
        home = tmp_path / str(unload)
        devices = [Device(f"dev-{k}", LocalTrainer(_faces(k), home / f"dev-{k}", 4, True, k), unload=unload)
                   for k in range(2)]
        config = parse_config(AggregatorConfig, {
            "state_dir": str(home / "aggregator"), "rounds": 2, "min_clients": 2, "model": {"embedding_size": 8},
            "train": {"local_epochs": 1, "lr": 0.05}})
        engine = run_inprocess(config, devices)
        assert all((d.trainer._backbone is None) == unload for d in devices)
        assert all(len(d.update_norms) == 2 and all(n > 0 for n in d.update_norms) for d in devices)
        finals.append(shared_tensors(load_checkpoint(engine.state.checkpoint_path(2))[0]))
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])
