"""Face unlock's pure logic against hand-computed cases: EAR and head pose, liveness, frame verdicts, the lock
state machine, threshold calibration. No models, no files."""
from __future__ import annotations

import numpy as np
import pytest

from edge_agent.unlock.calibration import (calibrate_threshold, draw_enrolments, mean_template, template_scores,
                                           template_trials)
from edge_agent.unlock.decision import (MULTI_FACE_MARGINS, DecisionRules, Event, LockState, UnlockStateMachine, Verdict,
                                        frame_verdict)
from edge_agent.unlock.geometry import eye_aspect_ratio, mean_eye_aspect_ratio, roll_degrees, yaw_ratio
from edge_agent.unlock.liveness import BlinkChallenge, MotionChallenge, NoChallenge, make_challenge


def eye(width: float, opening: float, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    """Six eye points p1..p6: corners at x0 and x0 + width, lids at +-opening / 2."""
    h = opening / 2
    return np.array([[x0, y0], [x0 + width / 3, y0 - h], [x0 + 2 * width / 3, y0 - h], [x0 + width, y0],
                     [x0 + 2 * width / 3, y0 + h], [x0 + width / 3, y0 + h]])


def face68(opening: float = 3.0, nose_x: float = 50.0, tilt_dy: float = 0.0) -> np.ndarray:
    """68 landmarks with the points the measures use placed by hand (the rest stay at the face centre)."""
    points = np.full((68, 2), 50.0)
    points[0], points[16] = (10.0, 50.0), (90.0, 50.0)  # jaw ends
    points[30] = (nose_x, 55.0)  # nose tip
    points[36:42] = eye(10.0, opening, 25.0, 40.0)
    points[42:48] = eye(10.0, opening, 65.0, 40.0 + tilt_dy)
    return points


def test_eye_aspect_ratio_by_hand():
    # (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|) = (3 + 3) / (2 * 10)
    assert eye_aspect_ratio(eye(10.0, 3.0)) == pytest.approx(0.3)
    assert eye_aspect_ratio(eye(10.0, 0.0)) == pytest.approx(0.0)
    assert mean_eye_aspect_ratio(face68(opening=2.0)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="eye corners coincide"):
        eye_aspect_ratio(np.zeros((6, 2)))
    with pytest.raises(ValueError, match=r"\[68, 2\]"):
        mean_eye_aspect_ratio(np.zeros((5, 2)))


def test_eye_aspect_ratio_ignores_scale_and_rotation():
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert eye_aspect_ratio(3.7 * eye(10.0, 3.0) @ rotation.T) == pytest.approx(0.3)


def test_head_pose_proxies_by_hand():
    assert yaw_ratio(face68()) == pytest.approx(0.0)
    assert yaw_ratio(face68(nose_x=58.0)) == pytest.approx(8.0 / 40.0)  # nose 8 px right of centre, half width 40
    assert yaw_ratio(face68(nose_x=42.0)) == pytest.approx(-0.2)
    assert roll_degrees(face68()) == pytest.approx(0.0)
    assert roll_degrees(face68(tilt_dy=40.0)) == pytest.approx(45.0)  # eye centres 40 apart in x and in y


def observe_all(challenge, samples, fps: float = 10.0) -> list[bool]:
    return [challenge.observe(i / fps, points) for i, points in enumerate(samples)]


def test_blink_passes_after_open_closed_open():
    opened, closed = face68(3.0), face68(2.2)  # EAR 0.30 -> 0.22, the drop face-api's landmarks show
    passed = observe_all(BlinkChallenge(), [opened] * 4 + [closed] + [opened] * 2)
    assert passed == [False] * 5 + [True, True]


def test_blink_needs_a_baseline_a_reopening_and_a_short_closure():
    opened, closed = face68(3.0), face68(1.0)
    assert not any(observe_all(BlinkChallenge(), [opened] * 20))  # a static photo: never
    assert not any(observe_all(BlinkChallenge(), [closed, opened, opened]))  # no baseline before the closure
    assert not any(observe_all(BlinkChallenge(), [opened] * 4 + [closed] * 10))  # never reopens
    assert not any(observe_all(BlinkChallenge(), [opened] * 4 + [closed] * 9 + [opened]))  # 0.9 s: eyes shut
    assert not any(observe_all(BlinkChallenge(), [opened] * 4 + [face68(2.7)] + [opened] * 3))  # -10 %: a smile


def test_blink_sticks_until_reset_and_ignores_missing_faces():
    challenge = BlinkChallenge()
    observe_all(challenge, [face68(3.0)] * 4 + [face68(1.0), face68(3.0)])
    assert challenge.passed and challenge.observe(9.0, None)
    challenge.reset()
    assert not challenge.passed and not challenge.observe(10.0, face68(3.0))


def test_motion_needs_a_turn_each_way():
    frontal, left, right = face68(nose_x=50.0), face68(nose_x=42.0), face68(nose_x=58.0)
    assert observe_all(MotionChallenge(), [frontal, frontal, left, frontal, right])[-1]
    assert not any(observe_all(MotionChallenge(), [frontal] * 3 + [left] * 3))  # one way only
    assert not any(observe_all(MotionChallenge(), [frontal] * 10))


def test_make_challenge():
    assert isinstance(make_challenge("off"), NoChallenge) and make_challenge("off").observe(0.0, None)
    with pytest.raises(ValueError, match="off, blink, motion"):
        make_challenge("smile")


RULES = DecisionRules(threshold=0.9, k=3, n=5, timeout_s=2.0, lockout_failures=2, lockout_s=5.0,
                      relock_after_s=1.0, multi_face_margin=0.05)


@pytest.mark.parametrize(("scores", "verdict"), [
    ([], Verdict.NO_FACE),
    ([0.91], Verdict.MATCH),
    ([0.9], Verdict.MATCH),  # >= threshold
    ([0.89], Verdict.NO_MATCH),
    ([0.96, 0.3], Verdict.MATCH),  # several faces, one clearly the owner
    ([0.93, 0.3], Verdict.AMBIGUOUS),  # the best is not clear of the margin
    ([0.97, 0.91], Verdict.AMBIGUOUS),  # two faces match
    ([0.5, 0.4], Verdict.NO_MATCH),
])
def test_frame_verdict(scores, verdict):
    assert frame_verdict(scores, RULES) is verdict


def run(machine, steps, fps: float = 10.0, start: int = 0):
    """steps: (verdict, live) per frame at fps; returns the (frame, event) pairs and the last decision."""
    events, decision = [], None
    for i, (verdict, live) in enumerate(steps, start):
        decision = machine.step(i / fps, verdict, live)
        if decision.event:
            events.append((i, decision.event))
    return events, decision


M, X, N = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NO_FACE


def test_unlocks_on_k_of_n_with_liveness_then_relocks():
    machine = UnlockStateMachine(RULES)
    steps = [(M, False), (X, False), (M, False), (M, False), (M, True), (M, True)] + [(N, True)] * 12
    events, decision = run(machine, steps)
    # frame 3 has 3 matches of the last 4 but no liveness; frame 4 unlocks; last match at 0.5 s, relock 1 s later.
    assert events == [(4, Event.UNLOCKED), (15, Event.RELOCKED)]
    assert decision.state is LockState.LOCKED


def test_k_of_n_window_slides():
    machine = UnlockStateMachine(RULES)
    events, _ = run(machine, [(M, True), (X, True), (X, True), (M, True), (X, True), (M, True)])
    assert events == []  # never 3 matches among the last 5 face frames
    events, _ = run(machine, [(M, True)], start=6)
    assert events == [(6, Event.UNLOCKED)]  # window (X, M, X, M, M)


def test_timeouts_count_failures_then_lock_out_for_a_while():
    machine = UnlockStateMachine(RULES)
    fps = 8.0  # frame times exact in binary: 0.125 s apart
    events, decision = run(machine, [(X, True)] * 40, fps)
    # attempt 1: 0-2 s fails at frame 16; attempt 2: 2.125-4.125 s fails at 33 -> lockout until 9.125 s
    assert events == [(16, Event.ATTEMPT_FAILED), (33, Event.LOCKED_OUT)]
    assert decision.state is LockState.LOCKED_OUT and decision.lockout_until == 9.125
    events, _ = run(machine, [(M, True)] * 40, fps, start=40)
    assert events[0] == (73, Event.LOCKOUT_ENDED)  # the owner cannot unlock during the lockout
    assert events[1] == (76, Event.UNLOCKED)  # 3 more matching frames once it ends
    assert machine.failures == 0


def test_rules_are_validated():
    with pytest.raises(ValueError, match="k <= n"):
        DecisionRules(threshold=0.5, k=6, n=5)
    with pytest.raises(ValueError, match="cosine"):
        DecisionRules(threshold=1.5)


def test_rules_take_an_l2_threshold_and_refuse_nonsense():
    rules = DecisionRules(threshold=-0.48, score="l2")
    assert rules.multi_face_margin == MULTI_FACE_MARGINS["l2"] > MULTI_FACE_MARGINS["cosine"]
    assert DecisionRules(threshold=0.9).multi_face_margin == MULTI_FACE_MARGINS["cosine"]
    # Higher is more alike under l2 too: a face at distance 0.3 matches, one at 0.6 does not.
    assert frame_verdict([-0.3], rules) is Verdict.MATCH and frame_verdict([-0.6], rules) is Verdict.NO_MATCH
    # Two faces: the owner's lead must clear the margin in distance units.
    assert frame_verdict([-0.25, -0.7], rules) is Verdict.MATCH
    assert frame_verdict([-0.45, -0.7], rules) is Verdict.AMBIGUOUS
    for bad in (0.9, -5.0, float("nan")):  # a cosine threshold, or one that accepts everyone, or none at all
        with pytest.raises(ValueError, match="minus a euclidean distance"):
            DecisionRules(threshold=bad, score="l2")
    with pytest.raises(ValueError, match="unknown score"):
        DecisionRules(threshold=-0.5, score="manhattan")


def test_calibrated_threshold_by_hand():
    # 4 genuine and 10 impostor scores; FAR 0.1 allows 1 false accept.
    genuine_scores = [0.95, 0.9, 0.8, 0.6]
    impostor_scores = [0.85, 0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1, 0.0, -0.1]
    scores = np.array(genuine_scores + impostor_scores)
    genuine = np.array([True] * 4 + [False] * 10)
    result = calibrate_threshold(scores, genuine, target_far=0.1)
    assert result.threshold == pytest.approx(0.8)  # lowest threshold with one false accept (0.85)
    assert (result.false_accepts, result.false_rejects) == (1, 1)
    assert result.far == pytest.approx(0.1) and result.frr == pytest.approx(0.25)
    assert (result.genuine_trials, result.impostor_trials) == (4, 10)
    strict = calibrate_threshold(scores, genuine, target_far=0.05)  # no false accept allowed
    assert strict.threshold == pytest.approx(0.9) and strict.far == 0.0 and strict.false_rejects == 2
    with pytest.raises(ValueError, match="target_far"):
        calibrate_threshold(scores, genuine, target_far=0.0)


def test_template_trials_by_hand():
    # Person 0 enrols images 0 and 1: template (1, 1) / sqrt(2). Person 1's image 3 scores 0.6 and 0.8 against
    # them one by one, yet 1.4 / sqrt(2) = 0.990 against their mean, above person 0's own image 2:
    # averaging raises impostor scores, so the threshold is calibrated on template trials.
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.96, 0.28], [0.6, 0.8], [-2.0, 0.0]])  # row 4 not unit
    labels = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(mean_template(embeddings[:2]), [0.5 ** 0.5, 0.5 ** 0.5], rtol=1e-6)
    scores, genuine = template_trials(embeddings, labels, [np.array([0, 1])])
    np.testing.assert_allclose(scores, [1.24 / 2 ** 0.5, 1.4 / 2 ** 0.5, -(0.5 ** 0.5)], rtol=1e-6)
    assert genuine.tolist() == [True, False, False]  # images 2, 3, 4: the enrolled images are not probes
    # FAR 0.5 of 2 impostor trials allows one false accept: the threshold falls to the genuine 0.877.
    result = calibrate_threshold(scores, genuine, target_far=0.5)
    assert result.threshold == pytest.approx(1.24 / 2 ** 0.5, rel=1e-6)
    assert (result.false_accepts, result.false_rejects, result.impostor_trials, result.genuine_trials) == (1, 0, 2, 1)
    # Two enrolments: person 1 enrols image 3 alone (the template is the image), then image 4 is its genuine probe.
    scores, genuine = template_trials(embeddings, labels, [np.array([0, 1]), np.array([3])])
    np.testing.assert_allclose(scores[3:], [0.6, 0.8, 0.8, -0.6], rtol=1e-6)
    assert genuine.tolist() == [True, False, False, False, False, False, True]
    np.testing.assert_allclose(template_scores(embeddings, [np.array([3])]), [[0.6, 0.8, 0.8, 1.0, -0.6]], rtol=1e-6)
    with pytest.raises(ValueError, match="one identity"):
        template_trials(embeddings, labels, [np.array([1, 3])])


