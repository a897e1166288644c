"""Local training of backbone + ArcFace head on one client's data, and embedding extraction."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

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


@dataclass
class TrainResult:
    loss: float  # mean ArcFace cross-entropy over the last epoch
    accuracy: float  # training accuracy of the plain cosine logits over the last epoch
    num_samples: int
    seconds: float
    epochs: int


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)


def augment_batch(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, crop jitter and brightness/contrast on float NCHW pixels in [0, 255]."""
    n, _, h, w = pixels.shape
    flip = torch.rand(n, generator=gen) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
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


def train_local(backbone: nn.Module, head: ArcFaceHead, dataset: FaceDataset, cfg: TrainConfig,
                progress: bool = False) -> TrainResult:
    """SGD on CrossEntropy over ArcFace margin logits; deterministic for a given cfg.seed and starting weights."""
    _check_inputs(head, dataset, cfg)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(np.ascontiguousarray(dataset.images))
    labels = torch.from_numpy(dataset.labels)
    optimizer = _optimizer([backbone, head], cfg)
    was_training = backbone.training, head.training
    backbone.train()
    head.train()
    sizes = batch_sizes(len(dataset), cfg.batch_size)
    bar = tqdm(total=cfg.epochs * len(sizes), desc="train", unit="batch", disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            loss_sum, correct = 0.0, 0
            for idx in torch.randperm(len(dataset), generator=gen).split(sizes):
                pixels = images[idx].permute(0, 3, 1, 2).float()
                if cfg.augment:
                    pixels = augment_batch(pixels, gen)
                y = labels[idx]
                embeddings = backbone(normalize_pixels(pixels))
                loss = F.cross_entropy(head(embeddings, y), y)
                with torch.no_grad():
                    correct += int((head.logits(embeddings).argmax(1) == y).sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        backbone.train(was_training[0])
        head.train(was_training[1])
    return TrainResult(loss=loss_sum / len(dataset), accuracy=correct / len(dataset), num_samples=len(dataset),
                       seconds=time.perf_counter() - start, epochs=cfg.epochs)


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
