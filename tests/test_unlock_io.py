"""Face unlock's I/O: the owner-only template store, frame sources (image folder, video file), the `unlock:`
config section, `facefed-agent calibrate` on a few real faces, and re-embedding after a federated round."""
from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import yaml

from edge_agent.cli import main
from edge_agent.backends import TorchEmbedder
from edge_agent.config import UnlockSettings, load_agent_config, load_unlock_settings, update_unlock_settings
from edge_agent.unlock.analyzer import ModelRef, load_model
from edge_agent.unlock.commands import CommandError, _threshold
from edge_agent.unlock.decision import DecisionRules
from edge_agent.unlock.liveness import NoChallenge
from edge_agent.unlock.session import UnlockSession
from edge_agent.unlock.reembed import global_model_path, reembed_enrolment
from edge_agent.unlock.sources import open_source
from edge_agent.unlock.store import Enrolment, StoreError, TemplateStore
from fedwire.config import ConfigError
from model_zoo.data import shared_dataset_dir
from model_zoo.faceapi.loader import default_models_dir
from model_zoo.vision import default_models_dir as mediapipe_dir

REF = ModelRef(path=None, sha256="0" * 64, backend="torch")
L2_REF = ModelRef(path=None, sha256="0" * 64, backend="torch", score="l2")  # the pretrained descriptor, raw


def enrolment(name: str = "alice", n: int = 3, dim: int = 128, model: ModelRef = REF) -> Enrolment:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    if model.score == "cosine":
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return Enrolment(name, rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8), embeddings, model)


def test_store_writes_owner_only_files_and_reads_them_back(tmp_path):
    old_umask = os.umask(0o022)  # a permissive umask must not leak into the store
    try:
        store = TemplateStore(tmp_path / "store")
        saved = enrolment()
        store.save(saved)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in store.root.iterdir()} == {
        "alice.safetensors": 0o600, "alice.json": 0o600}
    loaded = store.load("alice")
    np.testing.assert_array_equal(loaded.chips, saved.chips)
    np.testing.assert_array_equal(loaded.embeddings, saved.embeddings)
    assert loaded.model == REF and store.names() == ["alice"]
    assert json.loads((store.root / "alice.json").read_text())["format"] == "facefed-unlock-templates"
    template = loaded.template()
    assert template.shape == (128,) and np.linalg.norm(template) == pytest.approx(1.0, abs=1e-6)


def test_l2_enrolment_round_trips_and_a_score_mismatch_is_refused(tmp_path):
    store = TemplateStore(tmp_path / "store")
    store.save(enrolment(model=L2_REF))
    loaded = store.load("alice")
    assert loaded.model == L2_REF and json.loads((store.root / "alice.json").read_text())["model"]["score"] == "l2"
    np.testing.assert_allclose(loaded.template(), loaded.embeddings.mean(axis=0), atol=1e-6)  # raw mean, unnormalised
    # A store written before scores were declared holds cosine embeddings.
    meta = json.loads((store.root / "alice.json").read_text())
    del meta["model"]["score"]
    (store.root / "alice.json").write_text(json.dumps(meta))
    assert store.load("alice").model.score == "cosine"
    # Templates or a threshold made under one score are never used under the other.
    analyzer = SimpleNamespace(model=L2_REF)
    with pytest.raises(ValueError, match=r"made for cosine scores, but .* compares by l2: enrol again"):
        UnlockSession(analyzer, [store.load("alice")], DecisionRules(-0.5, score="l2"), NoChallenge())
    with pytest.raises(ValueError, match=r"threshold is a cosine score, .* run `facefed-agent calibrate` again"):
        UnlockSession(analyzer, [enrolment(model=L2_REF)], DecisionRules(0.94), NoChallenge())
    settings = UnlockSettings(threshold=0.94)  # a config calibrated before: a cosine threshold
    with pytest.raises(CommandError, match="unlock.threshold is a cosine score"):
        _threshold(SimpleNamespace(threshold=None), settings, analyzer)
    assert _threshold(SimpleNamespace(threshold=None), UnlockSettings(threshold=-0.5, threshold_score="l2"),
                      analyzer) == -0.5


@pytest.mark.skipif(not (default_models_dir() / "face_recognition_model.bin").is_file(),
                    reason="needs the face-api weights in ../shared/models/faceapi (set FACEFED_FACEAPI_DIR)")
