"""Local training: determinism, side effects, augmentation, and a from-scratch sanity run on ORL."""
import copy

import numpy as np
import pytest
import torch

from model_zoo.backbones import build_backbone
from model_zoo.data import FaceDataset, load_dataset, shared_dataset_dir, shared_datasets_root
from model_zoo.evaluate import evaluate_backbone
from model_zoo.losses import ArcFaceHead
from model_zoo.train import (TrainConfig, augment_batch, batch_sizes, embed_images, measure_batchnorm_statistics,
                             train_local)


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


def _prox_run(mu: float, epochs: int = 1):
    backbone, head = _fresh(3)
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_local(backbone, head, _tiny_dataset(n=8), TrainConfig(epochs=epochs, batch_size=4, lr=0.1, seed=5,
                                                                proximal_mu=mu))
    drift = sum(float(((backbone.state_dict()[k] - start[k]) ** 2).sum()) for k, _ in backbone.named_parameters())
    return backbone.state_dict(), drift


def test_fedprox_mu_zero_is_plain_training_and_mu_pulls_towards_the_start():
    plain, plain_drift = _prox_run(0.0)
    backbone, head = _fresh(3)
    train_local(backbone, head, _tiny_dataset(n=8), TrainConfig(epochs=1, batch_size=4, lr=0.1, seed=5))
    assert all(torch.equal(plain[k], backbone.state_dict()[k]) for k in plain)  # bit for bit
    _, weak = _prox_run(1.0)
    _, strong = _prox_run(8.0)  # lr * mu stays well inside SGD-with-momentum's stable range
    assert strong < weak < plain_drift  # the proximal term keeps the weights near the round's global model
    with pytest.raises(ValueError, match="proximal_mu"):
        train_local(*_fresh(3), _tiny_dataset(), TrainConfig(proximal_mu=-1.0))


def test_proximal_term_matches_hand_computation():
    from model_zoo.train import proximal_term

    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert float(proximal_term(w, anchor, 0.5)) == pytest.approx(0.25 * (1 + 4 + 4))


def test_one_class_softmax_is_trivial_and_anchors_give_it_a_gradient():
    from model_zoo.losses import AnchoredArcFaceHead, negative_anchors

    torch.manual_seed(0)
    embeddings = torch.randn(6, 128, requires_grad=True)
    labels = torch.zeros(6, dtype=torch.long)
    plain = ArcFaceHead(128, 1)
    loss = torch.nn.functional.cross_entropy(plain(embeddings, labels), labels)
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad.abs().max().item() == 0.0  # plain FedAvg learns nothing here
    embeddings.grad = None
    anchored = AnchoredArcFaceHead(128, 1, negative_anchors(16, 128, seed=3))
    logits = anchored(embeddings, labels)
    assert logits.shape == (6, 17)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() > 0 and embeddings.grad.abs().max().item() > 0
    assert set(anchored.state_dict()) == {"weight"}  # anchors are regenerated from the seed, never stored


def test_negative_anchors_are_seeded_unit_vectors():
    from model_zoo.losses import negative_anchors

    a = negative_anchors(8, 128, seed=1)
    assert a.shape == (8, 128) and torch.allclose(a.norm(dim=1), torch.ones(8))
    assert torch.equal(a, negative_anchors(8, 128, seed=1)) and not torch.equal(a, negative_anchors(8, 128, seed=2))
    with pytest.raises(ValueError):
        negative_anchors(0, 128, seed=1)


def test_spreadout_penalty_hand_computed():
    from model_zoo.losses import AnchoredArcFaceHead, spreadout_penalty

    anchors = torch.eye(3)
    # Own vector on anchor 0 (distance 0 -> (1 - 0)^2 = 1); the other two are sqrt(2) > 1 away -> 0.
    assert float(spreadout_penalty(torch.tensor([[2.0, 0.0, 0.0]]), anchors)) == pytest.approx(1.0)
    # 60 degrees from anchor 0 is distance 1: exactly on the hinge.
    v = torch.tensor([[0.5, 3 ** 0.5 / 2, 0.0]])
    assert float(spreadout_penalty(v, torch.eye(3)[[0, 2]])) == pytest.approx(0.0, abs=1e-6)
    head = AnchoredArcFaceHead(3, 1, anchors, spreadout_weight=2.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    assert head.penalty().item() == pytest.approx(2.0)
    assert AnchoredArcFaceHead(3, 1, anchors, spreadout_weight=0.0).penalty() is None
    with pytest.raises(ValueError, match="anchors"):
        AnchoredArcFaceHead(3, 1, torch.eye(4))


def test_recalibrate_batchnorm_sets_running_stats_to_the_data_and_keeps_modes():
    from model_zoo.train import recalibrate_batchnorm

    torch.manual_seed(0)
    x = torch.randn(12, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 7.0])
    bn = torch.nn.BatchNorm1d(3)
    bn.eval()
    recalibrate_batchnorm(bn, lambda idx: bn(x[idx]), n=12, batch_size=6)
    assert not bn.training and bn.momentum == 0.1
    halves = x.split(6)  # equal-weight average of the two batches' statistics
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([h.var(0) for h in halves]).mean(0))