def test_l2_templates_and_calibration_by_hand():
    # Under l2 the template is the mean of the raw descriptors (not renormalised) and a trial scores minus the
    # euclidean distance to it.
    embeddings = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [4.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(mean_template(embeddings[:2], "l2"), [1.0, 1.0])
    scores, genuine = template_trials(embeddings, labels, [np.array([0, 1])], "l2")
    np.testing.assert_allclose(scores, [0.0, -3.0])
    assert genuine.tolist() == [True, False]
    result = calibrate_threshold(scores, genuine, target_far=0.5, score="l2")
    assert (result.threshold, result.score, result.false_accepts) == (0.0, "l2", 0)
    assert calibrate_threshold(scores, genuine, target_far=0.5).score == "cosine"


def test_enrolment_draws_are_seeded_and_leave_a_genuine_probe():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 6)
    enrolments = draw_enrolments(labels, enrol_images=5, draws=4, seed=3)
    assert len(enrolments) == 8  # person 1 has no image left over after 5, so only persons 0 and 2 enrol
    assert [int(labels[e[0]]) for e in enrolments] == [0] * 4 + [2] * 4
    for e in enrolments:
        assert len(np.unique(e)) == 5 and len(np.unique(labels[e])) == 1
    assert len({tuple(e) for e in enrolments[:4]}) > 1  # the draws differ ...
    again = draw_enrolments(labels, enrol_images=5, draws=4, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(enrolments, again))  # ... and repeat with the seed
    scores, genuine = template_trials(np.eye(18), labels, enrolments)
    # per enrolment: own images outside it (2 or 1) genuine, the other people's (11 or 12) impostor
    assert (int(genuine.sum()), int((~genuine).sum())) == (4 * 2 + 4 * 1, 4 * 11 + 4 * 12)
    with pytest.raises(ValueError, match="more than 5 images"):
        draw_enrolments(np.array([0] * 5 + [1] * 3))


