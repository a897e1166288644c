"""The aggregator's state directory: one checkpoint per completed round and a rounds log.

Layout:
    STATE/checkpoints/round-0000.safetensors   initial global model (model version 0)
    STATE/checkpoints/round-0007.safetensors   global model after round 7 (model version 7)
    STATE/rounds.jsonl                         one JSON object per completed round
    STATE/open-round/accepted-0003.safetensors the 3rd update accepted in the open round
A checkpoint is written to a temporary name and renamed, and only then is the round
logged, so a crash at any point leaves the last completed round intact for a restart.

Every update of the open round is written to open-round/ (fsynced, renamed into place) before
the device gets its ack, and replayed into the strategy after a restart, so an acknowledged
update is never lost. The folder is emptied once the round's checkpoint is written; entries of
any other round are stale and deleted at restart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save, save_file

from model_zoo.checkpoint_file import BackboneSpec, read_checkpoint, write_checkpoint

_CHECKPOINT_RE = re.compile(r"round-(\d{4,})\.safetensors$")
_ACCEPTED_RE = re.compile(r"accepted-(\d{4,})\.safetensors$")


@dataclass
class AcceptedUpdate:
    """One update of the open round as it entered the strategy (after codec decoding)."""

    device_id: str
    transfer_id: str
    num_samples: int
    train_loss: float | None
    tensors: dict[str, np.ndarray]


class StateDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.log_path = self.root / "rounds.jsonl"
        self.open_round = self.root / "open-round"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.open_round.mkdir(exist_ok=True)

    def checkpoint_path(self, round_number: int) -> Path:
        return self.checkpoints / f"round-{round_number:04d}.safetensors"

    def completed_rounds(self) -> list[int]:
        rounds = []
        for path in self.checkpoints.iterdir():
            match = _CHECKPOINT_RE.search(path.name)
            if match:
                rounds.append(int(match.group(1)))
        return sorted(rounds)

    def latest_round(self) -> int | None:
        rounds = self.completed_rounds()
        return rounds[-1] if rounds else None

    @property
    def optimizer_path(self) -> Path:
        return self.root / "server_optimizer.safetensors"

    def save_round(self, round_number: int, tensors: dict[str, np.ndarray], spec: BackboneSpec, meta: dict[str, Any],
                   log_entry: dict[str, Any] | None, optimizer_state: dict[str, np.ndarray] | None = None) -> Path:
        """Atomically write the server optimizer state and the round's global model, then its log line."""
        if optimizer_state:
            tmp = self.optimizer_path.with_suffix(".tmp")
            save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp),
                      metadata={"round": str(round_number)})
            os.replace(tmp, self.optimizer_path)
        path = self.checkpoint_path(round_number)
        tmp = path.with_suffix(".tmp")
        write_checkpoint(tmp, tensors, spec, {**meta, "round": round_number})
        _fsync_path(tmp)  # the open round's accepted updates are deleted once this file stands
        os.replace(tmp, path)
        if log_entry is not None:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(log_entry, sort_keys=True) + "\n")
                log.flush()
                os.fsync(log.fileno())
        return path

    def load_round(self, round_number: int) -> dict[str, np.ndarray]:
        return read_checkpoint(self.checkpoint_path(round_number))[0]

    def load_optimizer_state(self, round_number: int) -> dict[str, np.ndarray]:
        """The server optimizer state saved with `round_number`; {} if none or from another round."""
        if not self.optimizer_path.exists():
            return {}
        with safe_open(str(self.optimizer_path), framework="numpy") as f:
            if (f.metadata() or {}).get("round") != str(round_number):
                return {}  # a crash landed between the two writes: restart the momentum
            return {name: f.get_tensor(name) for name in f.keys()}

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        entries = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries

    # ---- the open round's accepted updates ------------------------------------

    def save_accepted(self, round_number: int, model_version: int, update: AcceptedUpdate) -> Path:
        """Durably record an accepted update (fsynced file, atomic rename, fsynced folder) before its ack."""
        existing = self._accepted_paths()
        sequence = int(_ACCEPTED_RE.fullmatch(existing[-1].name).group(1)) + 1 if existing else 1
        path = self.open_round / f"accepted-{sequence:04d}.safetensors"
        entry = {"round": round_number, "model_version": model_version, "device_id": update.device_id,
                 "transfer_id": update.transfer_id, "num_samples": update.num_samples, "train_loss": update.train_loss}
        blob = save({k: np.ascontiguousarray(v) for k, v in update.tensors.items()},
                    metadata={"entry": json.dumps(entry, sort_keys=True)})
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(self.open_round)
        return path

    def load_accepted(self, round_number: int, model_version: int) -> Iterator[AcceptedUpdate]:
        """The recorded updates of this round, one at a time in acceptance order; records of any other
        round are deleted."""
        for path in self._accepted_paths():
            with safe_open(str(path), framework="numpy") as f:
                entry = json.loads((f.metadata() or {})["entry"])
                if (entry["round"], entry["model_version"]) != (round_number, model_version):
                    path.unlink()  # a crash after the round's checkpoint, before this was cleared
                    continue
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            yield AcceptedUpdate(entry["device_id"], entry["transfer_id"], entry["num_samples"], entry["train_loss"],
                                 tensors)

    def clear_accepted(self) -> None:
        for path in self.open_round.iterdir():
            path.unlink()

    def _accepted_paths(self) -> list[Path]:
        numbered = [(int(m.group(1)), p) for p in self.open_round.iterdir() if (m := _ACCEPTED_RE.fullmatch(p.name))]
        return [path for _, path in sorted(numbered)]


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
