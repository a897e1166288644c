"""Frame sources for enrol and unlock: a camera index, a video file, an RTSP (or HTTP) stream, or a folder of
images. Every source yields RGB frames with a time: wall-clock seconds since the start for live sources,
frame index / fps for files and folders (so a file gives the same decisions however fast it is processed).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model_zoo.data import IMAGE_EXTENSIONS, read_image, to_rgb

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
DEFAULT_FOLDER_FPS = 10.0  # an image folder has no frame rate of its own


@dataclass(frozen=True)
class Frame:
    index: int
    time_s: float
    rgb: np.ndarray  # uint8 [H, W, 3]
    name: str | None = None  # the image file of a folder source, for messages


@dataclass(frozen=True)
class SourceInfo:
    description: str
    live: bool  # camera or stream: wall-clock time, frames may be dropped while busy
    fps: float


class FrameSource:
    """Iterate it for Frames; use it as a context manager to release the device or file."""

    info: SourceInfo

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaptureSource(FrameSource):
    """cv2.VideoCapture over a camera index, a video file or a stream URL."""

    def __init__(self, target: int | str, live: bool, description: str, fps: float | None = None) -> None:
        self._capture = cv2.VideoCapture(target)
        if not self._capture.isOpened():
            raise ValueError(f"cannot open {description} (OpenCV could not read it)")
        reported = self._capture.get(cv2.CAP_PROP_FPS)
        self.info = SourceInfo(description, live, fps or (reported if reported and reported > 0 else 30.0))

    def __iter__(self) -> Iterator[Frame]:
        start = time.monotonic()
        index = 0
        while True:
            ok, bgr = self._capture.read()
            if not ok:
                return
            t = time.monotonic() - start if self.info.live else index / self.info.fps
            yield Frame(index, t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1

    def close(self) -> None:
        self._capture.release()


class FolderSource(FrameSource):
    """The images of a folder in name order, as frames at fps."""

    def __init__(self, folder: Path, fps: float | None = None) -> None:
        self.files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in folder {folder}")
        self.info = SourceInfo(f"image folder {folder} ({len(self.files)} images)", False, fps or DEFAULT_FOLDER_FPS)

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.files):
            yield Frame(index, index / self.info.fps, np.ascontiguousarray(to_rgb(read_image(path))), path.name)


def open_source(spec: str, fps: float | None = None) -> FrameSource:
    """SRC as given on the command line: '0' (camera index), rtsp://..., a folder, or a video file.

    fps: the frame rate of an image folder, or an override for a file whose header lacks or misstates it.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if spec.isdigit():
        return CaptureSource(int(spec), live=True, description=f"camera {spec}")
    if spec.startswith(STREAM_SCHEMES):
        return CaptureSource(spec, live=True, description=f"stream {spec}")
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, fps)
    if path.is_file():
        return CaptureSource(str(path), live=False, description=f"video file {path}", fps=fps)
    raise ValueError(f"source {spec!r} is not a camera index, an rtsp:// or http(s):// URL, a folder or a file")
