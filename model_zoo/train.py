"""Local training of backbone + ArcFace head on one client's data, and embedding extraction."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .backbones import FrozenTrunk
from .checkpoint import running_statistics, shared_tensors
from .data import FaceDataset, normalize_pixels, to_model_input
from .losses import ArcFaceHead

JITTER_PX = 4  # crop jitter: shift by up to this many pixels each way
CONTRAST_RANGE = 0.2  # contrast factor drawn from 1 +- this
BRIGHTNESS_RANGE = 25.0  # brightness offset in pixel units (0..255), drawn from +- this


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    # FedProx (Li et al., MLSys 2020): adds proximal_mu/2 * ||w - w_start||^2 over the backbone's trained
    # weights, w_start being the weights train_local starts from (the round's global model). 0: plain SGD.
    proximal_mu: float = 0.0
    # L2-SP (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with convolutional
    # networks", ICML 2018): adds l2sp_alpha/2 * ||w - w_ref||^2 over the backbone's trained weights, w_ref being
    # the pretrained starting point (in a federation: model version 0, which every device has), passed to
    # train_local as l2sp_reference. Unlike proximal_mu the anchor does not move from round to round, so the
    # federated model cannot drift far from the pretrained one however many rounds run. 0: off.
    l2sp_alpha: float = 0.0
    # Re-estimate BatchNorm running statistics after the last step (see recalibrate_batchnorm). Without it a
    # client taking few steps (small n_k) keeps stale statistics that blow up eval-mode activations to NaN.
    recalibrate_bn: bool = True


@dataclass
class TrainResult:
    loss: float  # mean ArcFace cross-entropy over the last epoch
    accuracy: float  # training accuracy of the plain cosine logits over the last epoch
    num_samples: int
    seconds: float
    epochs: int
    trunk_seconds: float = 0.0  # of `seconds`, spent computing frozen-trunk features (0: none, or cached)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)


def augment_batch(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, crop jitter and brightness/contrast on float NCHW pixels in [0, 255]."""
    flip = torch.rand(pixels.shape[0], generator=gen) < 0.5
    return jitter_batch(torch.where(flip[:, None, None, None], pixels.flip(-1), pixels), gen)


def jitter_batch(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Crop jitter and brightness/contrast on float NCHW pixels in [0, 255]."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (JITTER_PX,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * JITTER_PX + 1, (n, 2), generator=gen).tolist()
    pixels = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    contrast = _uniform(n, 1 - CONTRAST_RANGE, 1 + CONTRAST_RANGE, gen)
    brightness = _uniform(n, -BRIGHTNESS_RANGE, BRIGHTNESS_RANGE, gen)
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    return ((pixels - mean) * contrast + mean + brightness).clamp(0.0, 255.0)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of one epoch's batches; a trailing batch of one joins the previous one (BatchNorm needs >= 2)."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def _optimizer(modules: list[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    # Decaying BN affine and PReLU slopes (the 1-D parameters) only hurts: decay applies to weights proper.
    decayed = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decayed, "weight_decay": cfg.weight_decay},
                            {"params": plain, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)


def _check_inputs(head: ArcFaceHead, dataset: FaceDataset, cfg: TrainConfig) -> None:
    if len(dataset) < 2:
        raise ValueError(f"train_local needs at least 2 samples (BatchNorm), got {len(dataset)}")
    if int(dataset.labels.max()) >= head.num_classes:
        raise ValueError(f"labels reach {int(dataset.labels.max())} but the head has {head.num_classes} classes")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {cfg.epochs} and {cfg.batch_size}")
    if not cfg.proximal_mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0, got {cfg.proximal_mu}")
    if not cfg.l2sp_alpha >= 0:
        raise ValueError(f"l2sp_alpha must be >= 0, got {cfg.l2sp_alpha}")


def _l2sp_anchor(backbone: nn.Module, reference: Mapping | None, cfg: TrainConfig) -> list[torch.Tensor]:
    """The reference values of the backbone's trained parameters, in parameters() order ([] when L2-SP is off)."""
    if cfg.l2sp_alpha == 0:
        return []
    if reference is None:
        raise ValueError("l2sp_alpha > 0 needs l2sp_reference: the pretrained weights to pull towards")
    anchor = []
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        if name not in reference:
            raise ValueError(f"l2sp_reference has no tensor {name!r}")
        value = torch.as_tensor(np.asarray(reference[name]), dtype=param.dtype)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"l2sp_reference[{name!r}] has shape {tuple(value.shape)}, "
                             f"the parameter {tuple(param.shape)}")
        anchor.append(value.clone())
    return anchor


