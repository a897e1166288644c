"""Local training: determinism, side effects, augmentation, and a from-scratch sanity run on ORL."""
import copy

import numpy as np
import pytest
import torch

from model_zoo.backbones import build_backbone
from model_zoo.data import FaceDataset, load_dataset, shared_dataset_dir, shared_datasets_root
from model_zoo.evaluate import evaluate_backbone
from model_zoo.losses import ArcFaceHead
from model_zoo.train import TrainConfig, augment_batch, batch_sizes, embed_images, train_local


def _tiny_dataset(n=10, classes=3) -> FaceDataset:
    rng = np.random.default_rng(0)
    return FaceDataset(rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8), np.arange(n) % classes,
                       [f"id{i}" for i in range(classes)])


def _fresh(classes: int, act="relu"):
    torch.manual_seed(0)
    return build_backbone(act=act), ArcFaceHead(128, classes)


def test_training_is_deterministic_for_a_seed_and_leaves_threads_and_modes_alone():
    ds = _tiny_dataset()
    cfg = TrainConfig(epochs=2, batch_size=4, seed=3)
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        backbone, head = _fresh(3)
        backbone.eval()
        result = train_local(backbone, head, ds, cfg)
        assert not backbone.training and head.training  # modes restored
        runs.append((backbone.state_dict(), result))
    assert torch.get_num_threads() == threads
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra.loss == rb.loss and ra.num_samples == 10 and ra.epochs == 2 and ra.seconds > 0
    backbone, head = _fresh(3)
    train_local(backbone, head, ds, TrainConfig(epochs=2, batch_size=4, seed=4))
    assert any(not torch.equal(a[k], backbone.state_dict()[k]) for k in a)


def test_training_rejects_unusable_inputs():
    backbone, head = _fresh(2)
    with pytest.raises(ValueError, match="classes"):
        train_local(backbone, head, _tiny_dataset(classes=3), TrainConfig())
    with pytest.raises(ValueError, match="at least 2"):
        train_local(backbone, head, _tiny_dataset(n=1, classes=1), TrainConfig())


def test_batches_never_leave_a_single_sample():
    assert batch_sizes(9, 4) == [4, 5]
    assert batch_sizes(8, 4) == [4, 4] and batch_sizes(10, 4) == [4, 4, 2] and batch_sizes(3, 32) == [3]


def test_augmentation_is_seeded_bounded_and_varied():
    pixels = torch.from_numpy(_tiny_dataset(n=8).images).permute(0, 3, 1, 2).float()
    a = augment_batch(pixels, torch.Generator().manual_seed(1))
    b = augment_batch(pixels, torch.Generator().manual_seed(1))
    c = augment_batch(pixels, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == pixels.shape and a.min() >= 0 and a.max() <= 255
    assert not torch.equal(a, pixels)


def test_embed_images_restores_mode_and_is_batch_independent():
    backbone, _ = _fresh(1)
    backbone.train()
    images = _tiny_dataset(n=5).images
    full = embed_images(backbone, images, batch_size=64)
    split = embed_images(backbone, images, batch_size=2)
    assert backbone.training
    assert full.shape == (5, 128) and full.dtype == np.float32
    np.testing.assert_allclose(full, split, atol=1e-5)  # eval mode: BN uses running stats, not the batch
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


@pytest.mark.shared_data
def test_three_epochs_from_scratch_reduce_loss_on_orl():
    root = shared_dataset_dir("orl")
    if root is None:
        pytest.skip(f"shared dataset 'orl' absent under {shared_datasets_root()} (set FACEFED_DATA_ROOT)")
    orl = load_dataset(root)
    ds = orl.subset(np.flatnonzero(orl.labels < 10))  # 10 identities, 100 images
    backbone, head = _fresh(10)
    start = copy.deepcopy((backbone, head))
    # Same seed and weights: the 3-epoch run's first epoch is exactly the 1-epoch run.
    first = train_local(*start, ds, TrainConfig(epochs=1, batch_size=16, seed=0))
    third = train_local(backbone, head, ds, TrainConfig(epochs=3, batch_size=16, seed=0), progress=True)
    print(f"ORL 10 ids: epoch-1 loss {first.loss:.3f} -> epoch-3 loss {third.loss:.3f} ({third.seconds:.1f} s)")
    assert third.loss < first.loss
    assert third.accuracy > first.accuracy
    report = evaluate_backbone(backbone, ds)
    assert {"accuracy", "eer", "tar_at_far", "rank1", "genuine_pairs"} <= set(report)
    assert report["genuine_pairs"] == 10 * 45
