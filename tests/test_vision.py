"""BlazeFace and Face Mesh (model_zoo.vision): decoding (pure), then the real TFLite models on shared images,
checked against the 68-point net's landmarks on the same faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.unlock.geometry import mean_eye_aspect_ratio, yaw_ratio
from model_zoo import align
from model_zoo.data import read_gif, read_image, shared_dataset_dir, to_rgb
from model_zoo.faceapi import default_models_dir as faceapi_dir
from model_zoo.pipeline import FacePipeline
from model_zoo.vision import Detection, default_models_dir
from model_zoo.vision.blazeface import (FULL_RANGE, SHORT_RANGE, anchor_centres, decode, letterbox,
                                        non_max_suppression, tiles)

YALE_FRAMES = ("subject01.normal", "subject05.glasses", "subject09.centerlight", "subject13.happy")
# BlazeFace's eye keypoints against the 68-point eye centres (mean of six contour points), as a fraction of the
# inter-ocular distance: measured up to 0.14 on Yale (glasses); the keypoint marks the pupil, the 68-point
# centre the middle of the eye contour.
EYE_TOLERANCE_IOD = 0.2


# --- decoding, no models ---

def test_anchor_grids_match_the_models_outputs() -> None:
    short, full = anchor_centres(SHORT_RANGE), anchor_centres(FULL_RANGE)

    assert short.shape == (896, 2) and full.shape == (2304, 2)
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])  # stride 8: a 16x16 grid, 2 anchors per cell
    np.testing.assert_allclose(short[511], [15.5 / 16, 15.5 / 16])
    np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])  # stride 16: 8x8, 6 anchors per cell
    np.testing.assert_allclose(full[48], [0.5 / 48, 1.5 / 48])  # stride 4: 48x48, one anchor, row by row


def test_decode_places_box_and_keypoints_relative_to_the_anchor() -> None:
    anchors = np.array([[0.25, 0.5], [0.75, 0.75]])
    regressors = np.zeros((2, 16))
    regressors[0, :4] = [12.8, -6.4, 32.0, 64.0]  # input pixels of a 128 input
    regressors[0, 4:6] = [-12.8, 0.0]  # first keypoint 0.1 left of the anchor
    logits = np.array([3.0, -3.0])

    scores, boxes, points = decode(regressors, logits, anchors, 128, 0.5)

    assert len(scores) == 1 and scores[0] == pytest.approx(1 / (1 + np.exp(-3.0)))
    np.testing.assert_allclose(boxes[0], [0.35 - 0.125, 0.45 - 0.25, 0.35 + 0.125, 0.45 + 0.25])
    np.testing.assert_allclose(points[0, 0], [0.15, 0.5])
    np.testing.assert_allclose(points[0, 1], [0.25, 0.5])


def test_weighted_nms_merges_a_cluster_and_keeps_a_separate_face() -> None:
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [5.0, 5.0, 6.0, 6.0]])
    scores = np.array([0.9, 0.6, 0.7])
    points = np.zeros((3, 6, 2))

    kept_scores, kept_boxes, _ = non_max_suppression(scores, boxes, points, 0.3, weighted=True)
    plain_scores, plain_boxes, _ = non_max_suppression(scores, boxes, points, 0.3, weighted=False)

    np.testing.assert_allclose(kept_scores, [0.9, 0.7])
    np.testing.assert_allclose(kept_boxes[0], [0.04, 0.0, 1.04, 1.0])  # 0.9/1.5 and 0.6/1.5 of the two
    np.testing.assert_allclose(plain_boxes[0], boxes[0])
    np.testing.assert_allclose(plain_scores, kept_scores)


def test_letterbox_keeps_the_aspect_ratio_and_centres_the_frame() -> None:
    frame = np.full((50, 100, 3), 255, dtype=np.uint8)

    batch, scale, (pad_x, pad_y) = letterbox(frame, 128)

    assert batch.shape == (128, 128, 3) and scale == pytest.approx(1.28) and (pad_x, pad_y) == (0.0, 32.0)
    assert batch[0, 0, 0] == -1.0 and batch[64, 64, 0] == 1.0


def test_tiles_cover_the_frame_with_half_a_tile_of_overlap() -> None:
    corners = tiles(480, 640, 240)

    assert {x for x, _ in corners} == {0, 100, 200, 300, 400} and {y for _, y in corners} == {0, 120, 240}
    assert tiles(100, 100, 128) == [(0, 0)]


# --- the real models ---

@pytest.fixture(scope="module")
def pipelines() -> tuple[FacePipeline, FacePipeline]:
    if not (default_models_dir() / "face_detection_short_range.tflite").is_file():
        pytest.skip(f"MediaPipe models not found at {default_models_dir()} (set FACEFED_MEDIAPIPE_DIR)")
    if not faceapi_dir().is_dir():
        pytest.skip(f"face-api weights not found at {faceapi_dir()} (set FACEFED_FACEAPI_DIR)")
    torch.set_num_threads(1)
    today = FacePipeline()
    return today, FacePipeline(today.models, detector="blazeface", landmarks="mesh")


def _dataset(name: str) -> Path:
    path = shared_dataset_dir(name)
    if path is None:
        pytest.skip(f"shared dataset {name!r} not found (../shared/datasets or $FACEFED_DATA_ROOT)")
    return path


def _yale(name: str) -> np.ndarray:
    return np.ascontiguousarray(to_rgb(read_gif(_dataset("yale") / name)))


@pytest.mark.shared_data
@pytest.mark.parametrize("name", YALE_FRAMES)
def test_blazeface_box_holds_the_face_and_its_eyes_sit_on_the_68_point_eyes(pipelines, name: str) -> None:
    today, vision = pipelines
    frame = _yale(name)

    found = vision.detector.detect(frame)
    landmarks68 = today.locate(frame)[1][0]

    assert len(found) == 1
    x, y, w, h = found[0].box
    eyes68 = align.five_points(landmarks68)[:2]
    nose_mouth = align.five_points(landmarks68)[2:]
    inside = lambda p: (p >= [x, y]).all() and (p <= [x + w, y + h]).all()  # noqa: E731
    assert inside(eyes68) and inside(nose_mouth)
    iod = np.linalg.norm(eyes68[1] - eyes68[0])
    assert np.linalg.norm(found[0].keypoints[:2] - eyes68, axis=1).max() < EYE_TOLERANCE_IOD * iod


@pytest.mark.shared_data
@pytest.mark.parametrize("name", YALE_FRAMES)
def test_mesh_five_points_agree_with_the_68_point_net(pipelines, name: str) -> None:
    today, vision = pipelines
    frame = _yale(name)

    mesh = vision.locate(frame)[1][0]
    points68 = align.five_points(today.locate(frame)[1][0])

    assert mesh.shape == (468, 3)
    iod = np.linalg.norm(points68[1] - points68[0])
    assert np.linalg.norm(align.five_points(mesh) - points68, axis=1).max() < EYE_TOLERANCE_IOD * iod
    assert abs(yaw_ratio(mesh)) < 0.15  # Yale faces look at the camera: within about 9 degrees


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ("s10/9.pgm", "s17/10.pgm", "s10/4.pgm", "s13/6.pgm"))
def test_mesh_turn_follows_the_68_point_turn_on_turned_orl_faces(pipelines, name: str) -> None:
    today, vision = pipelines
    face = np.ascontiguousarray(to_rgb(read_image(_dataset("orl") / name)))

    turn68, turn_mesh = yaw_ratio(today.primary_landmarks(face)), yaw_ratio(vision.primary_landmarks(face))

    # Measured on ORL s10-s19: correlation 0.97, the mesh's sine about 0.55x the 68-point ratio.
    assert abs(turn68) > 0.4 and np.sign(turn_mesh) == np.sign(turn68) and abs(turn_mesh) > 0.2


@pytest.mark.shared_data
def test_mesh_eyes_read_closed_on_sleepy_yale_faces(pipelines) -> None:
    _, vision = pipelines
    ratios = {cond: np.median([mean_eye_aspect_ratio(vision.locate(_yale(f"subject{s:02d}.{cond}"))[1][0])
                               for s in (1, 2, 3, 4, 5)]) for cond in ("normal", "sleepy")}

    assert ratios["sleepy"] < 0.8 * ratios["normal"]  # 68 points: within 10 % (bench/vision_bench.py)


@pytest.mark.shared_data
def test_blazeface_finds_every_tight_celeb_dev_crop(pipelines) -> None:
    _, vision = pipelines
    root = _dataset("celeb-dev")
    crops = [np.ascontiguousarray(to_rgb(read_image(path))) for person in sorted(root.iterdir()) if person.is_dir()
             for path in sorted(person.glob("*.jpg"))[:3]]

    found = [vision.detector.detect(crop) for crop in crops]

    assert all(len(faces) >= 1 for faces in found)


@pytest.mark.shared_data
def test_blazeface_finds_a_small_face_in_a_large_frame(pipelines) -> None:
    import cv2

    _, vision = pipelines
    face = np.ascontiguousarray(to_rgb(read_image(_dataset("orl") / "s5" / "1.pgm")))
    rng = np.random.default_rng(0)
    frame = cv2.resize(rng.integers(30, 220, size=(6, 8, 3)).astype(np.uint8), (640, 480),
                       interpolation=cv2.INTER_CUBIC)
    frame[300:361, 450:500] = cv2.resize(face, (50, 61), interpolation=cv2.INTER_AREA)  # 50 px wide at 640

    found = vision.detector.detect(frame)

    assert any(d.box[0] <= 475 <= d.box[0] + d.box[2] and d.box[1] <= 330 <= d.box[1] + d.box[3] for d in found)


@pytest.mark.shared_data
def test_mesh_alignment_leaves_an_aligned_crop_nearly_as_it_is(pipelines) -> None:
    _, vision = pipelines
    root = _dataset("celeb-dev")
    crops = [np.ascontiguousarray(to_rgb(read_image(sorted(person.glob("*.jpg"))[-1])))
             for person in sorted(root.iterdir()) if person.is_dir()][6:]  # people outside MESH_ARCFACE_112's fit

    matrices = np.stack([align.arcface_transform(vision.primary_landmarks(crop)) for crop in crops])

    scales = np.sqrt(np.abs(np.linalg.det(matrices[:, :, :2])))
    assert np.abs(np.median(scales) - 1.0) < 0.05
    corners = np.stack([align.apply_transform(m, [[0, 0], [111, 111]]) for m in matrices])
    assert np.abs(np.median(corners - [[0, 0], [111, 111]], axis=0)).max() < 3.0  # pixels


def test_pipeline_rejects_unknown_backends(pipelines) -> None:
    today, _ = pipelines
    with pytest.raises(ValueError, match="blazeface"):
        FacePipeline(today.models, detector="ssd")
    with pytest.raises(ValueError, match="mesh"):
        FacePipeline(today.models, landmarks="98")
    with pytest.raises(ValueError, match="468"):
        align.five_points_from_mesh(np.zeros((100, 3)))
    assert isinstance(Detection(1.0, (0, 0, 1, 1)).keypoints, type(None))


# --- enroll and unlock on the default route, from the command line ---

@pytest.fixture(scope="module")
def ruffalo_store(pipelines, tmp_path_factory) -> tuple[Path, Path]:
    """(store, photos): the owner enrolled from five tight celeb-dev crops and one blank image, as they are."""
    import shutil

    import cv2

    root = _dataset("celeb-dev")
    photos = tmp_path_factory.mktemp("crops")
    for name in ("6265", "6270", "6271", "6277", "6280"):
        shutil.copy(root / "Mark_Ruffalo" / f"{name}.jpg", photos / f"{name}.jpg")
    cv2.imwrite(str(photos / "zz-blank.png"), np.full((112, 112, 3), 128, np.uint8))
    return tmp_path_factory.mktemp("store"), photos


@pytest.mark.shared_data
def test_enrolment_from_tight_crops_succeeds_and_names_each_rejected_image(ruffalo_store, capsys) -> None:
    from edge_agent.cli import main

    store, photos = ruffalo_store

    assert main(["enroll", "--name", "owner", "--source", str(photos), "--store", str(store)]) == 0

    out = capsys.readouterr().out
    assert "rejected zz-blank.png: no face" in out
    assert "enrolled owner: 5 template(s) from 6 frame(s)" in out


@pytest.mark.shared_data
def test_unlock_prints_why_it_waits_and_the_latency_split(ruffalo_store, tmp_path, capsys) -> None:
    import shutil

    from edge_agent.cli import main

    store, photos = ruffalo_store
    main(["enroll", "--name", "owner", "--source", str(photos), "--store", str(store)])
    frames = tmp_path / "frames"
    frames.mkdir()
    stranger = _dataset("celeb-dev") / "Hugh_Laurie" / "3358.jpg"
    for i, source in enumerate([photos / "zz-blank.png", stranger] + sorted(photos.glob("*.jpg"))[:3]):
        shutil.copy(source, frames / f"{i}{source.suffix}")
    capsys.readouterr()

    assert main(["unlock", "--source", str(frames), "--store", str(store), "--no-window"]) == 0

    out = capsys.readouterr().out
    assert "frame 0 t=0.0s: no face |" in out
    assert "frame 1 t=0.1s: no match: best owner" in out
    assert "frame 2 t=0.2s: waiting for a blink (owner" in out
    assert "unlocked 0 time(s)" in out
    assert "median frame" in out and "detect" in out and "embed" in out and "(blazeface detector, mesh landmarks)" in out
