"""A camera-domain simulator: what a cheap, dark, distant device camera does to a face crop.

For simulation and benchmarks only (no device runs it on its frames). The chain, in capture order:
colour or grey -> gamma (low light: dark tones crushed) -> downscale so the face is `face_px` wide ->
blur (optics, motion) -> sensor noise at capture resolution -> JPEG at `jpeg` quality (0 = off) ->
upscale back to the input size (what the face crop of a small face looks like to the embedder).

Named domains fix a typical camera; each device draws its own camera from a range around its domain
(`draw_device_camera`), as real cameras differ, and each frame varies a little around the device's
(the face is nearer or further, the noise is new). Everything is seeded: the same seed, the same frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class CameraSpec:
    grey: bool = False
    gamma: float = 1.0  # > 1 darkens mid-tones as a low-light exposure does
    face_px: int = 0  # face (crop) width at capture, pixels; 0 = full resolution
    noise: float = 0.0  # sensor noise standard deviation, in 1/255 units, at capture resolution
    jpeg: int = 0  # JPEG quality 1..100; 0 = no compression
    blur: float = 0.0  # Gaussian blur sigma at capture resolution, pixels

    def check(self) -> CameraSpec:
        problems = {"gamma": self.gamma <= 0, "face_px": self.face_px != 0 and self.face_px < 8,
                    "noise": self.noise < 0, "jpeg": not 0 <= self.jpeg <= 100, "blur": self.blur < 0}
        reasons = {"gamma": "must be > 0", "face_px": "must be 0 (full size) or >= 8", "noise": "must be >= 0",
                   "jpeg": "must be 0 (off) or 1..100", "blur": "must be >= 0"}
        for name, bad in problems.items():
            if bad:
                raise ValueError(f"camera spec: {name} {reasons[name]}, got {getattr(self, name)}")
        return self

    def describe(self) -> str:
        parts = ["grey" if self.grey else "colour", f"gamma {self.gamma:g}",
                 f"face {self.face_px} px" if self.face_px else "full size", f"noise {self.noise:g}/255"]
        return ", ".join(parts + ([f"jpeg {self.jpeg}"] if self.jpeg else []) + ([f"blur {self.blur:g}"] if self.blur else []))


CLEAN = CameraSpec()
DOMAINS: dict[str, CameraSpec] = {
    "clean": CLEAN,
    "door-night": CameraSpec(grey=True, gamma=1.8, face_px=40, noise=6.0),
    "corridor": CameraSpec(grey=True, gamma=1.8, face_px=28, noise=6.0),
    "far-night": CameraSpec(grey=True, gamma=2.2, face_px=20, noise=8.0),
}
_FIELDS = {f.name: f.type for f in dataclasses.fields(CameraSpec)}


def _parse_value(name: str, text: str):
    kind = _FIELDS[name]
    try:
        if kind == "bool":
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        return int(text) if kind == "int" else float(text)
    except ValueError:
        expected = {"bool": "yes or no", "int": "an integer", "float": "a number"}[kind]
        raise ValueError(f"camera spec: {name} must be {expected}, got {text!r}") from None


def parse_camera(text: str) -> CameraSpec:
    """'corridor', 'corridor,face_px=24' or 'face_px=32,gamma=2.0,noise=7,jpeg=50' (over the clean camera).

    One domain name at most, first; then field=value overrides. Bad input: ValueError, one line naming the field."""
    base, overrides = CLEAN, {}
    for i, token in enumerate(t.strip() for t in text.split(",")):
        if not token:
            raise ValueError(f"camera spec: empty entry in {text!r}")
        if "=" not in token:
            if i or token not in DOMAINS:
                raise ValueError(f"camera spec: {token!r} is not a domain given first (domains: {', '.join(DOMAINS)})"
                                 if token not in DOMAINS else f"camera spec: the domain {token!r} must come first")
            base = DOMAINS[token]
            continue
        name, value = (s.strip() for s in token.split("=", 1))
        if name not in _FIELDS:
            raise ValueError(f"camera spec: unknown field {name!r} (fields: {', '.join(_FIELDS)})")
        overrides[name] = _parse_value(name, value)
    return dataclasses.replace(base, **overrides).check()


# How far one device's camera strays from its domain (relative, uniform): lens, sensor and mounting differ.
DEVICE_SPREAD = {"gamma": 0.1, "face_px": 0.15, "noise": 0.25, "blur": 0.25}
FRAME_FACE_SPREAD = 0.1  # frame to frame, the face is nearer or further


def draw_device_camera(domain: CameraSpec, rng: np.random.Generator) -> CameraSpec:
    """One device's camera: the domain's with gamma, face size, noise and blur drawn in a range around it."""
    def around(value: float, spread: float) -> float:
        return float(value * rng.uniform(1.0 - spread, 1.0 + spread))

    face_px = max(8, round(around(domain.face_px, DEVICE_SPREAD["face_px"]))) if domain.face_px else 0
    return dataclasses.replace(domain, gamma=round(around(domain.gamma, DEVICE_SPREAD["gamma"]), 3), face_px=face_px,
                               noise=round(around(domain.noise, DEVICE_SPREAD["noise"]), 2),
                               blur=round(around(domain.blur, DEVICE_SPREAD["blur"]), 2))


def capture(image: np.ndarray, camera: CameraSpec, rng: np.random.Generator, face_px: int | None = None) -> np.ndarray:
    """One uint8 HxWx3 RGB crop as `camera` sees it (face_px: this frame's face width, default the camera's)."""
    height, width = image.shape[:2]
    x = image.astype(np.float32) / 255.0
    if camera.grey:
        x = x @ np.array([0.299, 0.587, 0.114], np.float32)  # one channel from here: a grey sensor
    if camera.gamma != 1.0:
        x = x ** camera.gamma
    face_px = camera.face_px if face_px is None else face_px
    if face_px and face_px < width:
        x = cv2.resize(x, (face_px, max(8, round(height * face_px / width))), interpolation=cv2.INTER_AREA)
    if camera.blur > 0:
        x = cv2.GaussianBlur(x, (0, 0), camera.blur)
    if camera.noise > 0:
        x = x + rng.normal(0.0, camera.noise / 255.0, x.shape).astype(np.float32)
    x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if camera.jpeg:
        ok, encoded = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, camera.jpeg])
        x = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if x.shape[:2] != (height, width):
        x = cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def capture_frames(images: np.ndarray, camera: CameraSpec, rng: np.random.Generator,
                   face_spread: float = FRAME_FACE_SPREAD) -> np.ndarray:
    """uint8 [N, H, W, 3] frames of `camera`, each with its own noise and a face size within face_spread."""
    frames = np.empty_like(images)
    for i, image in enumerate(images):
        face_px = (max(8, round(camera.face_px * rng.uniform(1 - face_spread, 1 + face_spread)))
                   if camera.face_px else 0)
        frames[i] = capture(image, camera, rng, face_px)
    return frames
