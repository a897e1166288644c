"""The unlock decision: a verdict per frame, then a lock state machine over time. Pure, no I/O.

Rules (DecisionRules):
- score: the model's (model_zoo.backbones.model_score), higher = more alike: a cosine in [-1, 1], or l2, minus
  the euclidean distance of raw descriptors (<= 0). threshold and multi_face_margin are in that score's units.
- frame verdict: one face scoring >= threshold matches. With several faces, a frame matches only when the
  best scores >= threshold + multi_face_margin and every other face scores below threshold (so a crowd
  with the owner somewhere in it does not unlock, and neither does one of two look-alikes).
- unlock: at least k matching frames among the last n frames that held a face, and the liveness challenge
  passed, within one attempt.
- attempt: starts at the first frame with a face while locked; if it has not unlocked after timeout_s it
  fails and a new attempt starts (window and liveness cleared).
- lockout: after lockout_failures failed attempts in a row, nothing unlocks for lockout_s seconds.
- relock: once unlocked, the state returns to locked when no frame has matched for relock_after_s.
Times are seconds on the caller's clock: wall time for a camera, frame index / fps for a file.
"""
from __future__ import annotations

from collections import deque
import math
from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    NO_FACE = "no_face"
    MATCH = "match"
    NO_MATCH = "no_match"
    AMBIGUOUS = "ambiguous"  # several faces and none matches clearly


class LockState(str, Enum):
    LOCKED = "locked"
    UNLOCKED = "unlocked"
    LOCKED_OUT = "locked_out"


class Event(str, Enum):
    UNLOCKED = "unlocked"
    RELOCKED = "relocked"
    ATTEMPT_FAILED = "attempt_failed"
    LOCKED_OUT = "locked_out"
    LOCKOUT_ENDED = "lockout_ended"


# After these the liveness challenge must be passed afresh.
CHALLENGE_RESET_EVENTS = frozenset({Event.RELOCKED, Event.ATTEMPT_FAILED, Event.LOCKED_OUT, Event.LOCKOUT_ENDED})


# The range a threshold can sensibly take per score. l2: the raw face-api descriptors have norm about 1, so
# distances lie in [0, 2]; a threshold below -2 would accept everyone.
THRESHOLD_RANGES = {"cosine": (-1.0, 1.0), "l2": (-2.0, 0.0)}
# The best face's lead over the threshold with several faces in view. cosine: 0.05; l2: the same share of the
# gap between the median genuine and impostor template scores (bench/unlock_bench.py, BENCHMARKS.md).
MULTI_FACE_MARGINS = {"cosine": 0.05, "l2": 0.11}


@dataclass(frozen=True)
class DecisionRules:
    threshold: float  # score against the owner's template, calibrated for a stated FAR
    score: str = "cosine"  # what threshold is on (THRESHOLD_RANGES)
    k: int = 3
    n: int = 5
    timeout_s: float = 10.0
    lockout_failures: int = 5
    lockout_s: float = 30.0
    relock_after_s: float = 2.0
    multi_face_margin: float | None = None  # None: MULTI_FACE_MARGINS[score]

    def __post_init__(self) -> None:
        if self.score not in THRESHOLD_RANGES:
            raise ValueError(f"unknown score {self.score!r}; available: {', '.join(THRESHOLD_RANGES)}")
        low, high = THRESHOLD_RANGES[self.score]
        if not (math.isfinite(self.threshold) and low <= self.threshold <= high):
            what = "a cosine similarity" if self.score == "cosine" else "minus a euclidean distance (l2 score)"
            raise ValueError(f"threshold is {what} in [{low:g}, {high:g}], got {self.threshold}")
        if self.multi_face_margin is None:
            object.__setattr__(self, "multi_face_margin", MULTI_FACE_MARGINS[self.score])  # frozen dataclass
        if not 1 <= self.k <= self.n:
            raise ValueError(f"need 1 <= k <= n, got k={self.k}, n={self.n}")
        if self.timeout_s <= 0 or self.lockout_s < 0 or self.relock_after_s < 0 or self.multi_face_margin < 0:
            raise ValueError("timeout_s must be > 0; lockout_s, relock_after_s and multi_face_margin >= 0")
        if self.lockout_failures < 1:
            raise ValueError(f"lockout_failures must be >= 1, got {self.lockout_failures}")


def frame_verdict(scores: list[float], rules: DecisionRules) -> Verdict:
    """The verdict of one frame from each detected face's similarity to the owner."""
    if not scores:
        return Verdict.NO_FACE
    ranked = sorted(scores, reverse=True)
    if len(ranked) == 1:
        return Verdict.MATCH if ranked[0] >= rules.threshold else Verdict.NO_MATCH
    if ranked[0] >= rules.threshold + rules.multi_face_margin and ranked[1] < rules.threshold:
        return Verdict.MATCH
    return Verdict.AMBIGUOUS if ranked[0] >= rules.threshold else Verdict.NO_MATCH


@dataclass(frozen=True)
class Decision:
    state: LockState
    event: Event | None
    matches_in_window: int  # MATCH frames among the last n face frames of the attempt
    failures: int  # failed attempts in a row
    lockout_until: float | None


class UnlockStateMachine:
    def __init__(self, rules: DecisionRules) -> None:
        self.rules = rules
        self.state = LockState.LOCKED
        self.failures = 0
        self.lockout_until: float | None = None
        self.last_verified: float | None = None
        self._attempt_start: float | None = None
        self._window: deque[bool] = deque(maxlen=rules.n)

    def step(self, t: float, verdict: Verdict, live: bool) -> Decision:
        """Advance to time t with this frame's verdict and whether the liveness challenge is passed."""
        if self.state is LockState.LOCKED_OUT:
            event = self._step_locked_out(t)
        elif self.state is LockState.UNLOCKED:
            event = self._step_unlocked(t, verdict)
        else:
            event = self._step_locked(t, verdict, live)
        return Decision(self.state, event, sum(self._window), self.failures, self.lockout_until)

    def _step_locked_out(self, t: float) -> Event | None:
        if t < self.lockout_until:
            return None  # frames during a lockout are not even counted
        self.state, self.lockout_until, self.failures = LockState.LOCKED, None, 0
        return Event.LOCKOUT_ENDED

    def _step_unlocked(self, t: float, verdict: Verdict) -> Event | None:
        if verdict is Verdict.MATCH:
            self.last_verified = t
            return None
        if t - self.last_verified < self.rules.relock_after_s:
            return None
        self.state = LockState.LOCKED
        self._end_attempt()
        return Event.RELOCKED

    def _step_locked(self, t: float, verdict: Verdict, live: bool) -> Event | None:
        if self._attempt_start is None:
            if verdict is Verdict.NO_FACE:
                return None
            self._attempt_start = t
        if verdict is not Verdict.NO_FACE:
            self._window.append(verdict is Verdict.MATCH)
        if verdict is Verdict.MATCH and live and sum(self._window) >= self.rules.k:
            self.state, self.last_verified, self.failures = LockState.UNLOCKED, t, 0
            return Event.UNLOCKED
        if t - self._attempt_start < self.rules.timeout_s:
            return None
        self._end_attempt()
        self.failures += 1
        if self.failures < self.rules.lockout_failures:
            return Event.ATTEMPT_FAILED
        self.state, self.lockout_until = LockState.LOCKED_OUT, t + self.rules.lockout_s
        return Event.LOCKED_OUT

    def _end_attempt(self) -> None:
        self._attempt_start = None
        self._window.clear()