def _l2sp_run(alpha: float, reference):
    backbone, head = _fresh(3)
    train_local(backbone, head, _tiny_dataset(n=8), TrainConfig(epochs=1, batch_size=4, lr=0.1, seed=5,
                                                                l2sp_alpha=alpha), l2sp_reference=reference)
    return backbone.state_dict()


def test_l2sp_alpha_zero_is_plain_training_and_alpha_pulls_towards_the_fixed_reference():
    from model_zoo.checkpoint import shared_tensors

    start, _ = _fresh(3)
    # A reference away from the starting weights: L2-SP pulls towards it, FedProx would pull towards the start.
    gen = torch.Generator().manual_seed(1)
    reference = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in start.state_dict().items()
                 if v.is_floating_point()}
    params = [k for k, p in start.named_parameters() if p.requires_grad]

    def distance(state):
        return sum(float(((state[k] - reference[k]) ** 2).sum()) for k in params)

    plain = _l2sp_run(0.0, None)
    assert all(torch.equal(plain[k], v) for k, v in _l2sp_run(0.0, reference).items())  # alpha 0: bit for bit
    weak, strong = _l2sp_run(1.0, reference), _l2sp_run(8.0, reference)
    assert distance(strong) < distance(weak) < distance(plain)
    # numpy references (what a device stores: shared_tensors / safetensors) work the same
    numpy_ref = {k: v.numpy() for k, v in reference.items()}
    assert all(torch.equal(strong[k], v) for k, v in _l2sp_run(8.0, numpy_ref).items())
    assert set(shared_tensors(start)) >= set(params)


def test_l2sp_rejects_bad_settings():
    backbone, head = _fresh(3)
    with pytest.raises(ValueError, match="l2sp_alpha must be >= 0"):
        train_local(backbone, head, _tiny_dataset(), TrainConfig(l2sp_alpha=-1.0), l2sp_reference={})
    with pytest.raises(ValueError, match="needs l2sp_reference"):
        train_local(backbone, head, _tiny_dataset(), TrainConfig(l2sp_alpha=1.0))
    partial = {k: v for k, v in list(backbone.state_dict().items())[1:]}
    with pytest.raises(ValueError, match="has no tensor"):
        train_local(backbone, head, _tiny_dataset(), TrainConfig(l2sp_alpha=1.0), l2sp_reference=partial)
    first = next(iter(backbone.state_dict()))
    wrong = {**backbone.state_dict(), first: torch.zeros(1)}
    with pytest.raises(ValueError, match="shape"):
        train_local(backbone, head, _tiny_dataset(), TrainConfig(l2sp_alpha=1.0), l2sp_reference=wrong)


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 3), torch.nn.BatchNorm2d(2))


def test_measured_statistics_are_the_moments_of_the_layer_input_and_leave_the_model_alone():
    net = _bn_net()
    images = np.random.default_rng(0).integers(0, 200, (10, 12, 12, 3)).astype(np.uint8)
    stats = measure_batchnorm_statistics(net, images, batch_size=16)  # one batch: exact moments
    assert set(stats) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 128.0
    with torch.no_grad():
        conv = net[0](x).numpy()
    channels = conv.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(stats["1.running_mean"], channels.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["1.running_var"], channels.var(1, ddof=1), rtol=1e-4, atol=1e-6)
    # Several batches: the equal-weight mean of per-batch means, whatever order the seed draws them in.
    batched = measure_batchnorm_statistics(net, images, batch_size=5, seed=1)
    np.testing.assert_allclose(batched["1.running_mean"], channels.mean(1), rtol=1e-4, atol=1e-6)
    assert not np.allclose(batched["1.running_var"], stats["1.running_var"])  # within-batch variances differ
    # The model itself is left untouched (fresh BN buffers: mean 0, var 1).
    assert torch.equal(net[1].running_mean, torch.zeros(4)) and torch.equal(net[1].running_var, torch.ones(4))