def test_each_model_declares_its_score():
    from model_zoo.backbones import PRETRAINED_FACEAPI, build_backbone, model_score

    # Measured per use (BENCHMARKS.md): raw L2 for the pretrained descriptor's image pairs, cosine for its unlock
    # templates; checkpoints and exports give normalised outputs and compare by cosine everywhere.
    assert model_score(PRETRAINED_FACEAPI) == model_score(None) == "l2"
    assert model_score(PRETRAINED_FACEAPI, "unlock") == "cosine"
    assert {model_score(f"m{suffix}", use) for suffix in (".safetensors", ".onnx", ".tflite")
            for use in ("evaluate", "unlock")} == {"cosine"}
    embedder, ref = load_model(PRETRAINED_FACEAPI)
    assert embedder.score == ref.score == "cosine"
    with pytest.raises(ValueError, match="only the pretrained face-api descriptor"):
        load_model("model.onnx", score="l2")
    embedder, ref = load_model(PRETRAINED_FACEAPI, score="l2")
    assert embedder.score == ref.score == "l2"
    faces = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    raw = embedder.embed(faces)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=0.05)  # face-api's descriptor as is
    normalised = TorchEmbedder(build_backbone("faceapi-resnet")).embed(faces)  # the backbone's own (cosine) output
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normalised, atol=1e-5)


def test_store_refuses_files_others_can_read_and_bad_names(tmp_path):
    store = TemplateStore(tmp_path / "store")
    store.save(enrolment())
    os.chmod(store.root / "alice.safetensors", 0o644)
    with pytest.raises(StoreError, match="chmod 0600"):
        store.load("alice")
    with pytest.raises(ValueError, match="name must be"):
        store.save(enrolment("../etc"))
    with pytest.raises(StoreError, match="no enrolment"):
        TemplateStore(tmp_path / "empty").load_all()


def test_folder_source_times_frames_by_fps(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 50, 3), 60 * i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(str(tmp_path), fps=4) as source:
        frames = list(source)
    assert [(f.index, f.time_s) for f in frames] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert frames[2].rgb.shape == (40, 50, 3) and not source.info.live


def test_video_source_reads_every_frame_at_the_file_rate(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(6):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    with open_source(str(path)) as source:
        frames = list(source)
    assert [f.time_s for f in frames] == pytest.approx([i / 5 for i in range(6)])
    assert frames[0].rgb.dtype == np.uint8 and frames[0].rgb.shape == (48, 64, 3)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a camera index"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="no images"):
        open_source(str(tmp_path))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot open"):
        open_source(str(tmp_path / "junk.mp4"))


def test_unlock_section_is_validated_and_updated(tmp_path):
    (tmp_path / "faces").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device_id": "cam-01", "data": "faces", "state_dir": "state",
                                      "unlock": {"k": 2, "n": 4, "liveness": "motion"}}))
    settings, store = load_unlock_settings(config)
    assert (settings.k, settings.n, settings.liveness, settings.threshold) == (2, 4, "motion", None)
    assert store == tmp_path / "state" / "unlock"
    assert load_agent_config(config).unlock.k == 2
    updated = update_unlock_settings(config, {"threshold": 0.91, "target_far": 1e-4})
    assert (updated.threshold, updated.k) == (0.91, 2)
    assert yaml.safe_load(config.read_text())["device_id"] == "cam-01"  # the rest of the file is kept
    assert update_unlock_settings(config, {"threshold": -0.48, "threshold_score": "l2"}).threshold == -0.48
    for bad, field in [({"k": 6, "n": 5}, "unlock.k"), ({"threshold": 2}, "unlock.threshold"),
                       ({"threshold": 0.9, "threshold_score": "l2"}, "unlock.threshold"),
                       ({"threshold_score": "dot"}, "unlock.threshold_score"),
                       ({"liveness": "smile"}, "unlock.liveness"), ({"target_far": 0}, "unlock.target_far")]:
        config.write_text(yaml.safe_dump({"unlock": bad}))
        with pytest.raises(ConfigError) as info:
            load_unlock_settings(config)
        assert info.value.field == field and str(config) in str(info.value)


def test_unlock_without_enrolment_fails_clearly(tmp_path, capsys):
    assert main(["unlock", "--source", str(tmp_path), "--store", str(tmp_path / "store"), "--no-window"]) == 2
    assert "no enrolment" in capsys.readouterr().err


