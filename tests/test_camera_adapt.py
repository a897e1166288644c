"""The one-owner camera trainer and the camera experiment's plumbing (face-api weights and celeb-dev needed)."""

import json

import numpy as np
import pytest
import torch

import facefed.cli
from model_zoo.camera import DOMAINS, capture_frames
from model_zoo.camera_adapt import AdaptConfig, DeviceData, adapt, build_model, embed, get_tensors, teacher_for
from model_zoo.checkpoint import load_checkpoint
from model_zoo.data import load_dataset, save_folders, shared_dataset_dir
from model_zoo.faceapi import default_models_dir

CELEB = shared_dataset_dir("celeb-dev")
pytestmark = pytest.mark.skipif(CELEB is None or not default_models_dir().is_dir(),
                                reason="needs ../shared/datasets/celeb-dev and the face-api weights")


@pytest.fixture(scope="module")
def celeb_small():
    celeb = load_dataset(CELEB)
    keep = np.concatenate([np.flatnonzero(celeb.labels == k)[:12] for k in range(8)])
    return celeb.subset(keep)


def _mean_pairwise(x: np.ndarray) -> float:
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    return float(d[np.triu_indices(len(x), 1)].mean())


def test_one_owner_trainer_pulls_owner_frames_in_without_collapse(celeb_small):
    torch.manual_seed(0)
    model = build_model()
    version0 = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    owner = celeb_small.images[celeb_small.labels == 0]
    rng = np.random.default_rng(0)
    data = DeviceData(owner[:3], capture_frames(owner[3:9], DOMAINS["corridor"], rng), DOMAINS["corridor"])
    others = celeb_small.images[celeb_small.labels > 0][::12]  # one photo of each of 7 other people
    teacher = teacher_for(model, data, others)
    shared, personal = model.parts("last")
    assert shared and personal and not set(shared) & set(personal)
    before_frames, before_others = embed(model, data.frames), embed(model, others)
    stats = adapt(model, shared + personal, version0, data, teacher, AdaptConfig(steps=12, batch=4), rng)
    assert np.isfinite(stats.loss) and stats.cpu_seconds > 0
    prototype = teacher.enrolment.numpy().mean(0)
    after_frames = embed(model, data.frames)
    assert (np.linalg.norm(after_frames - prototype, axis=1).mean()
            < np.linalg.norm(before_frames - prototype, axis=1).mean())
    # no collapse: other people's faces stay nearly as far apart as version 0 put them (measured: -10 %; plain
    # regression onto version 0 without the spread term shrank it by 29 %)
    assert _mean_pairwise(embed(model, others)) > 0.8 * _mean_pairwise(before_others)
    untouched = set(version0) - set(shared) - set(personal)
    assert all(np.array_equal(get_tensors(model, [n])[n], version0[n]) for n in list(untouched)[:5])


