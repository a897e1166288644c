"""Face unlock: FAR and FRR at the calibrated threshold on held-out people, and per-frame latency on one core.

Run from the repository root:  python -m bench.unlock_bench [--celeb-per-person 40] [--target-far 1e-3]
                               [--detector tiny|blazeface] [--landmarks 68|mesh]

Model: the int8 ONNX export (model_zoo.export, onnx-int8) of the pretrained face-api descriptor (faceapi-resnet),
the model a device runs before the federation changes it; its int8 calibration images are celeb-dev images of the
calibration people only.
People: ORL (38) + celeb-dev (12), split by identity. Calibration: ORL s3-s21 and the first 6 celeb-dev names in
alphabetical order; held out: ORL s22-s40 and the last 6 celeb-dev names. Every image goes through the unlock path
(detect, 68 landmarks, ArcFace alignment, embed; tight crops the detector misses are taken whole).
Threshold: the lowest with at most floor(target FAR x impostor trials) false accepts over the calibration people's
template trials, as `facefed-agent calibrate` picks it (edge_agent.unlock.calibration: 10 seeded random enrolments
of 5 images per person, each template against every image outside its enrolment). Reported on the held-out people:
template trials (fresh draws), all pairs (image against image) for reference, template trials at the threshold
calibrated on all pairs (the old method), and attempts under the k-of-n frame rule: n consecutive images (file
order) of one person outside the enrolment as one attempt's frames, accepted when k score >= the threshold.
Latency: one thread (torch.set_num_threads(1), onnxruntime intra_op 1), Yale full frames (320x243, one face),
stage medians over the frames. Decision time after the owner appears, on a live camera faster than the loop:
frames needed x median frame time; k=3 frames with liveness off, 5 with the blink challenge at its earliest
(3 open-eye frames for the baseline, 1 closed, 1 open).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_agent.unlock.analyzer import FaceAnalyzer, load_model
from edge_agent.unlock.calibrate import LabelledEmbeddings, calibrate_embeddings, embed_labelled
from edge_agent.unlock.calibration import (ENROL_IMAGES, calibrate_threshold, draw_enrolments, template_scores,
                                           template_trials)
from edge_agent.unlock.decision import DecisionRules
from edge_agent.unlock.liveness import NoChallenge
from edge_agent.unlock.session import UnlockSession
from edge_agent.unlock.sources import Frame
from edge_agent.unlock.store import Enrolment
from model_zoo.backbones import build_backbone
from model_zoo.data import IMAGE_EXTENSIONS, read_gif, read_image, shared_datasets_root, to_rgb
from model_zoo.export import export_model
from model_zoo.metrics import pair_scores
from model_zoo.pipeline import FacePipeline
from model_zoo.vision import DETECTORS, LANDMARK_MODELS

HELD_OUT_SEED = 1  # enrolment draws on the held-out people, independent of calibrate's (seed 0)
YALE_CONDITIONS = ("normal", "happy", "sad", "surprised", "noglasses", "glasses", "sleepy", "wink")


def people(root: Path, names: list[str], per_person: int | None) -> list[tuple[str, Path]]:
    samples = []
    for name in names:
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if per_person:
            files = [files[i] for i in np.linspace(0, len(files) - 1, min(per_person, len(files))).round().astype(int)]
        samples += [(name, f) for f in files]
    return samples


def split(datasets: Path, per_person: int) -> tuple[dict, dict]:
    orl = sorted((d.name for d in (datasets / "orl").iterdir() if d.is_dir()), key=lambda n: int(n[1:]))
    celeb = sorted(d.name for d in (datasets / "celeb-dev").iterdir() if d.is_dir())
    calibration = {"orl": people(datasets / "orl", orl[:19], None),
                   "celeb": people(datasets / "celeb-dev", celeb[:6], per_person)}
    held_out = {"orl": people(datasets / "orl", orl[19:], None),
                "celeb": people(datasets / "celeb-dev", celeb[6:], per_person)}
    return calibration, held_out


def embed_sets(analyzer: FaceAnalyzer, sets: dict) -> LabelledEmbeddings:
    parts = [embed_labelled(analyzer, samples, f"{name}/") for name, samples in sets.items()]
    offsets = np.cumsum([0] + [len(p.identities) for p in parts[:-1]])
    return LabelledEmbeddings(np.concatenate([p.embeddings for p in parts]),
                              np.concatenate([p.labels + o for p, o in zip(parts, offsets)]),
                              [i for p in parts for i in p.identities])


def attempts(data: LabelledEmbeddings, enrolments: list[np.ndarray],
             rules: DecisionRules) -> tuple[np.ndarray, np.ndarray]:
    """(accepted, is-genuine) per attempt: each enrolment's template against runs of rules.n consecutive images
    (index order, leftovers dropped) of its own person outside the enrolment and of every other person; an
    attempt is accepted when at least rules.k of its frames score >= rules.threshold."""
    matches = template_scores(data.embeddings, enrolments) >= rules.threshold
    accepted, genuine = [], []
    for row, enrolment in enumerate(enrolments):
        owner = data.labels[enrolment[0]]
        for label in np.unique(data.labels):
            frames = np.setdiff1d(np.flatnonzero(data.labels == label), enrolment)
            runs = frames[:len(frames) // rules.n * rules.n].reshape(-1, rules.n)
            accepted += list(matches[row, runs].sum(axis=1) >= rules.k)
            genuine += [label == owner] * len(runs)
    return np.array(accepted), np.array(genuine)


def latency(analyzer: FaceAnalyzer, datasets: Path, threshold: float) -> dict[str, float]:
    yale = datasets / "yale"
    frames = [np.ascontiguousarray(to_rgb(read_gif(yale / f"subject{s:02d}.{c}")))
              for s in range(1, 16) for c in YALE_CONDITIONS if (yale / f"subject{s:02d}.{c}").is_file()]
    owner = [analyzer.analyze_photo(frame) for frame in frames[:4]]
    enrolment = Enrolment("owner", np.stack([f.chip for f in owner]), np.stack([f.embedding for f in owner]),
                          analyzer.model)
    session = UnlockSession(analyzer, [enrolment], DecisionRules(threshold), NoChallenge())
    session.process(Frame(0, 0.0, frames[0]))  # warm-up
    records = [session.process(Frame(i, i / 10, frame))[0] for i, frame in enumerate(frames)]
    stages = {k: statistics.median(r.stage_ms[k] for r in records) for k in records[0].stage_ms}
    return {**stages, "total": statistics.median(r.ms for r in records), "frames": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeb-per-person", type=int, default=40, help="celeb-dev images per person (spread)")
    parser.add_argument("--target-far", type=float, default=1e-3)
    parser.add_argument("--detector", choices=DETECTORS, default="tiny", help="face detector (default tiny)")
    parser.add_argument("--landmarks", choices=LANDMARK_MODELS, default="68", help="landmark net (default 68)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = shared_datasets_root()
    calibration, held_out = split(datasets, args.celeb_per_person)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        int8_faces = np.stack([to_rgb(read_image(path)) for _, path in calibration["celeb"]])
        exported = export_model(build_backbone("faceapi-resnet"), "onnx-int8", tmp, int8_faces, model_version=0)
        embedder, ref = load_model(exported.model_path, threads=1)
        analyzer = FaceAnalyzer(embedder, ref, FacePipeline(detector=args.detector, landmarks=args.landmarks))
        cal = embed_sets(analyzer, calibration)
        held = embed_sets(analyzer, held_out)
        calibrated, _, _ = calibrate_embeddings(cal, args.target_far)
        pair_calibrated = calibrate_threshold(*pair_scores(cal.embeddings, cal.labels), args.target_far)
        threshold = calibrated.threshold
        held_enrolments = draw_enrolments(held.labels, seed=HELD_OUT_SEED)
        tmpl_s, tmpl_g = template_trials(held.embeddings, held.labels, held_enrolments)
        pair_s, pair_g = pair_scores(held.embeddings, held.labels)
        rules = DecisionRules(threshold)
        attempt_accepted, attempt_g = attempts(held, held_enrolments, rules)
        timing = latency(analyzer, datasets, threshold)
    elapsed = time.perf_counter() - start

    def row(name: str, genuine: np.ndarray, accepted: np.ndarray) -> str:
        false_accepts, false_rejects = int(accepted[~genuine].sum()), int((~accepted[genuine]).sum())
        impostors, genuines = int((~genuine).sum()), int(genuine.sum())
        return (f"| {name} | {genuines:,} | {impostors:,} | {false_accepts / impostors:.2e} ({false_accepts}) | "
                f"{false_rejects / genuines:.3f} ({false_rejects}) |")

    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
          f"python {platform.python_version()}, torch {torch.__version__}; {elapsed:.0f} s; "
          f"{args.detector} detector, {args.landmarks} landmarks\n")
    print(f"Calibration people: {len(cal.identities)} ({len(cal.labels)} images); threshold {threshold:.4f} for "
          f"FAR {args.target_far:g} on template trials (measured {calibrated.far:.2e}: {calibrated.false_accepts} of "
          f"{calibrated.impostor_trials:,} impostor trials; FRR {calibrated.frr:.3f}: {calibrated.false_rejects} of "
          f"{calibrated.genuine_trials:,} genuine trials; EER {calibrated.eer:.3f}). Calibrated on all pairs instead: "
          f"{pair_calibrated.threshold:.4f} ({pair_calibrated.impostor_trials:,} impostor pairs).\n")
    print(f"Held-out people: {len(held.identities)} ({len(held.labels)} images): "
          f"{', '.join(sorted({i.split('/')[1] for i in held.identities if i.startswith('celeb')}))} and ORL "
          f"s22-s40.\n")
    print("| held-out trials | genuine | impostor | FAR (false accepts) | FRR (false rejects) |")
    print("|---|---|---|---|---|")
    print(row(f"template (mean of {ENROL_IMAGES}) vs image, threshold {threshold:.4f}", tmpl_g, tmpl_s >= threshold))
    print(row(f"attempt: {rules.k} of {rules.n} consecutive images match, threshold {threshold:.4f}", attempt_g,
              attempt_accepted))
    print(row(f"all pairs, image vs image, threshold {threshold:.4f}", pair_g, pair_s >= threshold))
    print(row(f"template vs image, pair-calibrated threshold {pair_calibrated.threshold:.4f}", tmpl_g,
              tmpl_s >= pair_calibrated.threshold))
    print(f"\nPer frame, one thread, Yale 320x243 frames ({timing['frames']}), median ms:\n")
    print("| detect | landmarks | align | embed (int8) | decide | total |")
    print("|---|---|---|---|---|---|")
    print("| " + " | ".join(f"{timing[k]:.1f}" for k in ("detect", "landmarks", "align", "embed", "decide", "total"))
          + " |")
    frame_s = timing["total"] / 1000
    print(f"\nDecision after the owner appears (loop-bound camera): liveness off, k=3 frames: {3 * frame_s:.2f} s; "
          f"blink challenge at its earliest, 5 frames: {5 * frame_s:.2f} s, plus however long the owner takes to "
          f"blink.")


if __name__ == "__main__":
    main()
