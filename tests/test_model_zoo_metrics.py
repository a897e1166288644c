"""Verification and identification metrics against cases worked out by hand."""
import math

import numpy as np
import pytest

from model_zoo.metrics import far_key, pair_scores, rank1_accuracy, report_from_scores, verification_report


def _on_circle(degrees):
    return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# Four unit vectors at 0, 40, 70 and 120 degrees; the first three are one person, the last another.
#   genuine pairs:  (1,2) cos30 = .866   (0,1) cos40 = .766   (0,2) cos70 = .342
#   impostor pairs: (2,3) cos50 = .643   (1,3) cos80 = .174   (0,3) cos120 = -.5
# Sorted by score: G .866, G .766, I .643, G .342, I .174, I -.5  (3 genuine, 3 impostor, 6 pairs)
# Threshold t accepts score >= t. (false accepts, true accepts) as t walks down: (0,0) reject-all,
# (0,1), (0,2), (1,2), (1,3), (2,3), (3,3). Balanced accuracy (TA/3 + (3 - FA)/3) / 2: 3/6, 4/6, 5/6, 4/6,
# 5/6, 4/6, 3/6 -> best 5/6, first reached at t = cos40 (ties go to the higher threshold); with 3 genuine
# and 3 impostor pairs the all-pairs accuracy there is also 5/6.
# FPR = FA/3, FNR = 1 - TA/3: (0,1) (0,2/3) (0,1/3) (1/3,1/3) -> they meet exactly at 1/3: EER = 1/3.
# TAR@FAR 0.5 (1 false accept allowed) = 1.0; TAR@FAR 0.2 (none allowed) = 2/3.
EMB = _on_circle([0, 40, 70, 120])
LABELS = np.array([7, 7, 7, 9])


def test_pair_scores_are_cosines_of_all_pairs():
    scores, genuine = pair_scores(EMB * [[1], [2], [3], [0.5]], LABELS)  # scale must not matter
    expected = [math.cos(math.radians(d)) for d in (40, 70, 120, 30, 80, 50)]  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    assert genuine.tolist() == [True, True, False, True, False, False]


def test_hand_computed_report():
    report = verification_report(EMB, LABELS, fars=(0.5, 0.2))
    assert (report.genuine_pairs, report.impostor_pairs) == (3, 3)
    assert report.accuracy == pytest.approx(5 / 6) and report.pair_accuracy == pytest.approx(5 / 6)
    assert report.threshold == pytest.approx(math.cos(math.radians(40)))
    assert report.eer == pytest.approx(1 / 3)
    assert report.tar_at_far == pytest.approx({"5e-1": 1.0, "2e-1": 2 / 3})
    np.testing.assert_allclose(report.fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(report.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    d = report.to_dict()
    assert "fpr" not in d and "tpr" not in d and d["tar_at_far"] == report.tar_at_far


def test_eer_interpolates_between_roc_points():
    # Sorted: G .9, I .8, I .7, G .6, I .5 (2 genuine, 3 impostor).
    # ROC points (FPR, FNR): (0,1) (0,.5) (1/3,.5) (2/3,.5) (2/3,0) (1,0).
    # FPR - FNR goes -1/6 -> +1/6 between (1/3,.5) and (2/3,.5): halfway, FPR = 1/2 = FNR, so EER = 0.5.
    report = report_from_scores([0.9, 0.8, 0.7, 0.6, 0.5], [True, False, False, True, False], fars=(0.34,))
    assert report.eer == pytest.approx(0.5)
    # Balanced accuracy (TPR + TNR) / 2: accept only .9 -> (1/2 + 1) / 2 = 3/4, the best (down to .6 gives
    # (1 + 1/3) / 2 = 2/3); all-pairs accuracy there: 1 + 3 = 4 of 5.
    assert report.accuracy == pytest.approx(0.75) and report.threshold == pytest.approx(0.9)
    assert report.pair_accuracy == pytest.approx(0.8)
    assert report.tar_at_far == {"3e-1": pytest.approx(0.5)}  # one false accept allowed of 3, TPR stays 1/2


def test_ties_between_genuine_and_impostor_are_accepted_together():
    # G .5 and I .5 tie: no threshold separates them, so the ROC goes from (0, 1/2) straight to (1/2, 1).
    report = report_from_scores([0.5, 0.5, 0.9, 0.1], [True, False, True, False], fars=(0.4,))
    np.testing.assert_allclose(report.fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(report.tpr, [0, 0.5, 1, 1])
    assert report.accuracy == pytest.approx(0.75)  # accept only .9: 1 + 2 of 4


def test_tar_at_far_is_zero_when_the_best_pair_is_an_impostor():
    # 4 impostor pairs: FAR 1e-2 leaves no false accept, and the top score is an impostor, so nothing
    # can be accepted at that FAR: TAR is honestly 0.0, not an interpolated guess.
    report = report_from_scores([0.9, 0.8, 0.7, 0.2, 0.1, 0.0], [False, True, True, False, False, False])
    assert report.tar_at_far == {"1e-2": 0.0, "1e-3": 0.0, "1e-4": 0.0}
    perfect = report_from_scores([0.9, 0.8, 0.1], [True, True, False])
    assert perfect.tar_at_far["1e-4"] == 1.0 and perfect.eer == 0.0 and perfect.accuracy == 1.0


def test_reject_all_threshold_stays_finite():
    report = report_from_scores([0.9, 0.1], [False, True])
    assert report.accuracy == pytest.approx(0.5) and math.isfinite(report.threshold) and report.threshold > 0.9


def test_far_keys():
    assert [far_key(f) for f in (1e-2, 1e-3, 1e-4, 5e-3)] == ["1e-2", "1e-3", "1e-4", "5e-3"]


def test_verification_needs_both_pair_kinds():
    with pytest.raises(ValueError, match="genuine"):
        verification_report(EMB, np.arange(4))


def test_rank1_hand_computed():
    # Gallery: first image of each identity -> 0 deg (id 7) and 120 deg (id 9).
    # Probes: 40 deg (id 7, nearest 0 deg: right) and 70 deg (id 7: 70 from 0, 50 from 120: wrong).
    assert rank1_accuracy(EMB, LABELS) == pytest.approx(0.5)
    # An identity with one image is only enrolled; 20 deg is id 7 and nearest to 0 deg.
    assert rank1_accuracy(_on_circle([0, 120, 20, 300]), [7, 9, 7, 8]) == 1.0
    with pytest.raises(ValueError):
        rank1_accuracy(EMB, [1, 2, 3, 4])


def test_large_input_is_fast_and_sane():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 64))
    labels = np.repeat(np.arange(30), 20)
    emb = centres[labels] + 0.6 * rng.normal(size=(600, 64))  # 179,700 pairs
    report = verification_report(emb, labels)
    assert report.genuine_pairs == 30 * 190 and report.accuracy > 0.95 and report.eer < 0.05
    assert np.all(np.diff(report.fpr) >= 0) and np.all(np.diff(report.tpr) >= 0)
    assert report.tar_at_far["1e-2"] >= report.tar_at_far["1e-3"] >= report.tar_at_far["1e-4"]
