"""The unlock loop: frames -> faces -> similarity to the enrolled owner(s) -> verdict -> lock state, with a
JSON record per frame, an annotated video, a window, and a log line per decision."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model_zoo.metrics import score_matrix

from .analyzer import FaceAnalyzer
from .decision import (CHALLENGE_RESET_EVENTS, Decision, DecisionRules, Event, LockState, UnlockStateMachine,
                       Verdict, frame_verdict)
from .geometry import mean_eye_aspect_ratio
from .liveness import LivenessChallenge
from .overlay import FaceLabel, VideoOut, Window, annotate
from .sources import Frame, FrameSource
from .store import Enrolment, FrameStore

log = logging.getLogger("facefed.unlock")

# A fallback (the device's PIN or passcode) confirms the person of the rejected attempt just before it: within
# FALLBACK_WINDOW_S after the attempt failed, and only its near misses, at most FALLBACK_FRAMES of them, the
# latest. A near miss is a single face scoring at most FALLBACK_MARGINS[score] below the threshold: on the
# camera-quick fleets (bench/unlock_frames.py) cosine 0.02 takes 56-74 % of the owner's rejected frames and
# 1-8 % of strangers' frames; the multi-face margin (0.05) would take 18-38 % of strangers'.
FALLBACK_MARGINS = {"cosine": 0.02, "l2": 0.07}
FALLBACK_WINDOW_S = 30.0
FALLBACK_FRAMES = 10


@dataclass
class FaceRecord:
    box: list[float]
    name: str  # the enrolled person it is closest to
    score: float  # to that person's template, in the model's score (DecisionRules.score)
    ear: float  # eye aspect ratio, for the liveness trace


@dataclass
class FrameRecord:
    """One line of --json-log."""

    frame: int
    t: float  # seconds: wall clock for live sources, frame index / fps for files
    faces: list[FaceRecord]
    score: float | None  # best face's score
    name: str | None
    verdict: str
    live: bool  # liveness challenge passed in this attempt
    liveness: str
    state: str  # "locked" or "unlocked" (a lockout is locked, with lockout true)
    lockout: bool
    event: str | None  # unlocked, relocked, attempt_failed, locked_out, lockout_ended
    ms: float  # processing time of this frame
    stage_ms: dict[str, float] = field(default_factory=dict)  # detect, landmarks, align, embed, decide
    reason: str = ""  # why the device is locked, waiting or unlocked after this frame, in words (frame_reason)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def frame_reason(verdict: Verdict, decision: Decision, best: FaceRecord | None, faces: int, rules: DecisionRules,
                 challenge: LivenessChallenge) -> str:
    """Why unlock is where it is after a frame: unlocked, locked out, no face, several faces, no match (with the
    score), waiting for the liveness challenge, or still counting matching frames. Pure."""
    if decision.state is LockState.LOCKED_OUT:
        return f"locked out after {rules.lockout_failures} failed attempts"
    if decision.state is LockState.UNLOCKED:
        return "unlocked" + (f": {best.name} {best.score:.3f}" if verdict is Verdict.MATCH and best else "")
    if verdict is Verdict.NO_FACE:
        return "no face"
    if verdict is Verdict.AMBIGUOUS:
        return f"several faces ({faces}), none clearly the owner"
    if verdict is Verdict.NO_MATCH:
        return f"no match: best {best.name} {best.score:.3f} < threshold {rules.threshold:.3f}"
    if not challenge.passed:
        return f"{challenge.status} ({best.name} {best.score:.3f})"
    return f"matching: {decision.matches_in_window} of {rules.k} frames needed"


class UnlockSession:
    def __init__(self, analyzer: FaceAnalyzer, enrolments: list[Enrolment], rules: DecisionRules,
                 challenge: LivenessChallenge, aligned: bool = False, frames: FrameStore | None = None) -> None:
        """aligned: the frames are ArcFace-aligned crops (FaceAnalyzer.analyze_aligned), not camera frames.
        frames: where each unlock keeps the chips of its attempt's frames that matched the person it unlocked
        for (camera training's owner frames); None keeps nothing."""
        if not enrolments:
            raise ValueError("no enrolled owner to unlock for")
        for enrolment in enrolments:
            if enrolment.model.sha256 != analyzer.model.sha256:
                raise ValueError(
                    f"{enrolment.name}'s templates were made by {enrolment.model.label} (sha256 "
                    f"{enrolment.model.sha256[:12]}), but unlock runs {analyzer.model.label} (sha256 "
                    f"{analyzer.model.sha256[:12]}): enrol again with this --model")
            if enrolment.model.score != analyzer.model.score:
                raise ValueError(f"{enrolment.name}'s templates were made for {enrolment.model.score} scores, but "
                                 f"{analyzer.model.label} compares by {analyzer.model.score}: enrol again "
                                 f"(`facefed-agent enroll --name {enrolment.name}`)")
        if rules.score != analyzer.model.score:
            raise ValueError(f"the threshold is a {rules.score} score, but {analyzer.model.label} compares by "
                             f"{analyzer.model.score}: run `facefed-agent calibrate` again or pass --threshold")
        self.analyzer = analyzer
        self.names = [e.name for e in enrolments]
        self.templates = np.stack([e.template() for e in enrolments])  # [people, D]
        self.rules = rules
        self.challenge = challenge
        self.machine = UnlockStateMachine(rules)
        self.aligned = aligned
        self.frames = frames
        self._matched: list[tuple[str, np.ndarray]] = []  # (name, chip) of this attempt's matching frames
        self._near_misses: list[tuple[str, np.ndarray]] = []  # this attempt's single faces just below the threshold
        self._rejected: tuple[float, list[tuple[str, np.ndarray]]] | None = None  # (failed at, near misses)

    def process(self, frame: Frame) -> tuple[FrameRecord, list[FaceLabel]]:
        faces, times = self.analyzer.analyze_aligned(frame.rgb) if self.aligned else self.analyzer.analyze(frame.rgb)
        start = time.perf_counter()
        records = []
        for face in faces:
            similarity = score_matrix(self.templates, face.embedding[None], self.rules.score)[0]
            best = int(np.argmax(similarity))
            records.append(FaceRecord([round(v, 1) for v in face.box], self.names[best], float(similarity[best]),
                                      mean_eye_aspect_ratio(face.landmarks)))
        verdict = frame_verdict([r.score for r in records], self.rules)
        candidate = max(range(len(faces)), key=lambda i: records[i].score) if faces else None
        # The challenge must be passed by the face that matches: a stranger's blink followed by the owner's
        # photo must not count, so any frame with faces but no match starts the challenge again.
        if verdict is Verdict.MATCH:
            live = self.challenge.observe(frame.time_s, faces[candidate].landmarks)
        else:
            if verdict is not Verdict.NO_FACE:
                self.challenge.reset()
            live = self.challenge.observe(frame.time_s, None)
        decision = self.machine.step(frame.time_s, verdict, live)
        if decision.event in CHALLENGE_RESET_EVENTS:
            self.challenge.reset()
        self._keep_frames(frame.time_s, verdict, decision, records[candidate] if len(faces) == 1 else None,
                          records[candidate].name if candidate is not None else None,
                          faces[candidate].chip if candidate is not None else None)
        stage_ms = {**times.ms, "decide": (time.perf_counter() - start) * 1000.0}
        best = records[candidate] if candidate is not None else None
        record = FrameRecord(
            frame=frame.index, t=round(frame.time_s, 4), faces=records,
            score=None if best is None else best.score, name=None if best is None else best.name,
            verdict=verdict.value, live=self.challenge.passed, liveness=self.challenge.status,
            state="unlocked" if decision.state is LockState.UNLOCKED else "locked",
            lockout=decision.state is LockState.LOCKED_OUT,
            event=None if decision.event is None else decision.event.value,
            ms=round(sum(stage_ms.values()), 2), stage_ms={k: round(v, 2) for k, v in stage_ms.items()},
            reason=frame_reason(verdict, decision, best, len(faces), self.rules, self.challenge))
        if decision.event is not None:
            log.info("frame %d t=%.2fs: %s (%s score %s, %d/%d matching frames, %s, %d failed attempt(s))",
                     frame.index, frame.time_s, decision.event.value, record.name or "no face",
                     "-" if record.score is None else f"{record.score:.3f}", decision.matches_in_window,
                     self.rules.n, self.challenge.status, decision.failures)
        labels = [FaceLabel(tuple(f.box), f"{f.name} {f.score:.2f}", f.score >= self.rules.threshold) for f in records]
        return record, labels


    def _keep_frames(self, t: float, verdict: Verdict, decision: Decision, single: FaceRecord | None,
                     name: str | None, chip: np.ndarray | None) -> None:
        """Collect the attempt's matching chips while locked; an unlock hands those of the person it unlocked for
        to the frame store (that person just proved who they are: k matching frames and the liveness check).
        A failed attempt's near misses wait FALLBACK_WINDOW_S for owner_confirmed."""
        if self.frames is None:
            return
        attempting = decision.state is not LockState.UNLOCKED or decision.event is Event.UNLOCKED
        if verdict is Verdict.MATCH and attempting:  # not the frames while it stays unlocked
            self._matched.append((name, chip))
        elif (verdict is Verdict.NO_MATCH and single is not None and decision.state is LockState.LOCKED
              and single.score >= self.rules.threshold - FALLBACK_MARGINS[self.rules.score]):
            self._near_misses.append((name, chip))
        if decision.event is Event.UNLOCKED:
            chips = [c for n, c in self._matched if n == name]
            held = self.frames.keep(name, chips)
            log.info("kept %d frame(s) of %s for camera training (%d held)", len(chips), name, held)
        if decision.event is not None:
            failed = decision.event in (Event.ATTEMPT_FAILED, Event.LOCKED_OUT) and self._near_misses
            self._rejected = (t, self._near_misses) if failed else None
            self._matched, self._near_misses = [], []

    def owner_confirmed(self, name: str, t: float) -> int:
        """The device's own fallback (its PIN or passcode, checked outside this kit) confirmed `name` at time t
        (the frames' clock): the near misses (FALLBACK_MARGINS) of the attempt that failed just before, whose
        closest template is `name`, are kept for camera training like an unlock's frames (the hard frames
        successful unlocks never keep). Returns how many were kept: 0 with no frame store, no failed attempt within FALLBACK_WINDOW_S
        before t, or none of its near misses closest to `name`."""
        if self.frames is None or self._rejected is None or name not in self.names:
            return 0
        failed_at, near_misses = self._rejected
        self._rejected = None
        if not 0.0 <= t - failed_at <= FALLBACK_WINDOW_S:
            return 0
        chips = [c for n, c in near_misses if n == name][-FALLBACK_FRAMES:]
        if chips:
            held = self.frames.keep(name, chips)
            log.info("kept %d frame(s) of %s after a fallback confirmed them (%d held)", len(chips), name, held)
        return len(chips)


@dataclass
class UnlockSummary:
    frames: int
    events: list[tuple[int, float, str]]  # (frame, t, event)
    states: Counter  # frames per state
    stage_ms: list[dict[str, float]] = field(default_factory=list)  # per frame, for the latency split

    def median_ms(self) -> dict[str, float]:
        """Median per stage and of the whole frame ("total") over the frames processed."""
        if not self.stage_ms:
            return {}
        stages = {k: float(np.median([ms[k] for ms in self.stage_ms])) for k in self.stage_ms[0]}
        return {**stages, "total": float(np.median([sum(ms.values()) for ms in self.stage_ms]))}


def run_unlock(session: UnlockSession, source: FrameSource, save: Path | None = None, json_log: Path | None = None,
               show_window: bool = True, on_frame: Callable[[FrameRecord], None] | None = None) -> UnlockSummary:
    """on_frame: called with every frame's record (the command prints the reason when it changes)."""
    video = VideoOut(save, source.info.fps) if save else None
    window = Window() if show_window else None
    log_file = json_log.open("w", encoding="utf-8") if json_log else None
    summary = UnlockSummary(0, [], Counter())
    try:
        for frame in source:
            record, labels = session.process(frame)
            summary.frames += 1
            summary.states[record.state] += 1
            summary.stage_ms.append(record.stage_ms)
            if on_frame:
                on_frame(record)
            if record.event:
                summary.events.append((record.frame, record.t, record.event))
            if log_file:
                log_file.write(record.to_json() + "\n")
            if video or (window and window.enabled):
                shown = annotate(frame.rgb, labels, _banner(record), "locked_out" if record.lockout else record.state,
                                 _timings(record))
                if video:
                    video.write(shown)
                if window and not window.show(shown):
                    break
    finally:
        if log_file:
            log_file.close()
        if video:
            video.close()
        if window:
            window.close()
    return summary


def _banner(record: FrameRecord) -> str:
    state = "LOCKED OUT" if record.lockout else record.state.upper()
    who = f" {record.name} {record.score:.2f}" if record.state == "unlocked" and record.name else ""
    return f"{state}{who} | {record.liveness} | t={record.t:.1f}s"


def _timings(record: FrameRecord) -> str:
    stages = " ".join(f"{k} {v:.0f}" for k, v in record.stage_ms.items())
    return f"{record.ms:.0f} ms ({stages})"