# --- the mesh's measures and the reasons shown on the console ---

def face_mesh(opening: float = 3.0, turn_dz: float = 0.0) -> np.ndarray:
    """468 mesh points with the eyes and face sides placed by hand (the rest at the face centre)."""
    from model_zoo.vision import facemesh

    points = np.full((468, 3), 50.0)
    for indices, x0 in ((facemesh.RIGHT_EYE, 25.0), (facemesh.LEFT_EYE, 65.0)):
        points[list(indices), :2] = eye(10.0, opening, x0, 40.0)
    left, right = facemesh.FACE_SIDES
    points[left] = (10.0, 50.0, 50.0 - turn_dz / 2)
    points[right] = (90.0, 50.0, 50.0 + turn_dz / 2)
    return points


def test_mesh_eye_openness_and_turn_by_hand():
    assert mean_eye_aspect_ratio(face_mesh(opening=2.0)) == pytest.approx(0.2)
    assert yaw_ratio(face_mesh()) == pytest.approx(0.0)
    # The side at image right 48 deeper over 80 wide: sin(yaw) = 48 / hypot(80, 48), the nose towards image right.
    assert yaw_ratio(face_mesh(turn_dz=48.0)) == pytest.approx(48.0 / np.hypot(80.0, 48.0))
    assert roll_degrees(face_mesh()) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="depth"):
        yaw_ratio(face_mesh()[:, :2])


