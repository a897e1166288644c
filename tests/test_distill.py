"""Distillation of the face-api descriptor into MobileFaceNet: loss, loop, teacher cache, checkpoint, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import facefed.cli
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, save_checkpoint
from model_zoo.data import load_dataset, shared_dataset_dir
from model_zoo.distill import (DistillConfig, TeacherTargets, cached_teacher_embeddings, cosine_to_teacher, distill,
                               distillation_loss, images_digest, lr_at)
from model_zoo.train import jitter_batch
from model_zoo.faceapi import default_models_dir
from model_zoo.faceapi.loader import RECOGNITION_MANIFEST
from model_zoo.train import embed_images

CELEB = shared_dataset_dir("celeb-dev")
needs_shared = pytest.mark.skipif(
    CELEB is None or not (default_models_dir() / RECOGNITION_MANIFEST).is_file(),
    reason=f"needs ../shared/datasets/celeb-dev (FACEFED_DATA_ROOT) and face-api weights in {default_models_dir()} "
    "(FACEFED_FACEAPI_DIR)",
)


def test_distillation_loss_is_one_minus_cosine_of_normalised_vectors():
    teacher = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    assert float(distillation_loss(3 * teacher, teacher)) == pytest.approx(0.0, abs=1e-7)  # scale does not matter
    assert float(distillation_loss(-teacher, teacher)) == pytest.approx(2.0)
    assert float(distillation_loss(teacher.flip(1), teacher)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.zeros(2, 3), teacher)


def test_schedule_warms_up_then_decays_to_zero_and_jitter_keeps_the_pixel_range():
    cfg = DistillConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, cfg) == pytest.approx(1.0) and lr_at(20, 20, cfg) == pytest.approx(0.0, abs=1e-12)
    pixels = torch.rand(3, 3, 16, 16) * 255
    out = jitter_batch(pixels, torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 255
    with pytest.raises(ValueError, match="epochs"):
        DistillConfig(epochs=0).check()


def _synthetic(n=8, seed=0):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    plain = rng.standard_normal((n, 128)).astype(np.float32)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    return crops, TeacherTargets(plain, plain.copy(), images_digest(crops))


def test_a_few_steps_pull_the_student_towards_fixed_targets_deterministically():
    """No shared data: random crops with random unit targets; fitting them is what the loop must do."""
    crops, targets = _synthetic()
    torch.manual_seed(0)
    student = build_backbone("mobilefacenet")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    before = float(cosine_to_teacher(student, crops, targets.plain).mean())
    result = distill(student, crops, targets, DistillConfig(epochs=4, batch_size=4, lr=3e-3, warmup_steps=0,
                                                            augment=False, seed=1))
    assert result.steps == 4 * 2 and not student.training
    assert result.final_loss < 0.8 * result.epoch_losses[0]
    assert float(cosine_to_teacher(student, crops, targets.plain).mean()) > before + 0.1

    short = DistillConfig(epochs=1, batch_size=4, seed=1)  # same seed and start: the same weights, bit for bit
    runs = []
    for _ in range(2):
        student.load_state_dict(start)
        runs.append((distill(student, crops, targets, short).epoch_losses,
                     {k: v.clone() for k, v in student.state_dict().items()}))
    (loss_a, a), (loss_b, b) = runs
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="teacher embedding each"):
        distill(student, crops[:5], targets, short)


@needs_shared
def test_distilling_the_teacher_on_real_faces_lowers_the_loss_caches_and_round_trips(tmp_path):
    celeb = load_dataset(CELEB, layout="folders")
    crops = celeb.images[np.concatenate([np.flatnonzero(celeb.labels == k)[:4] for k in range(4)])]
    cache = tmp_path / "teacher.safetensors"

    targets = cached_teacher_embeddings(crops, cache)
    again = cached_teacher_embeddings(crops, cache)
    assert not targets.from_cache and again.from_cache and np.array_equal(again.plain, targets.plain)
    assert targets.plain.shape == (16, 128)
    np.testing.assert_allclose(np.linalg.norm(targets.plain, axis=1), 1.0, atol=1e-5)
    # A flipped face is the same person: the teacher's mirrored embedding stays close, but it is not the same.
    cos = (targets.plain * targets.mirrored).sum(axis=1)
    assert cos.min() > 0.8 and cos.max() < 1.0
    assert not cached_teacher_embeddings(crops[:8], cache).from_cache  # other images: recomputed, not reused

    torch.manual_seed(0)
    student = build_backbone("mobilefacenet")
    # Targets are centred on the 16 faces' mean (center_targets): what is left is identity, harder to fit than
    # the raw descriptors' common direction, so the bar is a 10 % drop in 6 epochs of 2 steps.
    result = distill(student, crops, targets, DistillConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=0,
                                                            augment=False))
    assert result.final_loss < 0.9 * result.epoch_losses[0]
    assert result.teacher_mean is not None and len(result.teacher_mean) == 128

    path = tmp_path / "distilled.safetensors"
    save_checkpoint(path, student, {"distilled_from": "faceapi-resnet"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"distilled_from": "faceapi-resnet"}
    np.testing.assert_allclose(embed_images(loaded, crops[:4]), embed_images(student, crops[:4]), atol=1e-6)


@needs_shared
def test_cli_distill_writes_a_checkpoint_the_federation_can_start_from(tmp_path, capsys):
    from aggregator.config import ModelConfig

    out = tmp_path / "distilled"
    code = facefed.cli.main(["distill", "--data", str(CELEB), "--out", str(out), "--holdout", "4",
                             "--max-per-identity", "2", "--epochs", "1", "--batch-size", "8"])
    assert code == 0, capsys.readouterr().err
    assert "student.safetensors" in capsys.readouterr().out
    _, meta = load_checkpoint(out / "student.safetensors")
    # the people bench.faceapi_finetune and bench.distill hold out (simulate's split, seed 0) were never used
    assert meta["held_out_identities"] == ["Hugh_Laurie", "Jessica_Alba", "Keanu_Reeves", "Leonardo_DiCaprio"]
    assert len(meta["identities"]) == 8 and not set(meta["identities"]) & set(meta["held_out_identities"])
    assert meta["teacher"].startswith("faceapi-resnet") and meta["images"] == 16
    assert (out / "teacher.safetensors").is_file()
    ModelConfig(arch="mobilefacenet", init_checkpoint=out / "student.safetensors").check()
