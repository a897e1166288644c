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

    def save_round(self, round_number: int, backbone, meta: dict[str, Any], log_entry: dict[str, Any] | None) -> Path:
        """Atomically write the round's global model, then append its log line."""
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

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        entries = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries
