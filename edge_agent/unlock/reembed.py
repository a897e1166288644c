"""Keep the enrolment valid when the federation changes the model (called by the agent for each new global
model): the stored aligned chips are embedded again by the new model, which is saved next to them as a
checkpoint so that `unlock` runs the model the templates came from. The chips never leave the device."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model_zoo.backbones import MACHINE_LOCAL_KWARGS, build_backbone
from model_zoo.checkpoint import load_shared_tensors, save_checkpoint

from .analyzer import load_model
from .store import TemplateStore

log = logging.getLogger("facefed.unlock")

GLOBAL_MODEL_GLOB = "global-v*.safetensors"


def global_model_path(store_dir: Path, model_version: int) -> Path:
    return Path(store_dir) / f"global-v{model_version}.safetensors"


def reembed_enrolment(store_dir: Path, model: Callable[[], tuple[dict, dict[str, np.ndarray]]],
                      model_version: int) -> int:
    """Re-embed every enrolment in store_dir with the device's model of global version `model_version`, which
    model() gives as (spec, tensors) only when needed; returns how many were updated (0 when there is no
    enrolment or all are already at that version)."""
    store = TemplateStore(store_dir)
    if not store.names():
        return 0
    enrolments = [e for e in store.load_all() if e.model_version != model_version]
    if not enrolments:
        return 0
    model_spec, tensors = model()
    spec = {k: v for k, v in model_spec.items() if k not in MACHINE_LOCAL_KWARGS}
    backbone = build_backbone(spec.pop("arch", "mobilefacenet"), **spec)
    load_shared_tensors(backbone, tensors)
    path = global_model_path(store.root, model_version)
    save_checkpoint(path, backbone, {"model_version": model_version})
    embedder, model = load_model(path)
    for enrolment in enrolments:
        enrolment.embeddings = embedder.embed(enrolment.chips)
        enrolment.model, enrolment.model_version = model, model_version
        store.save(enrolment)
    for old in store.root.glob(GLOBAL_MODEL_GLOB):
        if old != path:
            old.unlink()
    log.info("re-embedded %d enrolment(s) with global model v%d", len(enrolments), model_version)
    return len(enrolments)