def test_camera_quick_plumbing_with_tiny_settings(celeb_small, tmp_path, monkeypatch, capsys):
    fleet_faces = celeb_small.subset(np.flatnonzero(celeb_small.labels < 6))
    save_folders(fleet_faces, tmp_path / "fleet")
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels >= 6)), tmp_path / "bank")
    import facefed.camera_experiment as ce

    monkeypatch.setitem(ce.PRESETS, "camera-quick", {"rounds": 1, "steps": 1, "batch": 2, "enrol": 2,
                                                      "train_frames": 2, "test_frames": 2, "unseen_probes": 2,
                                                      "bank": [tmp_path / "bank"], "bank_per_identity": 2})
    out = tmp_path / "run"
    assert facefed.cli.main(["experiment", "--preset", "camera-quick", "--data", str(tmp_path / "fleet"),
                             "--camera", "corridor,face_px=24", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == list(ce.ARMS)
    for arm in results["arms"].values():
        for key in ("owner_camera_eer", "owner_frr_at_far_1e-3", "unseen_clean_eer", "unseen_camera_eer",
                    "bytes_per_round"):
            assert key in arm
    # One upload on the wire: the shared part's float32 tensors, plus their safetensors header and the manifest.
    payload = 4 * results["setup"]["shared_floats"]
    assert payload < results["arms"]["fedavg"]["bytes_per_round"] < 2 * payload
    # The int8-trunk profile shares only the fp32 stage after its trunk: conv256_down_out's two scale/shift pairs.
    int8 = results["setup"]["int8_profile"]
    assert int8["shared_floats"] == 4 * 256 and int8["personal_floats"] == 256 * 128
    assert 4 * int8["shared_floats"] < results["arms"]["fedavg_personal_int8"]["bytes_per_round"] < payload
    # The federated arms ran over MQTT (an agent per device, the service's journal: round 0, then all 3 devices)...
    journal = [json.loads(line) for line in (out / "rounds" / "fedavg" / "rounds.jsonl").read_text().splitlines()]
    assert [entry["clients"] for entry in journal] == [0, 3]
    assert sorted(p.name for p in (out / "devices" / "fedavg").iterdir()) == ["camera-0", "camera-1", "camera-2"]
    # ... and on the round engine alone they give the same figures and wire bytes.
    assert facefed.cli.main(["experiment", "--preset", "camera-quick", "--data", str(tmp_path / "fleet"),
                             "--camera", "corridor,face_px=24", "--methods", "fedavg,fedavg_personal",
                             "--transport", "inprocess", "--out", str(tmp_path / "inprocess")]) == 0
    alone = json.loads((tmp_path / "inprocess" / "results.json").read_text())["arms"]
    for arm in ("fedavg", "fedavg_personal"):
        # the same upload, to a few bytes: its manifest carries the measured training seconds as a float
        assert abs(alone[arm]["bytes_per_round"] - results["arms"][arm]["bytes_per_round"]) <= 8
        for key in ("owner_camera_eer", "unseen_clean_eer", "unseen_camera_eer"):
            assert alone[arm][key] == pytest.approx(results["arms"][arm][key], abs=1e-6)
    # each device keeps its personal part on its own disk, whichever transport carried the rounds
    assert (tmp_path / "inprocess" / "devices" / "fedavg_personal" / "camera-0" / "state"
            / "camera_personal.safetensors").is_file()
    assert not (tmp_path / "inprocess" / "devices" / "fedavg" / "camera-0" / "state"
                / "camera_personal.safetensors").exists()  # fedavg's devices do not personalise
    assert (out / "report.md").is_file() and (out / "owner_eer_per_round.png").is_file()
    backbone, meta = load_checkpoint(out / "models" / "fedavg_personal.safetensors")
    assert meta["arm"] == "fedavg_personal"
    backbone, meta = load_checkpoint(out / "models" / "fedavg_personal_int8.safetensors")
    assert meta["arm"] == "fedavg_personal_int8" and backbone.arch_kwargs["trainable"] == "last"
    assert facefed.cli.main(["evaluate", "--model", str(out / "models" / "fedavg.safetensors"),
                             "--data", str(tmp_path / "bank")]) == 0
    assert facefed.cli.main(["experiment", "--preset", "camera-quick", "--camera", "corridor,jpeg=500",
                             "--out", str(tmp_path / "bad")]) == 2
    assert "jpeg" in capsys.readouterr().err
    assert facefed.cli.main(["experiment", "--preset", "quick", "--transport", "inprocess",
                             "--out", str(tmp_path / "not-camera")]) == 2
    assert "camera presets only" in capsys.readouterr().err


def test_camera_model_is_what_the_device_knows_not_the_camera_it_has(celeb_small, tmp_path):
    import facefed.camera_experiment as ce
    from model_zoo.camera import CameraSpec, parse_camera

    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels < 6)), tmp_path / "fleet")
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels >= 6)), tmp_path / "bank")
    fleets = {}
    for model in ce.CAMERA_MODELS:
        cfg = ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / model, bank=[tmp_path / "bank"],
                                        enrol=2, train_frames=2, test_frames=2, unseen_probes=2, bank_per_identity=2,
                                        camera_model=model).check()
        fleets[model] = ce.build_fleet(cfg, say=lambda line: None)
    own, measured, domain, none = (fleets[m].devices for m in ("own", "measured", "domain", "none"))
    for a, m, b, c in zip(own, measured, domain, none):
        assert a.camera == m.camera == b.camera == c.camera == a.data.camera != parse_camera("corridor")  # per device
        assert b.data.camera == parse_camera("corridor") and c.data.camera == CameraSpec()
        assert m.data.camera.grey and 0 < m.data.camera.face_px < 60  # measured on its 2 frames: grey and small
        np.testing.assert_array_equal(a.data.frames, m.data.frames)
        np.testing.assert_array_equal(a.test_frames, c.test_frames)  # the same frames: only the knowledge differs
    with pytest.raises(ce.CameraExperimentError, match="camera_model"):
        ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / "bad", bank=[tmp_path / "bank"],
                                  camera_model="exact").check()


def test_unlocked_owner_frames_are_the_frames_version0_accepts_at_far_1e_3(celeb_small, tmp_path):
    import facefed.camera_experiment as ce
    from edge_agent.unlock.calibration import mean_template
    from model_zoo.metrics import score_matrix

    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels < 6)), tmp_path / "fleet")
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels >= 6)), tmp_path / "bank")
    fleets = {}
    for frames in ce.OWNER_FRAMES:
        cfg = ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / frames, bank=[tmp_path / "bank"],
                                        camera="door-night", enrol=2, train_frames=8, test_frames=2,
                                        unseen_probes=2, bank_per_identity=2, owner_frames=frames).check()
        fleets[frames] = ce.build_fleet(cfg, say=lambda line: None)
    version0 = build_model()
    kept_total = 0
    for every, kept in zip(fleets["all"].devices, fleets["unlocked"].devices):
        np.testing.assert_array_equal(every.test_frames, kept.test_frames)  # the same fleet, fewer training frames
        # Scored as unlock scores the pretrained descriptor: cosine to the normalised mean template.
        template = mean_template(embed(version0, every.data.enrolment), "cosine")
        similarity = score_matrix(template[None], embed(version0, every.data.frames))[:, 0]
        kept_similarity = score_matrix(template[None], embed(version0, kept.data.frames))[:, 0]
        assert 0 < len(kept.data.frames) <= len(every.data.frames)
        # The kept ones are the most alike: every frame left out scores below every frame kept.
        left_out = np.setdiff1d(similarity.round(5), kept_similarity.round(5))
        assert left_out.size == 0 or left_out.max() < kept_similarity.min()
        kept_total += len(kept.data.frames)
    assert kept_total < sum(len(d.data.frames) for d in fleets["all"].devices)
    with pytest.raises(ce.CameraExperimentError, match="owner_frames"):
        ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / "bad", owner_frames="some").check()