ORL = shared_dataset_dir("orl")


@pytest.mark.shared_data
@pytest.mark.skipif(ORL is None, reason="needs ../shared/datasets/orl (set FACEFED_DATA_ROOT)")
@pytest.mark.skipif(not (mediapipe_dir() / "face_landmark.tflite").is_file(),
                    reason="needs the MediaPipe models in ../shared/models/mediapipe (set FACEFED_MEDIAPIPE_DIR)")
@pytest.mark.skipif(not (default_models_dir() / "face_recognition_model.bin").is_file(),
                    reason="needs the face-api weights in ../shared/models/faceapi (set FACEFED_FACEAPI_DIR)")
def test_calibrate_writes_threshold_plot_and_figures(tmp_path):
    faces = tmp_path / "faces"
    for person in ("s3", "s4", "s5", "s6"):
        (faces / person).mkdir(parents=True)
        for k in range(1, 8):
            (faces / person / f"{k}.pgm").symlink_to(ORL / person / f"{k}.pgm")
    config, plot, figures = tmp_path / "agent.yaml", tmp_path / "det.png", tmp_path / "calibration.json"
    config.write_text("device_id: cam-01\n")
    assert main(["calibrate", "--faces", str(faces), "--config", str(config), "--model", "faceapi",
                 "--target-far", "0.001", "--plot", str(plot), "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    # Template trials: 10 enrolments of 5 images per person; each template against its person's 2 other images
    # and the other 3 people's 21.
    assert (result["trials"], result["enrol_images"], result["enrolment_draws"]) == ("template", 5, 10)
    assert (result["genuine_trials"], result["impostor_trials"]) == (4 * 10 * 2, 4 * 10 * 21)
    written = yaml.safe_load(config.read_text())
    assert written["device_id"] == "cam-01"
    assert written["unlock"]["threshold"] == pytest.approx(result["threshold"], abs=1e-6)
    assert written["unlock"]["target_far"] == 0.001 and result["false_accepts"] == 0  # floor(0.001 x 840) = 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agent_reembeds_the_enrolment_with_a_new_global_model(tmp_path):
    from edge_agent.agent import EdgeAgent, GlobalModel
    from fedwire.messages import RoundAnnouncement, TrainSettings
    from model_zoo.backbones import build_backbone
    from model_zoo.checkpoint import shared_tensors

    (tmp_path / "faces").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device_id": "cam-01", "data": "faces", "state_dir": "state"}))
    from edge_agent.trainer import LocalTrainer
    from model_zoo.data import FaceDataset

    no_faces = FaceDataset(np.zeros((0, 112, 112, 3), np.uint8), np.zeros(0, int), [])
    agent = EdgeAgent(load_agent_config(config), LocalTrainer(no_faces, tmp_path / "state", 8, False, 0))
    store = TemplateStore(tmp_path / "state" / "unlock")
    before = enrolment(model=L2_REF)  # enrolled with the pretrained descriptor, compared by l2
    store.save(before)
    tensors = shared_tensors(build_backbone("mobilefacenet", embedding_size=64))
    agent.global_model = GlobalModel(3, tensors, "")
    agent._on_announcement(RoundAnnouncement(4, 3, "open", "a" * 32, 1.7e9, 1,
                                             TrainSettings(model={"arch": "mobilefacenet", "embedding_size": 64})))
    after = store.load("alice")
    np.testing.assert_array_equal(after.chips, before.chips)  # the chips stay; the embeddings are the new model's
    assert after.embeddings.shape == (3, 64) and after.model_version == 3
    assert after.model.path == str(global_model_path(store.root, 3).resolve())
    assert after.model.score == "cosine"  # a FaceFed checkpoint: re-embedded as its own score wants
    # The same model again changes nothing; a later one replaces the saved checkpoint.
    model = lambda: ({"arch": "mobilefacenet", "embedding_size": 64}, tensors)  # noqa: E731
    assert reembed_enrolment(store.root, lambda: pytest.fail("no model needed: nothing to re-embed"), 3) == 0
    assert reembed_enrolment(store.root, model, 4) == 1
    assert sorted(p.name for p in store.root.glob("global-v*")) == ["global-v4.safetensors"]
