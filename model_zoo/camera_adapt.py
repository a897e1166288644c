"""One-owner camera adaptation of the face-api descriptor: what a device trains to unlock better in its camera.

The model is the whole face-api net (backbones.FaceApiResNet, trainable "all"), split into parts:
- shared (averaged by the federation): "scale_shift", every per-channel scale and shift (dlib's affine
  layers) through the net outside the personal part: 6,080 floats, 24 KB a round (7,104 without one);
- personal (stays on the device, FedPer style): "last", the last stage (conv256_down_out) and the
  256 -> 128 projection (1.2 M floats); "projection", the projection alone (32,768 floats; it needs a
  larger step, personal_lr 1e-4); "none" trains nothing personal.
Everything else stays at version 0.

What a device has, and the loss terms that use it (docs/camera-domain.md says why a real device has each):
- its owner's few clean enrolment photos and version 0's raw descriptors of them (the teacher);
- its own camera model (face size and noise measured on its frames): `pairs`, the enrolment photos passed
  through it, pulled onto version 0's descriptor of the clean photo;
- camera frames of the owner (kept at successful unlocks): `align`, pulled onto version 0's mean descriptor
  of the owner's enrolment (cross-quality alignment);
- `clean`: the clean enrolment photos kept where version 0 puts them (the gallery side of unlock);
- a bank of public face crops shipped with the model, with version 0's descriptors: `bank`, the same
  synthetic pairs on other people's faces (and, for half of them, the clean crop kept in place), so the
  model cannot map every dark small face onto the owner nor shrink the clean space; `push`: a stranger
  through this camera stays at least as far from the owner as the stranger's clean photo is;
- `spread` (similarity matching): every output keeps its target's distances to the whole bank, against the
  shrinking that regression from degraded inputs brings;
- L2-SP towards version 0 on every trained tensor.
All terms are squared euclidean distances between raw (unnormalised) descriptors: raw L2 is the score
unlock uses for this descriptor, and matching distances, not only directions, keeps the space from
shrinking as 1 - cos did in the issue's scratch experiment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedwire.messages import CameraLossWeights, CameraTraining

from .backbones import FaceApiResNet
from .camera import CameraSpec, capture_frames
from .data import to_model_input

LOSS_TERMS = tuple(f.name for f in dataclasses.fields(CameraLossWeights))  # the order of AdaptConfig.weights
_ANNOUNCED = CameraTraining()


@dataclass(frozen=True)
class AdaptConfig:
    """adapt()'s step sizes and loss weights (which tensors it trains: its `names`, from FaceApiResNet.parts).
    Defaults as a federation announces them (fedwire.messages.CameraTraining, the one home of their values)."""

    steps: int = _ANNOUNCED.steps  # optimiser steps per round
    batch: int = _ANNOUNCED.batch  # images per loss term per step
    lr: float = _ANNOUNCED.lr  # scale/shift (and any shared part)
    personal_lr: float = _ANNOUNCED.personal_lr  # conv and projection weights of the personal part
    weights: tuple[float, ...] = dataclasses.astuple(_ANNOUNCED.weights)  # in LOSS_TERMS order
    l2sp: float = _ANNOUNCED.l2sp

    @classmethod
    def announced(cls, training: CameraTraining) -> AdaptConfig:
        """The trainer's settings for a round of method "camera"."""
        return cls(steps=training.steps, batch=training.batch, lr=training.lr,
                   personal_lr=training.personal_lr, weights=dataclasses.astuple(training.weights),
                   l2sp=training.l2sp).check()

    def check(self) -> AdaptConfig:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.weights) != len(LOSS_TERMS):
            raise ValueError(f"weights: one per loss term {LOSS_TERMS}, got {len(self.weights)}")
        if self.lr <= 0 or self.personal_lr <= 0 or self.l2sp < 0 or min(self.weights) < 0:
            raise ValueError("lr must be > 0, l2sp and the loss weights >= 0")
        return self


def build_model(weights_dir=None, trainable: str = "all") -> FaceApiResNet:
    """The whole net trainable; "last" for a device whose trunk runs int8 (only the tail can adapt)."""
    return FaceApiResNet(trainable=trainable, weights_dir=weights_dir)


def get_tensors(model: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().numpy().copy() for n in names}


def set_tensors(model: nn.Module, tensors: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.from_numpy(np.asarray(value)))


