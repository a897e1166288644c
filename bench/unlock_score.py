"""Unlock's score per model: cosine against raw L2 for the pretrained face-api descriptor, through the unlock path.

Run from the repository root:  python -m bench.unlock_score [--celeb-per-person 40] [--target-far 1e-3]

Images: the people and split of bench/unlock_bench.py (ORL 38 + celeb-dev 12, calibration = the first 19 ORL people and the
first 6 celeb-dev names, held out = the rest), every image once through the unlock path (FaceAnalyzer.analyze_photo,
BlazeFace + mesh, ArcFace alignment; a photo without a detection taken whole). The same aligned chips then feed
three embeddings: the float torch descriptor raw (scored l2, minus the euclidean distance) and normalised (scored
cosine), and the int8 ONNX export (cosine; its outputs are normalised, as a device runs it before the federation).
Reported: all-pairs EER per set (the "Verification EER through the unlock path" table), and on template trials as
unlock compares (edge_agent.unlock.calibration) the threshold calibrated on the calibration people at the target FAR,
the held-out people's FAR, FRR and EER at it, and the gap between the median genuine and impostor template scores
(which sizes DecisionRules' multi-face margin per score).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from edge_agent.unlock.analyzer import PRETRAINED, FaceAnalyzer, load_model
from edge_agent.unlock.calibration import calibrate_threshold, draw_enrolments, template_trials
from model_zoo.backbones import build_backbone
from model_zoo.data import read_image, shared_datasets_root, to_rgb
from model_zoo.export import export_model
from model_zoo.metrics import far_key, report_from_scores, verification_report
from model_zoo.pipeline import FacePipeline

from .unlock_bench import HELD_OUT_SEED, split

HELD_OUT_SEEDS = (HELD_OUT_SEED, HELD_OUT_SEED + 1, HELD_OUT_SEED + 2)

ARMS = {"float cosine": "cosine", "float l2": "l2", "int8 cosine": "cosine"}


def template_summary(embeddings, labels, score: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return template_trials(embeddings, labels, draw_enrolments(labels, seed=seed), score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeb-per-person", type=int, default=40, help="celeb-dev images per person (spread)")
    parser.add_argument("--target-far", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    calibration, held_out = split(shared_datasets_root(), args.celeb_per_person)
    groups = {"cal": calibration, "held": held_out}
    embedder, ref = load_model(PRETRAINED, threads=1, score="l2")  # raw descriptors: both scores come from them
    analyzer = FaceAnalyzer(embedder, ref, FacePipeline(detector="blazeface", landmarks="mesh", threads=1))
    samples = [(group, kind, name, path) for group, sets in groups.items() for kind, people in sets.items()
               for name, path in people]
    faces = [analyzer.analyze_photo(np.ascontiguousarray(to_rgb(read_image(path))))
             for _, _, _, path in tqdm(samples, desc="unlock path")]
    chips = np.stack([f.chip for f in faces])
    raw = np.stack([f.embedding for f in faces])
    with tempfile.TemporaryDirectory() as tmp:
        int8_faces = np.stack([to_rgb(read_image(path)) for _, path in calibration["celeb"]])
        exported = export_model(build_backbone("faceapi-resnet"), "onnx-int8", tmp, int8_faces, model_version=0)
        int8 = load_model(exported.model_path, threads=1)[0].embed(chips)
    embeddings = {"float cosine": raw / np.linalg.norm(raw, axis=1, keepdims=True), "float l2": raw,
                  "int8 cosine": int8}
    identity = {key: i for i, key in enumerate(dict.fromkeys((kind, name) for _, kind, name, _ in samples))}
    labels = np.array([identity[(kind, name)] for _, kind, name, _ in samples])
    group = np.array([g for g, _, _, _ in samples])
    kind = np.array([k for _, k, _, _ in samples])
    elapsed = time.perf_counter() - start

    print(f"\nmachine: {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; "
          f"{len(samples)} images, {elapsed:.0f} s; raw descriptor norm median {np.median(np.linalg.norm(raw, axis=1)):.3f}"
          f" (min {np.linalg.norm(raw, axis=1).min():.3f}, max {np.linalg.norm(raw, axis=1).max():.3f})\n")
    print("All-pairs EER through the unlock path (blazeface + mesh):\n")
    print(f"| embedding, score | celeb-dev ({(kind == 'celeb').sum()} images): EER | FRR at FAR {args.target_far:g} "
          f"| ORL ({(kind == 'orl').sum()}): EER | FRR at FAR {args.target_far:g} |")
    print("|---|---|---|---|---|")
    for arm, score in ARMS.items():
        reports = [verification_report(embeddings[arm][kind == k], labels[kind == k], fars=(args.target_far,),
                                       score=score) for k in ("celeb", "orl")]
        print(f"| {arm} | " + " | ".join(f"{100 * r.eer:.2f} % | {1 - r.tar_at_far[far_key(args.target_far)]:.3f}"
                                        for r in reports) + " |")
    print(f"\nTemplate trials (5-image templates, 10 draws per person), threshold at FAR {args.target_far:g} on the "
          f"calibration people ({(group == 'cal').sum()} images); held-out people ({(group == 'held').sum()} images): "
          f"FAR and FRR at that threshold, and FRR at a held-out FAR of {args.target_far:g} (threshold set on them), "
          f"each for held-out enrolment draws seeded {', '.join(map(str, HELD_OUT_SEEDS))} (mean, min-max):\n")
    print("| embedding, score | threshold | held-out FAR | FRR | FRR at held-out FAR | template EER | "
          "genuine - impostor median |")
    print("|---|---|---|---|---|---|---|")
    cal = group == "cal"
    for arm, score in ARMS.items():
        scores, genuine = template_summary(embeddings[arm][cal], labels[cal], score, seed=0)
        threshold = calibrate_threshold(scores, genuine, args.target_far, score).threshold
        rows = []
        for seed in HELD_OUT_SEEDS:
            scores, genuine = template_summary(embeddings[arm][~cal], labels[~cal], score, seed=seed)
            report = report_from_scores(scores, genuine, fars=(args.target_far,))
            accepted = scores >= threshold
            rows.append((accepted[~genuine].mean(), 1 - accepted[genuine].mean(),
                         1 - report.tar_at_far[far_key(args.target_far)], report.eer,
                         np.median(scores[genuine]) - np.median(scores[~genuine])))
        rows = np.array(rows)

        def cell(column: int, fmt: str, scale: float = 1.0) -> str:
            values = rows[:, column] * scale
            return f"{values.mean():{fmt}} ({values.min():{fmt}}-{values.max():{fmt}})"

        print(f"| {arm} | {threshold:.4f} | {cell(0, '.1e')} | {cell(1, '.3f')} | {cell(2, '.3f')} | "
              f"{cell(3, '.2f', 100)} % | {cell(4, '.4f')} |")

if __name__ == "__main__":
    main()
