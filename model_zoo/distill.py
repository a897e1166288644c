"""Distil the pretrained face-api descriptor into MobileFaceNet: the edge-native model starts from good features.

The teacher is the ported face-api ResNet run through the kit's pipeline: every face becomes a 112x112
ArcFace-aligned crop (the student's input; frames go through detect -> 68 landmarks -> similarity alignment,
crops that are already aligned are taken as they are), and the teacher describes the same crop re-framed
into its 150x150 dlib chip (FacePipeline.embed_aligned_crops, the route `facefed evaluate --model faceapi`
takes for aligned crops). Teacher embeddings are L2-normalised, computed once per image and per mirror
image, and cached in a safetensors file keyed by the images' SHA-256.

The student (MobileFaceNet, 128-d like the teacher) is trained to point its L2-normalised embedding where
the teacher's points: loss = mean(1 - cos(student, teacher)), which equals half the squared distance of the
normalised vectors. The targets are the teacher's embeddings centred on their mean over the training images,
then re-normalised (center_targets, on by default): face-api descriptors all lie in a narrow cone (the mean
of the unit descriptors has norm 0.93, two random faces have cosine 0.86), so raw targets are matched to
cosine 0.7 by a student that has learnt only the cone's axis and nothing about identity (measured: held-out
EER 51 %). Centred, two random faces have cosine 0.0, and the centred teacher verifies as well as the raw one
(celeb-dev held out: EER 2.2 % against 2.4 %). No labels are used, so any face images serve; the evaluation
identities must be left out.
A flipped training crop is matched with the teacher's embedding of the mirrored crop; crop jitter and
brightness/contrast (model_zoo.train's ranges) are applied to the student's input only.

The result is a facefed checkpoint (model_zoo.checkpoint), usable wherever a MobileFaceNet checkpoint is:
`facefed evaluate --model`, `facefed export --model`, and as the federation's starting model
(aggregator.yaml: model: {arch: mobilefacenet, init_checkpoint: student.safetensors}).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn
from tqdm import tqdm

from . import align
from .data import normalize_pixels
from .train import batch_sizes, jitter_batch, recalibrate_batchnorm

TEACHER_CACHE_FORMAT = "facefed-teacher-embeddings"
TEACHER_NAME = "faceapi-resnet (face-api descriptor via FacePipeline.embed_aligned_crops)"


# --- inputs: ArcFace crops ---

def arcface_crops(images: np.ndarray, pipeline=None) -> np.ndarray:
    """uint8 [N, 112, 112, 3] ArcFace-aligned crops of face frames (FacePipeline.arcface_crops: the best
    detection's landmarks, else the whole image's)."""
    from .pipeline import FacePipeline

    pipeline = pipeline if pipeline is not None else FacePipeline(detector_input_size=128)
    return pipeline.arcface_crops(images)


# --- the teacher ---

def images_digest(images: np.ndarray) -> str:
    """SHA-256 over shape, dtype and bytes: names the exact image set a teacher cache belongs to."""
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
    digest.update(images.tobytes())
    return digest.hexdigest()


def teacher_embeddings(crops: np.ndarray, pipeline=None, mirror: bool = False) -> np.ndarray:
    """float32 [N, 128] L2-normalised face-api descriptors of ArcFace-aligned 112x112 crops (mirrored if asked)."""
    from .pipeline import FacePipeline

    pipeline = pipeline if pipeline is not None else FacePipeline(detector_input_size=128)
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:3] != (align.ARCFACE_SIZE, align.ARCFACE_SIZE):
        raise ValueError(f"need [N, {align.ARCFACE_SIZE}, {align.ARCFACE_SIZE}, 3] crops, got {crops.shape}")
    if mirror:
        crops = np.ascontiguousarray(crops[:, :, ::-1])
    raw = pipeline.embed_aligned_crops(crops)
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class TeacherTargets:
    plain: np.ndarray  # [N, D] teacher embeddings of the crops, L2-normalised
    mirrored: np.ndarray  # [N, D] of the mirrored crops
    digest: str
    from_cache: bool = False
    seconds: float = 0.0


def cached_teacher_embeddings(crops: np.ndarray, cache_path: Path | None, pipeline=None) -> TeacherTargets:
    """Teacher embeddings of crops and their mirror images, read from cache_path when it holds these exact
    images (by SHA-256), else computed and written there (safetensors + JSON-string metadata)."""
    digest = images_digest(crops)
    if cache_path is not None and Path(cache_path).is_file():
        with safe_open(str(cache_path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") == TEACHER_CACHE_FORMAT and meta.get("images_sha256") == digest:
                return TeacherTargets(f.get_tensor("plain"), f.get_tensor("mirrored"), digest, from_cache=True)
    start = time.perf_counter()
    plain = teacher_embeddings(crops, pipeline)
    mirrored = teacher_embeddings(crops, pipeline, mirror=True)
    seconds = time.perf_counter() - start
    if cache_path is not None:
        cache_path = Path(cache_path)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        save_file({"plain": plain, "mirrored": mirrored}, str(tmp),
                  metadata={"format": TEACHER_CACHE_FORMAT, "teacher": TEACHER_NAME, "images_sha256": digest,
                            "count": str(len(crops))})
        tmp.replace(cache_path)
    return TeacherTargets(plain, mirrored, digest, seconds=seconds)


# --- the loss and the loop ---

def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) between the student's embeddings (normalised here) and the teacher's (unit vectors)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ")
    return (1.0 - (F.normalize(student, dim=1) * F.normalize(teacher, dim=1)).sum(dim=1)).mean()


@dataclass
class DistillConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3  # AdamW, cosine decay to 0 over all steps after a short linear warm-up
    weight_decay: float = 5e-4
    warmup_steps: int = 20
    augment: bool = True
    seed: int = 0
    center_targets: bool = True  # subtract the teacher embeddings' mean over the training images, re-normalise

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0, got {self.lr}, "
                             f"{self.weight_decay}, {self.warmup_steps}")


@dataclass
class DistillResult:
    epoch_losses: list[float]  # mean distillation loss (1 - cos) of each epoch, on augmented inputs
    steps: int
    seconds: float
    config: dict = field(default_factory=dict)
    teacher_mean: list[float] | None = None  # the mean subtracted from the targets (center_targets)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]


def lr_at(step: int, total: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distill(student: nn.Module, crops: np.ndarray, targets: TeacherTargets, cfg: DistillConfig,
            progress: bool = False) -> DistillResult:
    """Train student in place so its normalised embeddings of crops match the teacher's; deterministic for a
    seed and starting weights. BatchNorm statistics are re-estimated on the plain crops at the end; the student
    is left in eval mode."""
    cfg.check()
    crops = np.asarray(crops)
    if len(crops) < 2 or len(targets.plain) != len(crops) or len(targets.mirrored) != len(crops):
        raise ValueError(f"need >= 2 crops with one teacher embedding each, got {len(crops)} crops, "
                         f"{len(targets.plain)} / {len(targets.mirrored)} targets")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(np.ascontiguousarray(crops))
    plain, mirrored = torch.from_numpy(targets.plain), torch.from_numpy(targets.mirrored)
    teacher_mean = None
    if cfg.center_targets:
        mean = torch.cat([plain, mirrored]).mean(dim=0)
        plain, mirrored = F.normalize(plain - mean, dim=1), F.normalize(mirrored - mean, dim=1)
        teacher_mean = mean.tolist()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)
    sizes = batch_sizes(len(crops), cfg.batch_size)
    total = cfg.epochs * len(sizes)
    bar = tqdm(total=total, desc="distill", unit="batch", disable=not progress, leave=False)
    student.train()
    losses, step = [], 0
    try:
        for epoch in range(cfg.epochs):
            loss_sum = 0.0
            for idx in torch.randperm(len(crops), generator=gen).split(sizes):
                pixels = images[idx].permute(0, 3, 1, 2).float()
                target = plain[idx]
                if cfg.augment:
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
                    target = torch.where(flip[:, None], mirrored[idx], target)
                    pixels = jitter_batch(pixels, gen)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, cfg)
                loss = distillation_loss(student(normalize_pixels(pixels)), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            losses.append(loss_sum / len(crops))
    finally:
        bar.close()

    def embed(idx: torch.Tensor) -> torch.Tensor:
        return student(normalize_pixels(images[idx].permute(0, 3, 1, 2).float()))

    recalibrate_batchnorm(student, embed, len(crops), cfg.batch_size)
    student.eval()
    return DistillResult(losses, step, time.perf_counter() - start, asdict(cfg), teacher_mean)


def centred(teacher: np.ndarray, mean) -> np.ndarray:
    """Teacher embeddings as the student learns them: minus the training mean, re-normalised (mean None: as is)."""
    if mean is None:
        return teacher
    out = teacher - np.asarray(mean, dtype=np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def cosine_to_teacher(student: nn.Module, crops: np.ndarray, teacher: np.ndarray, mean=None) -> np.ndarray:
    """Per-image cosine between the student's (eval mode) and the teacher's embeddings (centred by mean if given)."""
    from .train import embed_images

    emb = embed_images(student, crops)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb * centred(teacher, mean)).sum(axis=1)
