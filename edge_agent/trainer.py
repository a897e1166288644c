"""Local training on the device: global backbone in, updated backbone out.

The classifier head is this device's own (its identities never leave it): it is kept
in the state directory between rounds and never returned for upload.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file

from edge_agent.refusals import first_bad_tensor
from fedwire.messages import TrainSettings
from model_zoo.backbones import MACHINE_LOCAL_KWARGS, FrozenTrunk, build_backbone
from model_zoo.checkpoint import load_shared_tensors, shared_tensors
from model_zoo.data import FaceDataset
from model_zoo.losses import AnchoredArcFaceHead, ArcFaceHead, negative_anchors
from model_zoo.train import (TrainConfig, TrainResult, TrunkFeatureCache, embed_images, has_frozen_trunk,
                             imprint_head, measure_batchnorm_statistics, train_local)

log = logging.getLogger("edge_agent.trainer")


@dataclass
class RoundResult:
    tensors: dict[str, np.ndarray]
    result: TrainResult


class CannotTrain(ValueError):
    """This round cannot be trained here (nothing was stored): the agent sends no update and says why."""


class TrainingDiverged(CannotTrain):
    """Local training produced a non-finite loss, model or head; nothing of it was kept."""


class LocalTrainer:
    def __init__(self, dataset: FaceDataset, state_dir: Path, batch_size: int, augment: bool, seed: int,
                 trunk_precision: str = "fp32", threads: int = 1) -> None:
        """trunk_precision "int8": a frozen pretrained trunk runs int8 (ONNX Runtime, calibrated on this device's
        own images), so the tail trains on the features the deployed int8 model computes."""
        self.dataset = dataset
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.head_path = self.state_dir / "head.safetensors"
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.trunk_precision = trunk_precision
        self.threads = threads
        self._backbone = None
        self._model_spec: dict[str, Any] | None = None
        self._trunk_cache = TrunkFeatureCache()  # frozen-trunk features of the local images, kept across rounds
        self._built_tensors: dict[str, np.ndarray] | None = None  # shared tensors as build_backbone made them
        self.version0_path = self.state_dir / "version0.safetensors"  # L2-SP reference, kept from round 1

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def train_round(self, round_number: int, global_tensors: dict[str, np.ndarray], settings: TrainSettings,
                    progress: bool = False) -> RoundResult:
        """Train on the announced settings. A loss, backbone or head that is not finite raises TrainingDiverged
        before anything is stored: the head on disk stays the last good one."""
        if settings.method != "arcface":
            raise CannotTrain(f"this device trains train.method arcface; the round asks for {settings.method} "
                              f"(a camera_training section in the agent's config)")
        model_spec = settings.model
        backbone = self._backbone_for(model_spec)
        load_shared_tensors(backbone, global_tensors)
        embedding_size = model_spec.get("embedding_size", 128)
        head = self._load_head(backbone, embedding_size, settings.margin, settings.negative_anchors,
                               settings.anchor_seed)
        cfg = TrainConfig(
            epochs=settings.local_epochs,
            batch_size=self.batch_size,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            augment=self.augment,
            seed=self.seed + round_number,
            proximal_mu=settings.proximal_mu,
            l2sp_alpha=settings.l2sp_alpha,
        )
        reference = self._l2sp_reference(round_number, global_tensors, model_spec) if cfg.l2sp_alpha > 0 else None
        result = train_local(backbone, head, self.dataset, cfg, progress=progress, trunk_cache=self._trunk_cache,
                             l2sp_reference=reference)
        tensors = shared_tensors(backbone)
        if not math.isfinite(result.loss):
            raise TrainingDiverged(f"local training loss is {result.loss}")
        problem = first_bad_tensor(tensors) or first_bad_tensor(_numpy(head.state_dict()))
        if problem is not None:
            raise TrainingDiverged(f"local training diverged: {problem}")
        self._save_head(head, embedding_size)
        return RoundResult(tensors, result)

    def prepare(self, settings: TrainSettings) -> None:
        """What the first train_round would compute once, done ahead: the frozen-trunk features of the local images
        (kept across rounds) and the head (imprinted on a pretrained backbone as built), stored."""
        backbone = self._backbone_for(settings.model)
        if has_frozen_trunk(backbone):  # a backbone trained whole has no trunk features to keep
            self._trunk_cache.get(backbone, self.dataset.images, mirrored=self.augment)
        embedding_size = settings.model.get("embedding_size", 128)
        self._save_head(self._load_head(backbone, embedding_size, settings.margin, settings.negative_anchors,
                                        settings.anchor_seed), embedding_size)

    def measure_statistics(self, global_tensors: dict[str, np.ndarray], model_spec: dict[str, Any]
                           ) -> dict[str, np.ndarray]:
        """BatchNorm running statistics of the global model measured on this device's images (forward passes
        only, weights untouched). Only per-channel means and variances leave the device; the aggregator averages
        them with weights n_k (bn_statistics: measured)."""
        backbone = self._backbone_for(model_spec)
        load_shared_tensors(backbone, global_tensors)
        return measure_batchnorm_statistics(backbone, self.dataset.images, self.batch_size, self.seed)

    def deployed(self, model_spec: dict[str, Any], global_tensors: dict[str, np.ndarray]
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(spec, tensors) of the model this device runs: the global model itself (the head is for training)."""
        return model_spec, global_tensors

    def unload(self) -> None:
        """Free the backbone and its trunk features until the next round rebuilds them (what a device short of
        memory does between rounds; a fleet of simulated devices in one process needs it). The head, version 0
        and everything else on disk stay; the next round trains exactly as it would have."""
        self._backbone = None
        self._model_spec = None
        self._built_tensors = None
        self._trunk_cache = TrunkFeatureCache()

    def _backbone_for(self, model_spec: dict[str, Any]):
        # Where this device keeps pretrained weights is its own business, whatever the announcement says.
        spec = {k: v for k, v in model_spec.items() if k not in MACHINE_LOCAL_KWARGS}
        if self._backbone is None or spec != self._model_spec:
            arch = spec.get("arch", "mobilefacenet")
            kwargs = {k: v for k, v in spec.items() if k != "arch"}
            self._backbone = build_backbone(arch, **kwargs)
            self._built_tensors = shared_tensors(self._backbone)  # pretrained weights, for a pretrained backbone
            if self.trunk_precision == "int8" and has_frozen_trunk(self._backbone):
                from model_zoo.export import quantize_trunk

                quantize_trunk(self._backbone, self.dataset.images, self.threads)
            self._model_spec = spec
        return self._backbone

    def _l2sp_reference(self, round_number: int, global_tensors: dict[str, np.ndarray],
                        model_spec: dict[str, Any]) -> dict[str, np.ndarray]:
        """L2-SP's fixed anchor: model version 0, the federation's starting point.

        Round 1 trains from version 0, so its global tensors are kept in the state directory and used from then
        on. A device that first trains in a later round uses the weights build_backbone gives it: for a
        pretrained backbone (faceapi-resnet) these are version 0 too, unless the aggregator started from an
        init_checkpoint. A backbone without pretrained weights has no such anchor on the device: it then falls
        back to the round's global model (FedProx's anchor), with a warning.
        """
        spec = json.dumps({k: v for k, v in model_spec.items() if k not in MACHINE_LOCAL_KWARGS}, sort_keys=True)
        meta_path = self.version0_path.with_suffix(".json")
        if round_number == 1:
            tmp = self.version0_path.with_suffix(".tmp")
            save_numpy_file({k: np.ascontiguousarray(v) for k, v in global_tensors.items()}, str(tmp))
            os.replace(tmp, self.version0_path)
            meta_path.write_text(json.dumps({"model": spec}))
            return global_tensors
        kept = self._kept_version0(spec)
        if kept is not None:
            return kept
        if has_frozen_trunk(self._backbone):
            return self._built_tensors
        log.warning("l2sp_alpha set but model version 0 was never seen here and %s has no pretrained weights: "
                    "pulling towards this round's global model instead", model_spec.get("arch", "mobilefacenet"))
        return global_tensors

    def _kept_version0(self, spec: str) -> dict[str, np.ndarray] | None:
        """Version 0 as kept in round 1, if it is for this model and readable and finite; else None (logged)."""
        meta_path = self.version0_path.with_suffix(".json")
        if not (self.version0_path.exists() and meta_path.exists()):
            return None
        try:
            if json.loads(meta_path.read_text()).get("model") != spec:
                return None
            kept = load_numpy_file(str(self.version0_path))
        except (OSError, ValueError, AttributeError, SafetensorError) as exc:
            problem = f"is unreadable ({type(exc).__name__}: {exc})"
        else:
            bad = first_bad_tensor(kept)
            if bad is None:
                return kept
            problem = f"is not usable: {bad}"
        log.warning("kept model version 0 %s %s: discarded", self.version0_path, problem)
        self.version0_path.unlink(missing_ok=True)
        return None

    def _load_head(self, backbone, embedding_size: int, margin: float, anchors: int = 0,
                   anchor_seed: int = 0) -> ArcFaceHead:
        """This device's head; with anchors > 0, followed by that many announced negative anchors (which are
        generated here from anchor_seed and never stored: see model_zoo/losses/anchors.py)."""
        num_classes = len(self.dataset.identities)
        # A fresh head is reproducible for a given device seed, from this trainer's own generator: trainers
        # running side by side in one process (facefed/inprocess.py) never shift each other's draws.
        gen = torch.Generator().manual_seed(self.seed)
        if anchors > 0:
            head = AnchoredArcFaceHead(embedding_size, num_classes, negative_anchors(anchors, embedding_size, anchor_seed),
                                       margin=margin, generator=gen)
        else:
            head = ArcFaceHead(embedding_size, num_classes, margin=margin, generator=gen)
        stored = self._stored_head(embedding_size)
        if stored is not None:
            try:
                head.load_state_dict(stored)
                return head
            except RuntimeError as exc:  # the announced margin/anchors changed the head's tensors
                self._discard_head(f"does not fit this round's head ({exc})")
        if isinstance(backbone, FrozenTrunk):
            # A random head on a pretrained embedder drags its features toward random directions in the first
            # steps (held-out EER up by a third in one round): start from the class centroids instead.
            imprint_head(head, embed_images(backbone, self.dataset.images), self.dataset.labels)
        return head

    def _stored_head(self, embedding_size: int) -> dict[str, torch.Tensor] | None:
        """The head kept from earlier rounds, if it is for these identities and readable and finite. Anything else
        is discarded with a logged reason and the head is rebuilt: no crash, no manual clean-up."""
        meta_path = self.head_path.with_suffix(".json")
        if not self.head_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("identities") != self.dataset.identities or meta.get("embedding_size") != embedding_size:
                return None  # another dataset or model: a fresh head, as before
            stored = load_file(str(self.head_path))
        except (OSError, ValueError, AttributeError, SafetensorError) as exc:
            self._discard_head(f"is unreadable ({type(exc).__name__}: {exc})")
            return None
        problem = first_bad_tensor(_numpy(stored))
        if problem is not None:
            self._discard_head(f"is not usable: {problem}")
            return None
        return stored

    def _discard_head(self, reason: str) -> None:
        log.warning("stored head %s %s: discarded, a new one is built", self.head_path, reason)
        for path in (self.head_path, self.head_path.with_suffix(".json")):
            path.unlink(missing_ok=True)

    def _save_head(self, head: ArcFaceHead, embedding_size: int) -> None:
        # The head stays on the device: written here, never published. Never stored non-finite (checked by the
        # caller).
        save_private(self.head_path, _numpy(head.state_dict()),
                     {"identities": self.dataset.identities, "embedding_size": embedding_size})


def save_private(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """What a device keeps to itself (a head, a personal part): the tensors at path, readable by its user only,
    then meta at path.json, each written whole; tensors first, so a crash between the two leaves tensors whose
    metadata is re-checked on the next load."""
    tmp = path.with_suffix(".tmp")
    save_numpy_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    meta_tmp = path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, path.with_suffix(".json"))


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy() for name, value in state.items()}