def test_challenges_are_tuned_per_landmark_set():
    assert make_challenge("blink", "mesh").settings.closed_ratio > make_challenge("blink", "68").settings.closed_ratio
    assert make_challenge("motion", "mesh").settings.min_turn < make_challenge("motion", "68").settings.min_turn
    with pytest.raises(ValueError, match="mesh"):
        make_challenge("blink", "98")


def test_frame_reasons_say_why_unlock_waits_or_refuses():
    from edge_agent.unlock.decision import Decision
    from edge_agent.unlock.session import FaceRecord, frame_reason

    rules = DecisionRules(threshold=0.9, k=3, lockout_failures=5)
    owner = FaceRecord([0, 0, 10, 10], "owner", 0.95, 0.3)
    stranger = FaceRecord([0, 0, 10, 10], "owner", 0.42, 0.3)
    locked = Decision(LockState.LOCKED, None, 1, 0, None)
    blink, off = BlinkChallenge(), NoChallenge()

    assert frame_reason(Verdict.NO_FACE, locked, None, 0, rules, blink) == "no face"
    assert frame_reason(Verdict.AMBIGUOUS, locked, owner, 2, rules, blink).startswith("several faces (2)")
    assert frame_reason(Verdict.NO_MATCH, locked, stranger, 1, rules, blink) == \
        "no match: best owner 0.420 < threshold 0.900"
    assert frame_reason(Verdict.MATCH, locked, owner, 1, rules, blink) == "waiting for a blink (owner 0.950)"
    assert frame_reason(Verdict.MATCH, locked, owner, 1, rules, off) == "matching: 1 of 3 frames needed"
    assert frame_reason(Verdict.MATCH, Decision(LockState.UNLOCKED, Event.UNLOCKED, 3, 0, None), owner, 1, rules,
                        off) == "unlocked: owner 0.950"
    assert frame_reason(Verdict.MATCH, Decision(LockState.LOCKED_OUT, None, 0, 5, 40.0), owner, 1, rules,
                        off).startswith("locked out")
