"""What an agent refuses although the aggregator's signature on it verifies: stale messages and non-finite models.

A signature says "the aggregator wrote this", not "this is current" nor "this is sane". Freshness
(PROTOCOL.md 8.2): the agent accepts only announcements at or above the newest it accepted, ordered by
(federation, round, model version), that have not expired, and only global models at or above the newest
version it accepted or was asked to train from; that mark survives restarts (state_dir/freshness.json,
written atomically). Sanity: a model, loss or head with a NaN or Inf (or a negative BatchNorm variance) is
never trained on, uploaded or stored. The checks are pure functions; the agent reports their reasons.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedwire.messages import RoundAnnouncement

log = logging.getLogger("facefed.agent")

FRESHNESS_FILE = "freshness.json"


@dataclass(frozen=True)
class Watermark:
    """The newest round announcement and global model this device accepted."""

    federation: float = 0.0  # the announcement's `federation` (0: an aggregator that does not send one)
    round: int = 0
    model_version: int = 0  # the model version that announcement trains from
    global_version: int = 0  # the newest global model accepted in this federation

    @property
    def announced(self) -> tuple[float, int, int]:
        return (self.federation, self.round, self.model_version)

    @property
    def global_floor(self) -> int:
        """Oldest global model version still acceptable: none older than one already held or asked for."""
        return max(self.global_version, self.model_version)


def announcement_refusal(mark: Watermark, ann: RoundAnnouncement, now: float, max_clock_skew_s: float) -> str | None:
    """Why a validly signed announcement must not be used, or None. `now` is this device's clock, trusted only
    to within max_clock_skew_s."""
    if ann.expires is not None and ann.expires + max_clock_skew_s < now:
        return (f"round {ann.round} announcement expired {now - ann.expires:.0f} s ago by this device's clock "
                f"(more than max_clock_skew_s {max_clock_skew_s:.0f} s): a replay")
    if ann.freshness < mark.announced:
        if ann.freshness[0] < mark.federation:
            return f"round {ann.round} announcement is from an earlier federation than the one this device follows"
        return (f"round {ann.round} (model v{ann.model_version}) is older than round {mark.round} "
                f"(model v{mark.model_version}) already accepted: a replay")
    return None


def after_announcement(mark: Watermark, ann: RoundAnnouncement) -> Watermark:
    """The mark once `ann` (which passed announcement_refusal) is accepted."""
    federation, round_number, version = ann.freshness
    global_version = mark.global_version if federation == mark.federation else 0  # a new federation starts over
    return Watermark(federation, round_number, version, global_version)


def global_refusal(mark: Watermark, version: int) -> str | None:
    if version < mark.global_floor:
        return f"global model v{version} is older than v{mark.global_floor} already accepted: a replay"
    return None


def after_global(mark: Watermark, version: int) -> Watermark:
    return dataclasses.replace(mark, global_version=max(mark.global_version, version))


def load_watermark(state_dir: Path) -> Watermark:
    """The persisted mark; a missing or unreadable file gives the empty mark (logged), never a crash."""
    path = Path(state_dir) / FRESHNESS_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        mark = Watermark(float(obj["federation"]), int(obj["round"]), int(obj["model_version"]),
                         int(obj["global_version"]))
    except FileNotFoundError:
        return Watermark()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): starting freshness checks from nothing", path, exc)
        return Watermark()
    if not math.isfinite(mark.federation):
        log.warning("%s holds a non-finite federation: starting freshness checks from nothing", path)
        return Watermark()
    return mark


def save_watermark(state_dir: Path, mark: Watermark) -> None:
    """Written to a temporary file, fsynced, then renamed: a crash leaves the old mark or the new one."""
    path = Path(state_dir) / FRESHNESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(dataclasses.asdict(mark), out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def first_bad_tensor(tensors: Mapping[str, np.ndarray]) -> str | None:
    """Why these tensors must not be used: the first NaN/Inf or negative BatchNorm variance, or None."""
    for name, value in tensors.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"{name} holds NaN or Inf"
        if "running_var" in name and (value < 0).any():
            return f"{name} holds a negative BatchNorm variance"
    return None

