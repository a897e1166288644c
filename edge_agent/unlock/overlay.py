"""What the user sees: boxes, names, similarity, lock state and per-frame timings drawn on the frame, shown in
a window when a display exists and/or written to a video file."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("facefed.unlock")

GREEN, RED, AMBER, WHITE = (40, 200, 40), (220, 40, 40), (230, 160, 20), (255, 255, 255)  # RGB
STATE_COLOURS = {"unlocked": GREEN, "locked": RED, "locked_out": AMBER}
WINDOW = "facefed unlock"


@dataclass(frozen=True)
class FaceLabel:
    box: tuple[float, float, float, float]
    text: str  # e.g. "alice 0.72"
    matched: bool


def annotate(frame_rgb: np.ndarray, faces: list[FaceLabel], banner: str, state: str, timings: str) -> np.ndarray:
    """A copy of the frame with the faces boxed and labelled, the lock state on top and the timings below."""
    out = np.ascontiguousarray(frame_rgb.copy())
    height, width = out.shape[:2]
    scale = max(0.4, width / 1000)
    thickness = max(1, round(width / 400))
    for face in faces:
        x, y, w, h = (int(round(v)) for v in face.box)
        colour = GREEN if face.matched else RED
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, thickness)
        cv2.putText(out, face.text, (x, max(12, y - 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness,
                    cv2.LINE_AA)
    bar = int(28 * scale / 0.4 * 0.6) + 6
    cv2.rectangle(out, (0, 0), (width, bar), STATE_COLOURS[state], -1)
    cv2.putText(out, banner, (4, bar - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, WHITE, thickness, cv2.LINE_AA)
    cv2.putText(out, timings, (4, height - 6), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8, WHITE, 1, cv2.LINE_AA)
    return out


class VideoOut:
    """Annotated frames into an .mp4 (mp4v) or .avi (MJPG) file at the source's frame rate."""

    FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}

    def __init__(self, path: Path, fps: float) -> None:
        if path.suffix.lower() not in self.FOURCC:
            raise ValueError(f"--save needs a .mp4 or .avi file, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps = path, fps
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame_rgb: np.ndarray) -> None:
        if self._writer is None:  # the frame size is known only now
            height, width = frame_rgb.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*self.FOURCC[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            if not self._writer.isOpened():
                raise OSError(f"OpenCV cannot write video {self.path}")
        self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def display_available() -> bool:
    """A window can open: a desktop session (X11 or Wayland on Linux; always on macOS and Windows)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class Window:
    """cv2.imshow when it works; opencv-python-headless has no GUI, so the first failure turns the window off."""

    def __init__(self) -> None:
        self.enabled = display_available()
        if not self.enabled:
            log.info("no display: running headless (use --save and --json-log to see the result)")

    def show(self, frame_rgb: np.ndarray) -> bool:
        """Shows the frame; False when the user pressed q or Esc."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(WINDOW, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:
            log.warning("cannot open a window (%s); running headless", str(exc).strip().splitlines()[-1])
            self.enabled = False
            return True
        return key not in (ord("q"), 27)

    def close(self) -> None:
        if self.enabled:
            cv2.destroyAllWindows()