def raw_descriptors(model: FaceApiResNet, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Unnormalised 128-d descriptors (face-api's own output) of uint8 crops or model-input tensors."""
    return model.descriptor(to_model_input(images) if isinstance(images, np.ndarray) else images)


@torch.no_grad()
def embed(model: FaceApiResNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    return np.concatenate([raw_descriptors(model, images[i:i + batch_size]).numpy()
                           for i in range(0, len(images), batch_size)]) if len(images) else np.empty((0, 128))


@dataclass
class DeviceData:
    """What one device holds: its owner's clean enrolment photos and camera frames, and its camera model."""
    enrolment: np.ndarray  # uint8 [E, 112, 112, 3] clean
    frames: np.ndarray  # uint8 [F, 112, 112, 3] camera frames of the owner
    camera: CameraSpec  # the device's own camera, as it measures it on its frames
    # A household device (2-5 people): which member each enrolment photo and frame shows, as unlock knows from
    # the template it matched. None: one owner.
    enrolment_people: np.ndarray | None = None
    frame_people: np.ndarray | None = None

    def people(self) -> tuple[np.ndarray, np.ndarray]:
        """(member of each enrolment photo, member of each frame): all 0 for a one-owner device."""
        if self.enrolment_people is None:
            return np.zeros(len(self.enrolment), int), np.zeros(len(self.frames), int)
        return self.enrolment_people, self.frame_people


@dataclass
class Teacher:
    """Version 0's raw descriptors a device needs: its enrolment's, and the shipped public bank's."""
    enrolment: torch.Tensor  # [E, 128]
    bank_images: np.ndarray  # uint8 [B, 112, 112, 3] public faces, clean
    bank: torch.Tensor  # [B, 128]
    prototypes: torch.Tensor  # [members, 128]: each member's mean enrolment descriptor (one row for one owner)


def teacher_for(version0: FaceApiResNet, data: DeviceData, bank_images: np.ndarray,
                bank: torch.Tensor | None = None) -> Teacher:
    bank = torch.from_numpy(embed(version0, bank_images)) if bank is None else bank
    enrolment = torch.from_numpy(embed(version0, data.enrolment))
    people = torch.from_numpy(data.people()[0])
    prototypes = torch.stack([enrolment[people == k].mean(0) for k in range(int(people.max()) + 1)])
    return Teacher(enrolment, bank_images, bank, prototypes)


def _similarity_matching(out: torch.Tensor, targets: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each output's distances to the whole bank should be its target's: regression onto version 0's
    descriptors from degraded inputs otherwise shrinks the space towards its mean (0.84 -> 0.60 mean distance
    between strangers in 12 steps, tests/test_camera_adapt.py)."""
    return (torch.cdist(out, bank) - torch.cdist(targets, bank)).pow(2).mean(1).mean()


@dataclass
class RoundStats:
    loss: float
    terms: dict[str, float]
    cpu_seconds: float


class AdaptDiverged(ValueError):
    """Training produced non-finite values (the step size is too large for these data)."""


def adapt(model: FaceApiResNet, names: list[str], reference: dict[str, np.ndarray], data: DeviceData,
          teacher: Teacher, cfg: AdaptConfig, rng: np.random.Generator,
          sample: Callable[[np.random.Generator], tuple[DeviceData, Teacher]] | None = None) -> RoundStats:
    """cfg.steps Adam steps on the named parameters of model (in place), L2-SP towards reference.

    sample, if given, picks the (data, teacher) of each step (the pooled arm draws a device per step)."""
    if not names:
        return RoundStats(0.0, {}, 0.0)
    start = time.process_time()
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    trained = [params[n] for n in names]
    anchor = [torch.from_numpy(np.asarray(reference[n])) for n in names]
    # Per-channel affines take the large steps, conv and projection weights the small ones.
    affine = [params[n] for n in names if n.endswith(("scale_weight", "scale_bias"))]
    weights = [params[n] for n in names if not n.endswith(("scale_weight", "scale_bias"))]
    optimiser = torch.optim.Adam([{"params": affine, "lr": cfg.lr}, {"params": weights, "lr": cfg.personal_lr}])
    model.train()
    totals = dict.fromkeys((*LOSS_TERMS, "l2sp"), 0.0)
    for _ in range(cfg.steps):
        d, t = sample(rng) if sample is not None else (data, teacher)
        e = rng.integers(0, len(d.enrolment), cfg.batch)
        f = rng.integers(0, len(d.frames), cfg.batch)
        b = rng.integers(0, len(t.bank_images), cfg.batch)
        flip = rng.random(cfg.batch) < 0.5
        clean = d.enrolment[e]
        clean = np.where(flip[:, None, None, None], clean[:, :, ::-1], clean)
        # One forward over all four groups: synthetic owner pairs, owner frames, clean enrolment, synthetic bank.
        # Half the strangers go in clean: the bank then also holds the clean space where version 0 put it.
        strangers, half = t.bank_images[b], cfg.batch // 2 + 1
        strangers = np.concatenate([capture_frames(strangers[:half], d.camera, rng), strangers[half:]])
        batch = np.concatenate([capture_frames(clean, d.camera, rng), d.frames[f], d.enrolment, strangers])
        out = raw_descriptors(model, batch)
        n, m = cfg.batch, len(d.enrolment)
        prototypes = t.prototypes
        frame_targets = prototypes[torch.from_numpy(d.people()[1][f])]  # each frame's own member
        strangers = out[2 * n + m:]
        # A mirrored face's descriptor is close to the original's: the teacher of a flipped photo is its own.
        terms = {
            "pairs": (out[:n] - t.enrolment[e]).pow(2).sum(1).mean(),
            "align": (out[n:2 * n] - frame_targets).pow(2).sum(1).mean(),
            "clean": (out[2 * n:2 * n + m] - t.enrolment).pow(2).sum(1).mean(),
            "bank": (strangers - t.bank[b]).pow(2).sum(1).mean(),
            # A stranger in this camera must stay at least as far from each member as their clean photo is.
            "push": torch.relu((t.bank[b][:, None] - prototypes[None]).norm(dim=2)
                               - (strangers[:, None] - prototypes[None]).norm(dim=2)).pow(2).mean(),
            "spread": _similarity_matching(out, torch.cat([t.enrolment[e], frame_targets, t.enrolment,
                                                           t.bank[b]]), t.bank),
            "l2sp": sum((p - a).pow(2).sum() for p, a in zip(trained, anchor)),
        }
        loss = sum(w * terms[k] for w, k in zip(cfg.weights, LOSS_TERMS)) + cfg.l2sp * terms["l2sp"]
        if not torch.isfinite(loss):
            raise AdaptDiverged(f"non-finite loss {loss.item()} (lr {cfg.lr})")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for key, value in terms.items():
            totals[key] += float(value.detach()) / cfg.steps
    model.eval()
    for p in trained:
        p.requires_grad_(False)
    return RoundStats(sum(w * totals[k] for w, k in zip(cfg.weights, LOSS_TERMS))
                      + cfg.l2sp * totals["l2sp"], totals, time.process_time() - start)
