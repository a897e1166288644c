"""A device's model of its own camera, measured on what it holds: camera frames of its owner(s) and their clean
enrolment photos (the frames unlock keeps, and the photos it enrolled).

Analysis by synthesis: the device passes its clean enrolment photos through candidate cameras
(model_zoo.camera.capture_frames) and keeps the camera whose output looks like its frames, statistic by
statistic, each chosen so that the owner's face itself mostly cancels out (the enrolment shows the same person):
- grey: every channel equal in (nearly) every frame (a grey sensor);
- gamma: the frames' mean luminance against that of the enrolment through gamma (low light crushes dark tones);
- face size: the radially averaged log power spectrum of the luminance. A face captured w pixels wide and
  scaled up to the chip has no power above w/2 cycles; sensor noise lifts the band below. Face size and noise
  are fitted together, coarse to fine;
- noise, refined: the median absolute response of a Laplacian-like filter on the frame brought back to its
  capture size (robust to the face's edges; Immerkaer's operator, whose response to noise is 6 sigma).
What it does not measure: blur (at these sizes it is confounded with face size) and JPEG (neither is in the
named domains); both stay 0.

Measured on the camera-quick fleets (seeds 0-2, 24 devices; BENCHMARKS.md, "The device measures its camera"):
face size within 1 px, noise RMS 1.2/255 (at most 3.6), gamma RMS 0.34 (at most 0.71; the enrolment photos and
the frames are different photos, in different light). Deterministic: the same images, the same camera.
"""

from __future__ import annotations

import cv2
import numpy as np

from .camera import CameraSpec, capture_frames

MEASURED = "measured"  # a device config's camera when the device measures it (edge_agent CameraTrainingSettings)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Immerkaer's noise operator: zero on planes and ramps; on white noise of sigma its response has sigma 6 sigma.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_MAD_TO_SIGMA = 1.0 / 0.6745  # median absolute value of a zero-mean normal, in sigmas
_FULL_SIZE = 0.9  # a fitted face this close to the chip width is a full-resolution camera (face_px 0)
_REPEATS = 4  # captures of each enrolment photo per candidate camera (fresh noise and face size each)


def _luma(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0) @ _LUMA


def is_grey(frames: np.ndarray, share: float = 0.95) -> bool:
    """True if at least `share` of the frames have every pixel's channels within 1 of each other."""
    f = frames.astype(np.int16)
    flat = (np.abs(f[..., 0] - f[..., 1]).max(axis=(1, 2)) <= 1) & (np.abs(f[..., 1] - f[..., 2]).max(axis=(1, 2)) <= 1)
    return bool(flat.mean() >= share)


def fit_gamma(frames: np.ndarray, enrolment: np.ndarray, low: float = 0.25, high: float = 5.0) -> float:
    """The gamma that gives the enrolment's luminance the frames' mean (bisection; the mean falls as gamma grows)."""
    target, lum = float(_luma(frames).mean()), _luma(enrolment)
    for _ in range(40):
        gamma = (low * high) ** 0.5
        low, high = (gamma, high) if float((lum ** gamma).mean()) > target else (low, gamma)
    return round((low * high) ** 0.5, 2)


def log_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean radially averaged log power of the luminance (Hann-windowed, mean removed), one bin per cycle."""
    y = _luma(images)
    y = y - y.mean(axis=(1, 2), keepdims=True)
    height, width = y.shape[1:]
    window = np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)
    power = (np.abs(np.fft.fft2(y * window)) ** 2).mean(0)
    radius = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(height) * height, np.fft.fftfreq(width) * width,
                                           indexing="ij"))).astype(int).ravel()
    n = min(height, width) // 2
    return np.log(np.bincount(radius, power.ravel())[:n] / np.bincount(radius)[:n] + 1e-12)


def noise_statistic(images: np.ndarray, face_px: int) -> float:
    """Noise sigma (1/255 units) as Immerkaer's operator sees it on the images brought back to face_px wide."""
    values = []
    for y in _luma(images):
        small = cv2.resize(y, (face_px, max(8, round(y.shape[0] * face_px / y.shape[1]))), interpolation=cv2.INTER_AREA)
        response = cv2.filter2D(small, -1, _NOISE_KERNEL)[1:-1, 1:-1]
        values.append(np.median(np.abs(response)))
    return float(np.median(values)) * 255.0 * _MAD_TO_SIGMA / 6.0


def measure_camera(frames: np.ndarray, enrolment: np.ndarray, seed: int = 0) -> CameraSpec:
    """This device's camera, from its uint8 [F, H, W, 3] frames and [E, H, W, 3] clean enrolment photos of the
    same people. ValueError if either is empty."""
    if not len(frames) or not len(enrolment):
        raise ValueError(f"measuring a camera needs frames and enrolment photos, got {len(frames)} and "
                         f"{len(enrolment)}")
    grey, gamma = is_grey(frames), fit_gamma(frames, enrolment)
    photos = np.concatenate([enrolment] * _REPEATS)
    width = frames.shape[2]

    def synthesised(face_px: int, noise: float) -> np.ndarray:
        camera = CameraSpec(grey=grey, gamma=gamma, face_px=face_px, noise=noise)
        return capture_frames(photos, camera, np.random.default_rng(seed))

    target = log_spectrum(frames)[3:]  # the lowest bins hold the face's layout, not the camera

    def spectral_misfit(face_px: int, noise: float) -> float:
        return float(((log_spectrum(synthesised(face_px, noise))[3:] - target) ** 2).mean())

    sizes = list(range(8, width + 1, 4))
    _, face_px, noise = min((spectral_misfit(w, n), w, n) for w in sizes for n in (0.0, 3.0, 6.0, 9.0, 12.0))
    _, face_px, noise = min((spectral_misfit(w, n), w, n)
                            for w in range(max(8, face_px - 3), min(width, face_px + 3) + 1)
                            for n in np.arange(max(0.0, noise - 1.5), noise + 1.6, 0.5))
    if face_px >= _FULL_SIZE * width:
        face_px = width  # a full-resolution camera: noise is measured on the chip as it is
    observed = noise_statistic(frames, face_px)
    _, noise = min((abs(noise_statistic(synthesised(face_px, n), face_px) - observed), n)
                   for n in np.arange(0.0, 16.1, 0.5))
    return CameraSpec(grey=grey, gamma=gamma, face_px=0 if face_px == width else int(face_px),
                      noise=float(noise)).check()
