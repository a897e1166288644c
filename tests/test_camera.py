"""Camera-domain simulator, camera specs on the command line, and gallery-vs-probe evaluation."""

import json

import numpy as np
import pytest

import facefed.cli
from model_zoo.camera import DOMAINS, capture_frames, draw_device_camera, parse_camera
from model_zoo.checkpoint import save_checkpoint
from model_zoo.data import FaceDataset, save_folders
from model_zoo.metrics import gallery_pair_scores
from tests.face_models import blob_faces, briefly_trained_backbone


def test_capture_is_deterministic_per_seed_and_degrades():
    faces = blob_faces(4, seed=1)
    camera = parse_camera("corridor")
    a = capture_frames(faces, camera, np.random.default_rng(3))
    b = capture_frames(faces, camera, np.random.default_rng(3))
    c = capture_frames(faces, camera, np.random.default_rng(4))
    assert a.shape == faces.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(a[..., 0] == a[..., 2])  # grey
    assert a.mean() < faces.mean() - 10  # gamma 1.8 darkens


def test_device_cameras_are_drawn_around_their_domain():
    draws = [draw_device_camera(DOMAINS["corridor"], np.random.default_rng(s)) for s in range(20)]
    assert draws[0] == draw_device_camera(DOMAINS["corridor"], np.random.default_rng(0))
    sizes = {d.face_px for d in draws}
    assert len(sizes) > 3 and min(sizes) >= 23 and max(sizes) <= 33


def test_camera_spec_overrides_and_one_line_errors():
    spec = parse_camera("face_px=32,gamma=2.0,noise=7,jpeg=50")
    assert (spec.face_px, spec.gamma, spec.noise, spec.jpeg, spec.grey) == (32, 2.0, 7.0, 50, False)
    assert parse_camera("corridor,face_px=24") == DOMAINS["corridor"].__class__(
        grey=True, gamma=1.8, face_px=24, noise=6.0)
    for bad, field in [("face_px=abc", "face_px"), ("jpeg=200", "jpeg"), ("focus=3", "focus"),
                       ("basement", "basement"), ("gamma=-1", "gamma")]:
        with pytest.raises(ValueError, match=field) as info:
            parse_camera(bad)
        assert "\n" not in str(info.value)


def test_gallery_pairs_are_gallery_times_probes():
    gallery, probes = np.eye(3, 4), np.eye(5, 4)
    scores, genuine = gallery_pair_scores(gallery, ["a", "b", "c"], probes, ["a", "a", "b", "x", "y"], "l2")
    assert scores.shape == (15,) and genuine.sum() == 3  # 2 probes of a + 1 of b, one gallery image each


def test_cli_gallery_mode_counts_only_gallery_probe_pairs(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    save_checkpoint(model, briefly_trained_backbone(), {})
    names = ["ann", "bob", "cat"]
    save_folders(FaceDataset(blob_faces(6, 0), np.arange(6) % 3, names), tmp_path / "gallery")  # 2 each
    save_folders(FaceDataset(blob_faces(12, 1), np.arange(12) % 4, names + ["dan"]), tmp_path / "probes")  # 3 each
    assert facefed.cli.main(["evaluate", "--model", str(model), "--gallery", str(tmp_path / "gallery"),
                             "--data", str(tmp_path / "probes"), "--camera", "door-night"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["genuine_pairs"] == 3 * 3 * 2  # 3 enrolled people x 3 probes x 2 enrolment images
    assert report["impostor_pairs"] == 6 * 12 - 18 and report["score"] == "cosine"
    assert facefed.cli.main(["evaluate", "--model", str(model), "--data", str(tmp_path / "probes"),
                             "--camera", "face_px=big"]) == 2
    assert "face_px must be an integer" in capsys.readouterr().err