def test_a_household_device_scores_each_member_against_their_own_enrolment_and_trains_towards_it(celeb_small, tmp_path):
    import facefed.camera_experiment as ce

    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels < 7)), tmp_path / "fleet")
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels == 7)), tmp_path / "bank")
    cfg = ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / "run", bank=[tmp_path / "bank"],
                                    enrol=2, train_frames=4, test_frames=3, unseen_probes=2, bank_per_identity=2,
                                    household="2-2").check()
    fleet = ce.build_fleet(cfg, say=lambda line: None)  # 7 people: 3 on no device, 4 in two households
    assert [len(d.owners) for d in fleet.devices] == [2, 2]
    dev = fleet.devices[0]
    assert list(dev.enrolment_names) == [dev.owners[0]] * 2 + [dev.owners[1]] * 2
    assert list(dev.data.people()[1]) == [0] * 4 + [1] * 4 and list(dev.test_names[::3]) == dev.owners
    model = build_model()
    owner = ce.evaluate_fleet(fleet, lambda i: model, unseen=False)["owner"]
    # genuine: each member's 3 frames x their own 2 photos; impostor: the other member's and 6 off-device frames
    assert owner["genuine_pairs"] == 2 * (2 * 3 * 2)
    assert owner["impostor_pairs"] == 2 * (4 * (6 + 6) - 2 * 3 * 2)

    version0 = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    teacher = teacher_for(model, dev.data, fleet.bank)
    people = dev.data.people()
    prototypes = np.stack([teacher.enrolment.numpy()[people[0] == k].mean(0) for k in (0, 1)])

    def distance_to_own_prototype() -> float:
        return float(np.linalg.norm(embed(model, dev.data.frames) - prototypes[people[1]], axis=1).mean())

    before = distance_to_own_prototype()
    shared, personal = model.parts("last")
    adapt(model, shared + personal, version0, dev.data, teacher, AdaptConfig(steps=12, batch=4),
          np.random.default_rng(0))
    assert distance_to_own_prototype() < before
    for bad in ("0", "6", "2-x", "4-2"):
        with pytest.raises(ce.CameraExperimentError, match="household"):
            ce.parse_household(bad)


def test_named_off_device_people_and_frames_recaptured_from_few_photos(celeb_small, tmp_path):
    """bench/camera_fleet_size.py's fleets: the same people off every device at each size, and people with a few
    photos (ORL, Yale) on devices, their frames re-captured from photos the test frames never come from."""
    import facefed.camera_experiment as ce

    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels < 7)), tmp_path / "fleet")
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels == 7)), tmp_path / "bank")
    names = [f"fleet_{celeb_small.identities[k]}" for k in (1, 3, 4)]
    cfg = ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / "run", bank=[tmp_path / "bank"],
                                    enrol=2, train_frames=20, test_frames=10, unseen_probes=2, bank_per_identity=2,
                                    unseen=tuple(names), reuse_photos=True).check()
    fleet = ce.build_fleet(cfg, say=lambda line: None)
    assert sorted(set(fleet.unseen_names)) == sorted(names)
    assert len(fleet.devices) == 4 and not {o for d in fleet.devices for o in d.owners} & set(names)
    assert all(len(d.data.frames) == 20 and len(d.test_frames) == 10 for d in fleet.devices)
    # a fleet without one of the owners splits the named people's photos alike
    save_folders(celeb_small.subset(np.flatnonzero(celeb_small.labels < 6)), tmp_path / "fewer" / "fleet")
    fewer = ce.build_fleet(ce.CameraExperimentConfig(**{**cfg.__dict__, "data": [tmp_path / "fewer" / "fleet"]}),
                           say=lambda line: None)
    assert len(fewer.devices) == 3
    np.testing.assert_array_equal(fewer.unseen_gallery, fleet.unseen_gallery)
    np.testing.assert_array_equal(fewer.unseen_probes, fleet.unseen_probes)
    train, test = ce.frame_sources(np.arange(10), cfg)  # 12 photos, 2 enrolled: 7 for training, 3 for test
    assert len(train) == 20 and len(test) == 10 and set(train) == set(range(7)) and set(test) == {7, 8, 9}
    with pytest.raises(ce.CameraExperimentError, match="unseen people"):
        ce.build_fleet(ce.CameraExperimentConfig(data=[tmp_path / "fleet"], out=tmp_path / "bad",
                                                 bank=[tmp_path / "bank"], unseen=("nobody",)), say=lambda line: None)
