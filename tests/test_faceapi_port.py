"""The face-api PyTorch port against outputs of the original (tfjs, cpu backend) implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_zoo.faceapi import (
    FaceApiModels,
    compute_descriptor,
    decode_weights,
    default_models_dir,
    detect_faces,
    detect_landmarks,
    load_faceapi_models,
    read_tfjs_weights,
)
from model_zoo.faceapi.recognition import preprocess as recognition_input
from model_zoo.faceapi.tfjs_ops import pad_to_square, resize_bilinear_tfjs

MODELS_DIR = default_models_dir()
REFERENCE_DIR = MODELS_DIR / "reference"
SHARED_DIR = MODELS_DIR.parent.parent  # reference frame paths are relative to shared/


# --- TF.js weight format (pure, no shared data needed) ---

def test_decode_weights_dequantises_uint8_and_reads_raw_float32() -> None:
    specs = [
        {"name": "q", "shape": [2, 2], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}},
        {"name": "raw", "shape": [3], "dtype": "float32"},
    ]
    buffer = bytes([0, 1, 2, 255]) + np.array([1.5, -2.0, 3.25], dtype="<f4").tobytes()

    weights = decode_weights(specs, buffer)

    np.testing.assert_array_equal(weights["q"], np.array([[-1.0, -0.5], [0.0, 126.5]], dtype=np.float32))
    assert weights["q"].dtype == np.float32
    np.testing.assert_array_equal(weights["raw"], np.array([1.5, -2.0, 3.25], dtype=np.float32))


def test_decode_weights_rejects_size_mismatch() -> None:
    specs = [{"name": "raw", "shape": [2], "dtype": "float32"}]
    with pytest.raises(ValueError, match="left over"):
        decode_weights(specs, bytes(12))
    with pytest.raises(ValueError, match="past the end"):
        decode_weights(specs, bytes(4))


def test_read_tfjs_weights_concatenates_shards(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes([10, 20]))
    (tmp_path / "b.bin").write_bytes(bytes([30]))
    spec = {"name": "w", "shape": [3], "dtype": "float32",
            "quantization": {"dtype": "uint8", "scale": 1.0, "min": 0.0}}
    (tmp_path / "m.json").write_text(json.dumps([{"paths": ["a.bin", "b.bin"], "weights": [spec]}]))

    np.testing.assert_array_equal(read_tfjs_weights(tmp_path / "m.json")["w"], [10.0, 20.0, 30.0])


# --- tfjs preprocessing quirks ---

def test_pad_to_square_rounds_half_up_like_javascript() -> None:
    padded = pad_to_square(np.ones((243, 320, 3), np.uint8), center=True)
    rows = padded[:, 0, 0]
    assert padded.shape == (320, 320, 3)
    assert rows[:38].sum() == 0 and rows[38:281].all() and rows[281:].sum() == 0  # 38 before, 39 after


def test_resize_bilinear_samples_at_dst_times_ratio_without_half_pixel_offset() -> None:
    image = np.arange(4, dtype=np.float32).reshape(1, 4, 1).repeat(2, axis=0)
    np.testing.assert_array_equal(resize_bilinear_tfjs(image, 2, 2)[0, :, 0], [0.0, 2.0])
    np.testing.assert_allclose(resize_bilinear_tfjs(image, 2, 3)[0, :, 0], [0.0, 4 / 3, 8 / 3], rtol=1e-6)


# --- loader ---

def test_loader_reports_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FACEFED_FACEAPI_DIR"):
        load_faceapi_models(tmp_path / "absent")


def test_default_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FACEFED_FACEAPI_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path


# --- reference outputs of the original implementation ---

@pytest.fixture(scope="module")
def models() -> FaceApiModels:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"shared face-api folder with reference outputs not found at {MODELS_DIR}")
    return load_faceapi_models(MODELS_DIR)


@pytest.fixture(scope="module")
def face_chips() -> np.ndarray:
    return np.load(REFERENCE_DIR / "inputs.npy")


def test_descriptors_match_reference(models: FaceApiModels, face_chips: np.ndarray) -> None:
    descriptors = np.stack([compute_descriptor(models.recognition, chip) for chip in face_chips])
    np.testing.assert_allclose(descriptors, np.load(REFERENCE_DIR / "descriptors.npy"), rtol=0, atol=1e-4)


def test_batched_descriptors_match_single(models: FaceApiModels, face_chips: np.ndarray) -> None:
    with torch.no_grad():
        batched = models.recognition(torch.cat([recognition_input(chip) for chip in face_chips[:4]])).numpy()
    single = np.stack([compute_descriptor(models.recognition, chip) for chip in face_chips[:4]])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


def test_landmarks_match_reference(models: FaceApiModels, face_chips: np.ndarray) -> None:
    landmarks = np.stack([detect_landmarks(models.landmarks, chip) for chip in face_chips])
    np.testing.assert_allclose(landmarks, np.load(REFERENCE_DIR / "landmarks68.npy"), rtol=0, atol=1e-4)


def _yale_frame(relative_path: str) -> np.ndarray:
    from PIL import Image

    path = SHARED_DIR / relative_path
    if not path.is_file():
        pytest.skip(f"Yale frame not available: {path}")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_tiny_detections_match_reference(models: FaceApiModels) -> None:
    frames = (REFERENCE_DIR / "yale_frames.txt").read_text().split()
    expected = json.loads((REFERENCE_DIR / "tiny_detections.json").read_text())
    assert len(frames) == len(expected)
    for frame, want in zip(frames, expected):
        got = detect_faces(models.detector, _yale_frame(frame), input_size=320, score_threshold=0.5)
        assert len(got) == len(want), frame
        for det, ref in zip(got, want):
            assert det.score == pytest.approx(ref["score"], abs=1e-3), frame
            np.testing.assert_allclose(det.box, ref["box"], rtol=0, atol=1.0, err_msg=frame)
