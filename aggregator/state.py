"""The aggregator's state directory: one checkpoint per completed round and a rounds log.

Layout:
    STATE/checkpoints/round-0000.safetensors   initial global model (model version 0)
    STATE/checkpoints/round-0007.safetensors   global model after round 7 (model version 7)
    STATE/rounds.jsonl                         one JSON object per completed round
A checkpoint is written to a temporary name and renamed, and only then is the round
logged, so a crash at any point leaves the last completed round intact for a restart.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model_zoo.checkpoint import load_checkpoint, save_checkpoint, shared_tensors

_CHECKPOINT_RE = re.compile(r"round-(\d{4,})\.safetensors$")


class StateDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.log_path = self.root / "rounds.jsonl"
        self.checkpoints.mkdir(parents=True, exist_ok=True)

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

    def save_round(self, round_number: int, backbone, meta: dict[str, Any], log_entry: dict[str, Any] | None,
                   optimizer_state: dict[str, np.ndarray] | None = None) -> Path:
        """Atomically write the server optimizer state and the round's global model, then its log line."""
        if optimizer_state:
            tmp = self.optimizer_path.with_suffix(".tmp")
            save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp),
                      metadata={"round": str(round_number)})
            os.replace(tmp, self.optimizer_path)
        path = self.checkpoint_path(round_number)
        tmp = path.with_suffix(".tmp")
        save_checkpoint(tmp, backbone, {**meta, "round": round_number})
        os.replace(tmp, path)
        if log_entry is not None:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(log_entry, sort_keys=True) + "\n")
                log.flush()
                os.fsync(log.fileno())
        return path

    def load_round(self, round_number: int) -> dict[str, np.ndarray]:
        backbone, _ = load_checkpoint(self.checkpoint_path(round_number))
        return shared_tensors(backbone)

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
