"""The pretrained face-api ResNet as a federated backbone: frozen trunk, trainable tail, tail-only payloads."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from test_e2e_federation import Recorder

import facefed.cli
from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.models import train_settings
from facefed.simulate import SimulationConfig, run_simulation
from fedwire.chunking import Reassembler
from fedwire.config import ConfigError
from fedwire.messages import TrainSettings, TransferManifest
from fedwire.topics import Topics
from model_zoo.backbones import FaceApiResNet, build_backbone
from model_zoo.backbones.faceapi_resnet import STAGES
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors, save_checkpoint, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, save_folders, shared_dataset_dir
from model_zoo.faceapi import default_models_dir
from model_zoo.faceapi.loader import RECOGNITION_MANIFEST
from model_zoo.losses import ArcFaceHead
from model_zoo.metrics import normalize_rows
from model_zoo.pipeline import FacePipeline
from model_zoo.train import TrainConfig, TrunkFeatureCache, embed_images, imprint_head, train_local

CELEB = shared_dataset_dir("celeb-dev")
needs_shared = pytest.mark.skipif(
    CELEB is None or not (default_models_dir() / RECOGNITION_MANIFEST).is_file(),
    reason=f"needs ../shared/datasets/celeb-dev and face-api weights in {default_models_dir()} (FACEFED_FACEAPI_DIR)",
)


@pytest.fixture(scope="module")
def celeb_small() -> FaceDataset:
    """6 identities x 6 ArcFace-aligned 112x112 crops (first files of each folder)."""
    dataset = load_dataset(CELEB, layout="folders")
    return dataset.subset(np.flatnonzero(dataset.labels < 6)).first_per_identity(6)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- no shared data ---

def test_imprint_head_puts_class_centres_on_normalised_centroids() -> None:
    head = ArcFaceHead(4, 3)
    untouched = head.weight[2].detach().clone()
    embeddings = np.array([[1, 0, 0, 0], [3, 1, 0, 0], [0, 0, 2, 0]], dtype=np.float32)

    imprint_head(head, embeddings, np.array([0, 0, 1]))

    # Samples are normalised before averaging: [1,0,0,0] and [3,1,0,0]/sqrt(10).
    centroid = torch.tensor([1 + 3 / 10 ** 0.5, 1 / 10 ** 0.5, 0, 0])
    torch.testing.assert_close(head.weight[0].detach(), centroid / centroid.norm())
    torch.testing.assert_close(head.weight[1].detach(), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(head.weight[2].detach(), untouched)  # no samples: left as initialised


def test_simulate_picks_fine_tuning_defaults_per_model_and_rejects_stray_flags(tmp_path, capsys) -> None:
    parser = facefed.cli.build_parser()
    pretrained = parser.parse_args(["simulate", "--model", "faceapi-resnet", "--lr", "0.001"])
    scratch = parser.parse_args(["simulate"])

    assert facefed.cli._training_settings(pretrained) == {"local_epochs": 1, "lr": 0.001, "margin": 0.0}
    assert facefed.cli._training_settings(scratch) == {"local_epochs": 2, "lr": 0.05, "margin": 0.5}
    assert facefed.cli.main(["simulate", "--data", str(tmp_path), "--trainable", "last2"]) == 2
    assert "faceapi-resnet only" in capsys.readouterr().err



def test_device_carries_announced_l2sp_alpha_and_anchors_to_model_version_0(tmp_path, monkeypatch) -> None:
    """Round 1 trains from version 0: the device keeps it and pulls towards it in later rounds."""
    import edge_agent.trainer as trainer_mod
    from model_zoo.train import TrainResult

    calls = []

    def fake_train_local(backbone, head, dataset, cfg, progress=False, trunk_cache=None, l2sp_reference=None):
        calls.append((cfg, l2sp_reference))
        return TrainResult(loss=0.0, accuracy=1.0, num_samples=len(dataset), seconds=0.0, epochs=cfg.epochs)

    monkeypatch.setattr(trainer_mod, "train_local", fake_train_local)
    rng = np.random.default_rng(0)
    data = FaceDataset(rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8), np.array([0, 1, 0, 1]), ["a", "b"])
    trainer = trainer_mod.LocalTrainer(data, tmp_path / "state", 2, False, 0)
    spec = {"arch": "mobilefacenet", "act": "relu", "embedding_size": 128}
    torch.manual_seed(0)
    version0 = shared_tensors(build_backbone("mobilefacenet"))
    later = {k: v + 1.0 for k, v in version0.items()}

    trainer.train_round(1, version0, TrainSettings(lr=0.01, model=spec))  # L2-SP off: nothing kept, no reference
    assert calls[-1][0].l2sp_alpha == 0.0 and calls[-1][1] is None
    assert not trainer.version0_path.exists()
    trainer.train_round(1, version0, TrainSettings(lr=0.01, l2sp_alpha=0.5, model=spec))
    assert calls[-1][0].l2sp_alpha == 0.5 and trainer.version0_path.exists()
    trainer.train_round(3, later, TrainSettings(lr=0.01, l2sp_alpha=0.5, model=spec))
    reference = calls[-1][1]
    assert set(reference) == set(version0)
    assert all(np.array_equal(reference[k], version0[k]) for k in version0)  # version 0, not the round's model

    # A device that never saw round 1 and has no pretrained weights falls back to the round's global model.
    fresh = trainer_mod.LocalTrainer(data, tmp_path / "fresh", 2, False, 0)
    fresh.train_round(3, later, TrainSettings(l2sp_alpha=0.5, model=spec))
    assert calls[-1][1] is later


# --- the pretrained backbone ---

@needs_shared
@pytest.mark.parametrize("trainable, trained_stages",
                         [("projection", 0), ("last", 1), ("last2", 2), ("all", len(STAGES))])
def test_trunk_is_frozen_and_tail_holds_the_trainable_stages(trainable: str, trained_stages: int) -> None:
    net = build_backbone("faceapi-resnet", trainable=trainable)
    net.train()

    assert all(not p.requires_grad for p in net.trunk.parameters())
    assert all(p.requires_grad for p in net.tail.parameters())
    assert not any(m.training for m in net.trunk.modules()) and net.tail.training
    tail_blocks = [name for name, _ in net.tail.named_children()]
    assert tail_blocks == [*(n for stage in STAGES[len(STAGES) - trained_stages:] for n in stage), "projection"]
    assert (trainable == "all") == (not any(True for _ in net.trunk.parameters()))


@needs_shared
def test_only_tail_tensors_are_shared_and_checkpoints_round_trip(celeb_small: FaceDataset, tmp_path) -> None:
    net = build_backbone("faceapi-resnet", trainable="last")
    tensors = shared_tensors(net)

    assert sorted(tensors) == sorted(f"tail.{k}" for k in net.tail.state_dict())
    assert sum(v.size for v in tensors.values()) == sum(p.numel() for p in net.tail.parameters())
    with pytest.raises(ValueError, match="unexpected"):
        load_shared_tensors(net, {**tensors, "trunk.stem.conv.conv.weight": np.zeros((32, 3, 7, 7), np.float32)})

    # A changed tail survives the checkpoint; the trunk comes back from the pretrained weights.
    with torch.no_grad():
        net.tail.projection.fc.weight.mul_(0.5).add_(0.01)
    save_checkpoint(tmp_path / "ckpt.safetensors", net, {"round": 1})
    loaded, meta = load_checkpoint(tmp_path / "ckpt.safetensors")
    assert isinstance(loaded, FaceApiResNet) and meta == {"round": 1}
    assert loaded.arch_kwargs == {"trainable": "last", "weights_dir": None}  # no machine path recorded
    images = celeb_small.images[:4]
    np.testing.assert_array_equal(embed_images(loaded, images), embed_images(net, images))


@needs_shared
def test_embeddings_equal_the_pipelines_reframed_route(celeb_small: FaceDataset) -> None:
    images = celeb_small.images[::3]
    pipeline = normalize_rows(FacePipeline().embed_aligned_crops(images))

    ours = embed_images(build_backbone("faceapi-resnet"), images)

    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # cv2 rounds its warp to uint8 and interpolates in fixed point; the module keeps floats.
    assert (1.0 - (ours * pipeline).sum(axis=1)).max() < 1e-3


@needs_shared
def test_cached_feature_training_lowers_the_loss_and_never_touches_the_trunk(celeb_small: FaceDataset) -> None:
    data = celeb_small.subset(np.flatnonzero(celeb_small.labels < 3))
    cfg = TrainConfig(batch_size=8, lr=0.01, seed=0)
    losses = []
    for epochs in (1, 4):  # same start and seed: the first epoch is the same in both runs
        net = build_backbone("faceapi-resnet", trainable="last")
        trunk_before, tail_before = _state(net.trunk), _state(net.tail)
        torch.manual_seed(0)
        head = ArcFaceHead(128, data.num_classes)
        cache = TrunkFeatureCache()
        result = train_local(net, head, data, dataclasses.replace(cfg, epochs=epochs), trunk_cache=cache)
        losses.append(result.loss)
        assert result.trunk_seconds > 0
        assert all(torch.equal(v, net.trunk.state_dict()[k]) for k, v in trunk_before.items())
        assert any(not torch.equal(v, net.tail.state_dict()[k]) for k, v in tail_before.items())
    assert losses[1] < 0.8 * losses[0]

    # The cache serves the next round: no trunk pass; a different image array is recomputed.
    again = train_local(net, head, data, cfg, trunk_cache=cache)
    assert again.trunk_seconds == 0.0
    assert train_local(net, head, data.subset(np.arange(len(data))), cfg, trunk_cache=cache).trunk_seconds > 0


@needs_shared
def test_aggregator_config_builds_and_announces_without_machine_paths() -> None:
    options = {"trainable": "last2", "weights_dir": str(default_models_dir())}
    config = AggregatorConfig(state_dir=".", model=ModelConfig(arch="faceapi-resnet", options=options))

    assert config.model.backbone_kwargs() == options  # act / embedding_size are not FaceApiResNet's
    assert train_settings(config).model == {"arch": "faceapi-resnet", "trainable": "last2"}
    with pytest.raises(ConfigError, match="options.*trainable"):
        ModelConfig(arch="faceapi-resnet", options={"trainable": "most"}).check()


@needs_shared
def test_federation_over_mqtt_moves_only_tail_tensors(celeb_small: FaceDataset, embedded_broker, tmp_path) -> None:
    data = tmp_path / "celeb6"
    save_folders(celeb_small, data)
    prefix = "facefed/faceapi"
    topics = Topics(prefix)
    recorder = Recorder(embedded_broker)
    out = tmp_path / "run"
    cfg = SimulationConfig(data=[data], out=out, clients=2, rounds=1, local_epochs=1, lr=1e-4, margin=0.1,
                           holdout=2, broker=embedded_broker, topic_prefix=prefix, arch="faceapi-resnet",
                           model_options={"trainable": "last"}, batch_size=8)
    try:
        result = run_simulation(cfg)
    finally:
        time.sleep(0.5)
        recorder.link.close()

    assert [r["round"] for r in result.rounds] == [0, 1] and result.rounds[1]["clients"] == 2
    initial, _ = load_checkpoint(out / "aggregator" / "checkpoints" / "round-0000.safetensors")
    final, _ = load_checkpoint(result.final_checkpoint)
    tail_specs = {k: (v.shape, v.dtype) for k, v in shared_tensors(initial).items()}
    assert all(name.startswith("tail.") for name in tail_specs)
    uploads = _uploads(recorder.snapshot(), topics)
    assert len(uploads) == 2
    for tensors in uploads:
        assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == tail_specs
    assert all(torch.equal(v, final.trunk.state_dict()[k]) for k, v in initial.trunk.state_dict().items())
    before, after = shared_tensors(initial), shared_tensors(final)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def _uploads(messages: list[tuple[str, bytes]], topics: Topics) -> list[dict[str, np.ndarray]]:
    """The tensors of every complete update transfer seen on the broker."""
    reassembler = Reassembler()
    completed = []
    for topic, payload in messages:
        parsed = topics.parse(topic) if topic.startswith(topics.prefix + "/") else None
        if parsed is None or parsed.kind not in ("update_manifest", "update_chunk"):
            continue
        if parsed.kind == "update_manifest":
            done = reassembler.add_manifest(parsed.device_id, TransferManifest.from_json(payload), time.time())
        else:
            done = reassembler.add_chunk(parsed.device_id, payload, time.time())
        completed += [done.tensors] if done else []
    return completed


@needs_shared
def test_cli_exports_the_pretrained_descriptor_as_version_0(celeb_small: FaceDataset, tmp_path, capsys) -> None:
    from edge_agent.backends import load_embedder
    from model_zoo.exported import read_card

    calibration = tmp_path / "calibration"
    save_folders(celeb_small, calibration)
    out = tmp_path / "export"
    assert facefed.cli.main(["export", "--model", "faceapi", "--format", "onnx", "--out", str(out),
                             "--calibration", str(calibration)]) == 0
    path = out / "facefed-v0-onnx.onnx"
    card = read_card(path)
    assert card.arch == "faceapi-resnet" and card.model_version == 0 and card.check.mean_cosine > 0.9999
    images = celeb_small.images[:4]
    exported = load_embedder(path).embed(images)
    torch_side = embed_images(build_backbone("faceapi-resnet"), images)
    assert (exported * torch_side).sum(axis=1).min() > 0.9999


@needs_shared
def test_an_int8_trunk_feeds_the_tail_close_to_float_and_training_still_learns(celeb_small: FaceDataset) -> None:
    from model_zoo.export import quantize_trunk

    data = celeb_small.subset(np.flatnonzero(celeb_small.labels < 3))
    net = build_backbone("faceapi-resnet", trainable="last")
    tail_before = _state(net.tail)
    float_embeddings = embed_images(net, data.images)
    quantize_trunk(net, data.images, limit=16)
    int8_embeddings = embed_images(net, data.images)
    cosine = (float_embeddings * int8_embeddings).sum(axis=1)
    assert cosine.min() > 0.99 and cosine.max() < 1.0 - 1e-7  # close, and really not the float trunk

    # As in the cached-feature test above: a random head, so there is a loss to lower.
    losses = []
    for epochs in (1, 4):
        torch.manual_seed(0)
        head = ArcFaceHead(128, data.num_classes)
        cache = TrunkFeatureCache()
        losses.append(train_local(net, head, data, TrainConfig(epochs=epochs, batch_size=8, lr=0.01, seed=0),
                                  trunk_cache=cache).loss)
        net.tail.load_state_dict(tail_before)
    assert losses[1] < 0.8 * losses[0]


@needs_shared
def test_a_device_profile_asking_for_an_int8_trunk_gets_one(celeb_small: FaceDataset, tmp_path) -> None:
    from edge_agent.trainer import LocalTrainer
    from model_zoo.export import Int8Trunk

    spec = {"arch": "faceapi-resnet", "trainable": "last"}
    int8 = LocalTrainer(celeb_small, tmp_path / "int8", 8, False, 0, trunk_precision="int8")._backbone_for(spec)
    fp32 = LocalTrainer(celeb_small, tmp_path / "fp32", 8, False, 0)._backbone_for(spec)
    assert isinstance(int8.trunk_runtime, Int8Trunk) and fp32.trunk_runtime is None


@needs_shared
def test_a_late_joining_device_pulls_towards_the_pretrained_weights(celeb_small: FaceDataset, tmp_path,
                                                                    monkeypatch) -> None:
    """No version 0 kept (first round seen: 3): for faceapi-resnet the pretrained tail is version 0."""
    import edge_agent.trainer as trainer_mod
    from model_zoo.train import TrainResult

    seen = []

    def fake_train_local(backbone, head, dataset, cfg, progress=False, trunk_cache=None, l2sp_reference=None):
        seen.append(l2sp_reference)
        return TrainResult(loss=0.0, accuracy=1.0, num_samples=len(dataset), seconds=0.0, epochs=cfg.epochs)

    monkeypatch.setattr(trainer_mod, "train_local", fake_train_local)
    spec = {"arch": "faceapi-resnet", "trainable": "last"}
    pretrained = shared_tensors(build_backbone("faceapi-resnet", trainable="last"))
    moved = {k: v + 0.01 for k, v in pretrained.items()}
    trainer = trainer_mod.LocalTrainer(celeb_small, tmp_path / "late", 8, False, 0)
    trainer.train_round(3, moved, TrainSettings(lr=1e-4, margin=0.0, l2sp_alpha=100.0, model=spec))
    assert set(seen[-1]) == set(pretrained)
    assert all(np.array_equal(seen[-1][k], pretrained[k]) for k in pretrained)


@needs_shared
def test_a_prepared_device_trains_exactly_as_an_unprepared_one(celeb_small: FaceDataset, tmp_path) -> None:
    """LocalTrainer.prepare does ahead what the first round would do: same update, no trunk pass left in it."""
    from edge_agent.trainer import LocalTrainer

    settings = TrainSettings(lr=1e-4, margin=0.0, model={"arch": "faceapi-resnet", "trainable": "last"})
    start = shared_tensors(build_backbone("faceapi-resnet", trainable="last"))
    plain = LocalTrainer(celeb_small, tmp_path / "plain", 8, True, 3)
    prepared = LocalTrainer(celeb_small, tmp_path / "prepared", 8, True, 3)
    prepared.prepare(settings)
    assert prepared.head_path.is_file() and not plain.head_path.exists()
    a, b = plain.train_round(1, start, settings), prepared.train_round(1, start, settings)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert b.result.trunk_seconds == 0.0 < a.result.trunk_seconds
