"""Alignment geometry (pure) and the face-api pipeline on real Yale frames and celeb-dev crops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_zoo import align
from model_zoo.data import shared_dataset_dir
from model_zoo.faceapi import FaceApiModels, default_models_dir, detect_landmarks, load_faceapi_models
from model_zoo.pipeline import FacePipeline

YALE_FRAMES = ("subject01.normal", "subject05.glasses", "subject09.centerlight")
LANDMARK_BOX_MARGIN = 0.1  # tiny detector boxes are loose squares: the jaw may reach just past an edge


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


# --- geometry, no shared data ---

@pytest.mark.parametrize("scale, angle, tx, ty", [(1.0, 0.0, 0.0, 0.0), (1.7, 23.0, -40.0, 12.5),
                                                   (0.31, -170.0, 300.0, -2.0)])
def test_estimate_similarity_recovers_known_transform(scale: float, angle: float, tx: float, ty: float) -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(-50, 150, size=(7, 2))
    known = similarity(scale, angle, tx, ty)

    estimated = align.estimate_similarity(src, align.apply_transform(known, src))

    np.testing.assert_allclose(estimated, known, atol=1e-9)


def test_estimate_similarity_is_least_squares_and_never_mirrors() -> None:
    src = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 12.0], [3.0, 6.0]])
    mirrored = src * [-1.0, 1.0]

    matrix = align.estimate_similarity(src, mirrored)

    assert np.linalg.det(matrix[:, :2]) > 0  # a rotation and a scale, whatever fits best
    # Moving one target point shifts the fit by a share of it, not all of it.
    moved = src.copy()
    moved[0] += [4.0, 0.0]
    residual = align.apply_transform(align.estimate_similarity(src, moved), src) - moved
    assert 0 < np.abs(residual[0]).max() < 4.0


def test_estimate_similarity_rejects_degenerate_points() -> None:
    with pytest.raises(ValueError, match="identical"):
        align.estimate_similarity(np.ones((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="matching"):
        align.estimate_similarity(np.zeros((5, 2)), np.zeros((4, 2)))


def test_five_points_are_eye_centres_nose_tip_and_mouth_corners() -> None:
    points = np.zeros((68, 2))
    points[36:42] = [[0, 0], [2, 0], [4, 0], [0, 2], [2, 2], [4, 2]]  # centre (2, 1)
    points[42:48] = points[36:42] + [10, 0]  # centre (12, 1)
    points[30], points[48], points[54] = [7, 5], [3, 9], [11, 9]

    np.testing.assert_allclose(align.five_points_from_68(points), [[2, 1], [12, 1], [7, 5], [3, 9], [11, 9]])


def test_dlib_chip_transform_undoes_a_posed_mean_face() -> None:
    chip_shape = align.dlib_mean_shape68()
    chip_shape[:17] = 0.0  # jaw points are not used by dlib's fit
    pose = similarity(2.3, 15.0, 80.0, -30.0)  # chip -> frame
    frame_landmarks = align.apply_transform(pose, chip_shape)

    matrix = align.dlib_chip_transform(frame_landmarks)

    np.testing.assert_allclose(matrix, cv2.invertAffineTransform(pose), atol=1e-9)


def test_dlib_chip_template_matches_dlib_geometry() -> None:
    # padding 0.25 at size 150: the mean shape's unit square spans pixels 25..125.
    shape = align.dlib_mean_shape68()
    assert np.isnan(shape[:17]).all()
    assert 25 <= np.nanmin(shape) and np.nanmax(shape) <= 125
    eyes = align.dlib_chip_5points()[:2]
    assert eyes[0, 1] == pytest.approx(eyes[1, 1])  # the mean face is level
    assert eyes[1, 0] - eyes[0, 0] == pytest.approx(52.9, abs=0.1)


def test_arcface_template_lands_on_dlib_template() -> None:
    matrix = align.arcface_to_dlib_transform()
    mapped = align.apply_transform(matrix, align.ARCFACE_112)
    errors = np.linalg.norm(mapped - align.dlib_chip_5points(), axis=1)

    assert errors[:2].max() < 1.5  # eyes
    assert errors.max() < 3.5  # dlib's mean mouth is a little wider than ArcFace's
    scale = np.hypot(*matrix[:, 0])
    assert scale == pytest.approx(1.45, abs=0.02)  # not the 150/112 = 1.34 of a plain resize


def test_reframing_moves_template_dots_onto_the_chip_template() -> None:
    crop = np.zeros((112, 112, 3), np.uint8)
    for x, y in np.round(align.ARCFACE_112).astype(int)[:3]:  # eyes and nose: the tightest fit
        cv2.circle(crop, (x, y), 2, (255, 255, 255), -1)

    chip = FacePipeline.reframe_aligned_crops(crop[None])[0]

    for x, y in align.dlib_chip_5points()[:3]:
        window = chip[int(y) - 4:int(y) + 6, int(x) - 4:int(x) + 6, 0]
        assert window.max() > 200, (x, y)


def test_warp_replicates_the_border() -> None:
    image = np.tile(np.arange(10, dtype=np.uint8)[None, :, None] * 20, (10, 1, 3))
    shifted = align.warp(image, np.array([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]]), 10)

    assert (shifted[:, :5] == 0).all()  # left edge column (value 0) repeated
    np.testing.assert_array_equal(shifted[:, 5:], image[:, :5])


# --- the pipeline on real data ---

@pytest.fixture(scope="module")
def models() -> FaceApiModels:
    models_dir = default_models_dir()
    if not models_dir.is_dir():
        pytest.skip(f"face-api weights not found at {models_dir} (set FACEFED_FACEAPI_DIR)")
    return load_faceapi_models(models_dir)


@pytest.fixture(scope="module")
def pipeline(models: FaceApiModels) -> Iterator[FacePipeline]:
    # One-image forwards gain nothing from intra-op threads, and on a busy 2-core machine their
    # synchronisation turns a 10 ms forward into a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FacePipeline(models)
    torch.set_num_threads(threads)


def _dataset_dir(name: str) -> Path:
    path = shared_dataset_dir(name)
    if path is None:
        pytest.skip(f"shared dataset {name!r} not found (../shared/datasets or $FACEFED_DATA_ROOT)")
    return path


def _yale_frame(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(_dataset_dir("yale") / name) as image:
        return np.asarray(image.convert("RGB"))


def _celeb_crops() -> np.ndarray:
    """The first crop of every celeb-dev identity (uint8 [12, 112, 112, 3])."""
    root = _dataset_dir("celeb-dev")
    paths = [sorted(d.glob("*.jpg"))[0] for d in sorted(root.iterdir()) if d.is_dir()]
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])


def test_constructor_rejects_unknown_embedder(models: FaceApiModels) -> None:
    with pytest.raises(ValueError, match="faceapi"):
        FacePipeline(models, embedder="mobilefacenet")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", YALE_FRAMES)
def test_detect_finds_one_face_with_landmarks_in_its_box(pipeline: FacePipeline, name: str) -> None:
    faces = pipeline.detect(_yale_frame(name))

    assert len(faces) == 1
    face = faces[0]
    x, y, w, h = face.box
    margin = LANDMARK_BOX_MARGIN * np.array([w, h])
    assert face.landmarks.shape == (68, 2)
    assert (face.landmarks >= np.array([x, y]) - margin).all()
    assert (face.landmarks <= np.array([x + w, y + h]) + margin).all()
    assert face.chip.shape == (150, 150, 3) and face.chip.dtype == np.uint8
    assert face.embedding.shape == (128,) and np.isfinite(face.embedding).all()


@pytest.mark.shared_data
def test_embed_images_on_frames_uses_the_best_detection(pipeline: FacePipeline) -> None:
    frame = _yale_frame(YALE_FRAMES[0])

    embedding = pipeline.embed_images(frame[None], aligned="auto")[0]  # 243x320: not an aligned crop

    np.testing.assert_allclose(embedding, pipeline.detect(frame)[0].embedding, atol=1e-5)


@pytest.mark.shared_data
def test_reframed_celeb_crops_put_the_eyes_on_the_dlib_template(pipeline: FacePipeline) -> None:
    chips = pipeline.reframe_aligned_crops(_celeb_crops())
    eyes = np.stack([align.five_points_from_68(detect_landmarks(pipeline.models.landmarks, chip))[:2]
                     for chip in chips])
    offsets = eyes - align.dlib_chip_5points()[:2]

    assert np.linalg.norm(offsets, axis=2).max() < 6.0  # per image: pose differences remain
    assert np.abs(offsets.mean(axis=0)).max() < 2.0  # on average the geometry is right


@pytest.mark.shared_data
def test_embed_images_auto_treats_112_crops_as_aligned(pipeline: FacePipeline) -> None:
    crops = _celeb_crops()[:3]

    auto = pipeline.embed_images(crops, aligned="auto")

    np.testing.assert_array_equal(auto, pipeline.embed_aligned_crops(crops))
    with pytest.raises(ValueError, match="aligned"):
        pipeline.embed_images(crops, aligned="yes")