def train_local(backbone: nn.Module, head: ArcFaceHead, dataset: FaceDataset, cfg: TrainConfig,
                progress: bool = False, trunk_cache: TrunkFeatureCache | None = None,
                l2sp_reference: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> TrainResult:
    """SGD on CrossEntropy over ArcFace margin logits; deterministic for a given cfg.seed and starting weights.

    A backbone with a frozen trunk (has_frozen_trunk) trains on cached trunk features: the trunk runs once per
    image (and once per mirror image, the only augmentation then), the epochs run the tail only. Pass the same
    trunk_cache to later calls on the same dataset (e.g. each federated round) to skip even that.

    l2sp_reference (needed when cfg.l2sp_alpha > 0): tensors by backbone parameter name, e.g.
    shared_tensors(pretrained backbone); every trained parameter must be in it, other entries are ignored.
    """
    _check_inputs(head, dataset, cfg)
    l2sp_anchor = _l2sp_anchor(backbone, l2sp_reference, cfg)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    trunk_seconds = 0.0
    if has_frozen_trunk(backbone):
        trunk_cache = trunk_cache if trunk_cache is not None else TrunkFeatureCache()
        features, trunk_seconds = trunk_cache.get(backbone, dataset.images, mirrored=cfg.augment)
        embed = _tail_embedder(backbone, features, gen)
    else:
        embed = _pixel_embedder(backbone, dataset.images, cfg.augment, gen)
    loss, accuracy = _run_epochs(backbone, head, torch.from_numpy(dataset.labels), cfg, embed, gen, progress,
                                 l2sp_anchor)
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(backbone.tail if isinstance(backbone, FrozenTrunk) else backbone, embed,
                              len(dataset), cfg.batch_size)
    return TrainResult(loss=loss, accuracy=accuracy, num_samples=len(dataset), seconds=time.perf_counter() - start,
                       epochs=cfg.epochs, trunk_seconds=trunk_seconds)


Embedder = Callable[[torch.Tensor], torch.Tensor]  # sample indices -> embeddings, with autograd


def _pixel_embedder(backbone: nn.Module, images: np.ndarray, augment: bool, gen: torch.Generator) -> Embedder:
    images = torch.from_numpy(np.ascontiguousarray(images))

    def embed(idx: torch.Tensor) -> torch.Tensor:
        pixels = images[idx].permute(0, 3, 1, 2).float()
        return backbone(normalize_pixels(augment_batch(pixels, gen) if augment else pixels))

    return embed


def _tail_embedder(backbone: nn.Module, features: TrunkFeatures, gen: torch.Generator) -> Embedder:
    def embed(idx: torch.Tensor) -> torch.Tensor:
        batch = features.plain[idx]
        if features.mirrored is not None:  # each sample mirrored with probability 1/2, as augment_batch does
            flip = torch.rand(len(idx), generator=gen) < 0.5
            batch = torch.where(flip.view(-1, *[1] * (batch.ndim - 1)), features.mirrored[idx], batch)
        return backbone.forward_tail(batch)

    return embed


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_anchor||^2 summed over the given tensors."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def _run_epochs(backbone: nn.Module, head: ArcFaceHead, labels: torch.Tensor, cfg: TrainConfig, embed: Embedder,
                gen: torch.Generator, progress: bool, l2sp_anchor: list[torch.Tensor] | None = None
                ) -> tuple[float, float]:
    """(mean loss, accuracy) of the last epoch; both modules' train/eval modes are restored afterwards.

    The reported loss is the classification loss alone (ArcFace cross-entropy), without proximal or head
    penalty terms, so runs with and without them compare.
    """
    optimizer = _optimizer([backbone, head], cfg)
    prox_params = [p for p in backbone.parameters() if p.requires_grad] if cfg.proximal_mu > 0 else []
    prox_anchor = [p.detach().clone() for p in prox_params]
    l2sp_params = [p for p in backbone.parameters() if p.requires_grad] if l2sp_anchor else []
    was_training = backbone.training, head.training
    backbone.train()
    head.train()
    sizes = batch_sizes(len(labels), cfg.batch_size)
    bar = tqdm(total=cfg.epochs * len(sizes), desc="train", unit="batch", disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            loss_sum, correct = 0.0, 0
            for idx in torch.randperm(len(labels), generator=gen).split(sizes):
                y = labels[idx]
                embeddings = embed(idx)
                loss = F.cross_entropy(head(embeddings, y), y)
                with torch.no_grad():
                    correct += int((head.logits(embeddings).argmax(1) == y).sum())
                total = loss
                penalty = head.penalty()
                if penalty is not None:
                    total = total + penalty
                if prox_params:
                    total = total + proximal_term(prox_params, prox_anchor, cfg.proximal_mu)
                if l2sp_params:  # the same quadratic pull, towards the fixed pretrained weights
                    total = total + proximal_term(l2sp_params, l2sp_anchor, cfg.l2sp_alpha)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        backbone.train(was_training[0])
        head.train(was_training[1])
    return loss_sum / len(labels), correct / len(labels)


def recalibrate_batchnorm(module: nn.Module, embed: Embedder, n: int, batch_size: int) -> None:
    """Precise BatchNorm (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): reset the running statistics
    of module's BatchNorm layers and set them to the equal-weight average over one no-grad pass of batches.

    The running statistics (momentum 0.1) trail the weights by ~10 steps; after few steps with fast-moving
    weights, eval-mode activations no longer match what training normalised, and compound through the layers
    (1e37 and NaN after 8 steps on 50 ORL faces). One forward pass fixes it; module's mode is restored.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    was_training = module.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches of this pass
    module.train()
    try:
        with torch.no_grad():
            for idx in torch.arange(n).split(batch_sizes(n, batch_size)):
                embed(idx)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        module.train(was_training)


def measure_batchnorm_statistics(module: nn.Module, images: np.ndarray, batch_size: int, seed: int = 0
                                 ) -> dict[str, np.ndarray]:
    """BatchNorm running statistics of `module` on uint8 face `images`, measured on a copy (module is left as it
    is): recalibrate_batchnorm over seeded random batches, as training draws them, without augmentation."""
    model = copy.deepcopy(module)
    order = np.random.default_rng(seed).permutation(len(images))

    def embed(idx: torch.Tensor) -> torch.Tensor:
        return model(to_model_input(images[order[idx.numpy()]]))

    recalibrate_batchnorm(model, embed, len(images), batch_size)
    return running_statistics(shared_tensors(model))


def has_frozen_trunk(backbone: nn.Module) -> bool:
    """A FrozenTrunk backbone whose trunk holds weights (without any, there is nothing worth caching)."""
    return isinstance(backbone, FrozenTrunk) and any(True for _ in backbone.trunk.parameters())


@dataclass
class TrunkFeatures:
    """Frozen-trunk outputs for a dataset's images, and for their mirror images when augmenting."""

    trunk: nn.Module  # the trunk that computed them
    images: np.ndarray  # the images they belong to
    plain: torch.Tensor
    mirrored: torch.Tensor | None


class TrunkFeatureCache:
    """Holds the trunk features of one dataset between train_local calls; recomputed when trunk or images change.

    Images are matched by identity (the same array object): do not modify a cached dataset's images in place.
    """

    def __init__(self) -> None:
        self._entry: TrunkFeatures | None = None

    def get(self, backbone: nn.Module, images: np.ndarray, mirrored: bool) -> tuple[TrunkFeatures, float]:
        """(features, seconds spent computing them now: 0 on a cache hit)."""
        entry = self._entry
        if (entry is not None and entry.trunk is backbone.trunk and entry.images is images
                and (entry.mirrored is not None or not mirrored)):
            return entry, 0.0
        start = time.perf_counter()
        self._entry = TrunkFeatures(backbone.trunk, images, trunk_features(backbone, images),
                                    trunk_features(backbone, images, mirror=True) if mirrored else None)
        return self._entry, time.perf_counter() - start


def trunk_features(backbone: nn.Module, images: np.ndarray, mirror: bool = False, batch_size: int = 64) -> torch.Tensor:
    """backbone.trunk_features of uint8 NHWC images (mirrored left-right if asked), batch_size at a time."""
    with torch.no_grad():  # not inference_mode: the tail's backward pass needs to save these as inputs
        chunks = [backbone.trunk_features(to_model_input(images[i:i + batch_size][:, :, ::-1] if mirror
                                                         else images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def imprint_head(head: ArcFaceHead, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """Set each class centre to the normalised mean embedding of its samples (weight imprinting, Qi et al. 2018).

    Fine-tuning a pretrained embedder from a random head lets the head's first gradients scramble the
    features; from the centroids the loss starts where the embedder already is.
    """
    embeddings = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(labels))
    if len(embeddings) != len(labels) or embeddings.shape[1] != head.embedding_size:
        raise ValueError(f"need [{len(labels)}, {head.embedding_size}] embeddings, got {tuple(embeddings.shape)}")
    sums = torch.zeros(head.num_classes, head.embedding_size).index_add_(0, labels, embeddings)
    with torch.no_grad():
        present = torch.bincount(labels, minlength=head.num_classes) > 0  # classes without samples keep their init
        head.weight[present] = F.normalize(sums[present], dim=1)


def embed_images(backbone: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 [N, D] embeddings in eval mode; the backbone's train/eval mode is restored afterwards."""
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("embed_images needs at least one image")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            chunks = [backbone(to_model_input(images[i:i + batch_size])).numpy()
                      for i in range(0, len(images), batch_size)]
    finally:
        backbone.train(was_training)
    return np.concatenate(chunks).astype(np.float32, copy=False)
