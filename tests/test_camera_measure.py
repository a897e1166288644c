"""A device measures its camera on its own frames and enrolment (model_zoo.camera_measure; celeb-dev needed)."""

import numpy as np
import pytest

from model_zoo.camera import capture_frames, parse_camera
from model_zoo.camera_measure import measure_camera
from model_zoo.data import load_dataset, shared_dataset_dir

CELEB = shared_dataset_dir("celeb-dev")
pytestmark = pytest.mark.skipif(CELEB is None, reason="needs ../shared/datasets/celeb-dev")


@pytest.fixture(scope="module")
def owner():
    """One person's 5 clean enrolment photos and 30 other photos of them (what the camera will see)."""
    celeb = load_dataset(CELEB, layout="folders")
    photos = celeb.images[celeb.labels == 0]
    return photos[:5], photos[5:35]


@pytest.mark.parametrize("camera", ["corridor", "far-night", "face_px=40,gamma=1.3,noise=3"])
def test_measured_camera_is_near_the_camera_that_took_the_frames(owner, camera):
    enrolment, photos = owner
    truth = parse_camera(camera)
    frames = capture_frames(photos, truth, np.random.default_rng(1))
    measured = measure_camera(frames, enrolment)
    assert measured.grey == truth.grey
    assert abs(measured.face_px - truth.face_px) <= 3
    assert abs(measured.noise - truth.noise) <= 3.0
    assert abs(measured.gamma - truth.gamma) <= 0.7
    assert measure_camera(frames, enrolment) == measured  # deterministic


def test_clean_frames_measure_as_a_sharp_colour_camera_and_empty_input_is_refused(owner):
    enrolment, photos = owner
    measured = measure_camera(photos, enrolment)
    assert not measured.grey and (measured.face_px == 0 or measured.face_px >= 80)
    assert measured.noise <= 4.0 and abs(measured.gamma - 1.0) <= 0.5
    with pytest.raises(ValueError, match="frames and enrolment"):
        measure_camera(photos[:0], enrolment)
