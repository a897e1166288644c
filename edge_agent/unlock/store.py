"""The owner's templates on the device: <store>/<name>.safetensors (aligned chips and embeddings) plus
<name>.json (who, which model made the embeddings and the score they compare by, when). Never a pickle, never uploaded.

The folder is 0700 and every file 0600, written through a temporary file and renamed so a reader never sees
half a template. Loading refuses a store that other users can read, as ssh refuses a readable key. The
aligned chips are kept so the templates can be re-embedded when the model changes (edge_agent.unlock.reembed).
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from model_zoo import align

from .analyzer import ModelRef
from .calibration import mean_template

STORE_FORMAT = "facefed-unlock-templates"
DIR_MODE, FILE_MODE = 0o700, 0o600
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class StoreError(ValueError):
    """The template store is missing, unsafe or does not fit the model in use."""


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be 1-64 of [A-Za-z0-9_.-] starting with a letter or digit, got {name!r}")
    return name


@dataclass
class Enrolment:
    name: str
    chips: np.ndarray  # uint8 [N, 112, 112, 3] RGB ArcFace-aligned crops
    embeddings: np.ndarray  # float32 [N, D] made by `model`: L2-normalised, or raw when model.score is l2
    model: ModelRef
    model_version: int | None = None  # set when a federated global model re-embedded the chips
    updated: str = ""  # ISO 8601 UTC

    def __post_init__(self) -> None:
        validate_name(self.name)
        size = align.ARCFACE_SIZE
        if self.chips.dtype != np.uint8 or self.chips.ndim != 4 or self.chips.shape[1:] != (size, size, 3):
            raise ValueError(f"chips must be uint8 [N, {size}, {size}, 3], got {self.chips.dtype} {self.chips.shape}")
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.chips) or not len(self.chips):
            raise ValueError(f"need one embedding per chip and at least one, got {self.embeddings.shape} "
                             f"for {len(self.chips)} chips")

    def template(self) -> np.ndarray:
        return mean_template(self.embeddings, self.model.score)


class TemplateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, name: str) -> tuple[Path, Path]:
        validate_name(name)
        return self.root / f"{name}.safetensors", self.root / f"{name}.json"

    def save(self, enrolment: Enrolment) -> None:
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, DIR_MODE)  # mkdir's mode is filtered by the umask, and an existing folder keeps its own
        enrolment.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        tensors_path, meta_path = self._paths(enrolment.name)
        meta = {"format": STORE_FORMAT, "name": enrolment.name, "model": asdict(enrolment.model),
                "model_version": enrolment.model_version, "updated": enrolment.updated,
                "templates": len(enrolment.chips), "embedding_size": int(enrolment.embeddings.shape[1])}
        _write_private(tensors_path, save_safetensors({"chips": np.ascontiguousarray(enrolment.chips),
                                                       "embeddings": enrolment.embeddings.astype(np.float32)}))
        _write_private(meta_path, (json.dumps(meta, indent=2) + "\n").encode())

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if (self.root / f"{p.stem}.safetensors").is_file())

    def load(self, name: str) -> Enrolment:
        tensors_path, meta_path = self._paths(name)
        for path in (self.root, tensors_path, meta_path):
            _check_private(path)
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{meta_path} is not a {STORE_FORMAT} file")
        tensors = load_safetensors(tensors_path.read_bytes())
        return Enrolment(meta["name"], tensors["chips"], tensors["embeddings"], ModelRef(**meta["model"]),
                         meta.get("model_version"), meta.get("updated", ""))

    def load_all(self) -> list[Enrolment]:
        names = self.names()
        if not names:
            raise StoreError(f"no enrolment in {self.root}: run `facefed-agent enroll --name NAME --source SRC "
                             f"--store {self.root}` first")
        return [self.load(name) for name in names]


class FrameStore:
    """Camera frames of enrolled people kept at successful unlocks, for camera training (train.method camera,
    edge_agent/camera_trainer.py reads <root>/<name>/ as its `data`): each unlock's matched, aligned chips as
    PNG files, 0600 in 0700 folders like the templates, at most `limit` per person (the oldest go first)."""

    def __init__(self, root: str | Path, limit: int) -> None:
        self.root, self.limit = Path(root), limit

    def keep(self, name: str, chips: list[np.ndarray]) -> int:
        """Store these chips of `name`; returns how many frames of them the folder now holds."""
        import cv2

        folder = self.root / validate_name(name)
        for path in (self.root, folder):
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(path, DIR_MODE)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        for i, chip in enumerate(chips):
            ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(chip), cv2.COLOR_RGB2BGR))
            if ok:
                _write_private(folder / f"{stamp}-{i:02d}.png", png.tobytes())
        frames = sorted(folder.glob("*.png"))  # time-stamped names: oldest first
        for old in frames[:max(0, len(frames) - self.limit)]:
            old.unlink()
        return min(len(frames), self.limit)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # O_CREAT's mode is filtered by the umask; a stale tmp keeps its own
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _check_private(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if os.name != "posix":
        return  # Windows has ACLs instead of mode bits
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        wanted = DIR_MODE if path.is_dir() else FILE_MODE
        raise StoreError(f"{path} is accessible to other users (mode {mode:04o}): templates are biometric data; "
                         f"run `chmod {wanted:04o} {path}`")
