"""How the face-api descriptor does on ArcFace-aligned crops, by the way the 150x150 dlib chip is made.

All-pairs verification EER on celeb-dev (112x112 ArcFace-aligned crops) for three routes:
- naive:    resize the 112 crop to 150 (bilinear): wrong scale and position for the descriptor net;
- reframe:  the fixed ArcFace-template -> dlib-template similarity (FacePipeline.embed_aligned_crops);
- detect:   TinyFaceDetector + 68 landmarks + dlib alignment on each crop (FacePipeline.detect); crops
            without a detection are left out and counted, and `reframe` is re-scored on the same subset.

Scores: cosine similarity of L2-normalised descriptors (a monotonic map of the euclidean distance
between normalised descriptors, so both give the same EER). face-api's raw-descriptor euclidean
distance would differ, since raw descriptor norms vary.

    python bench/faceapi_alignment.py --limit-per-identity 50 --json results.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from model_zoo.align import DLIB_CHIP_SIZE
from model_zoo.data import FaceDataset, load_dataset, shared_datasets_root
from model_zoo.faceapi import load_faceapi_models
from model_zoo.metrics import normalize_rows, report_from_scores
from model_zoo.pipeline import FacePipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_datasets_root() / "celeb-dev",
                        help="folder-per-identity ArcFace-aligned 112x112 crops (default: shared celeb-dev)")
    parser.add_argument("--models", type=Path, default=None, help="face-api weights folder (default: shared)")
    parser.add_argument("--limit-per-identity", type=int, default=None,
                        help="first N images (file order) of each identity; default: all")
    parser.add_argument("--detector-input-size", type=int, default=128,
                        help="TinyFaceDetector input size for the detect route; faces filling a 112 crop are "
                             "found far more often at a coarse input (128) than at face-api's 416 or 320")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); the detect route runs one image at a "
                             "time, where intra-op threads cost more than they save, badly so on a busy machine")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def limit_per_identity(dataset: FaceDataset, limit: int | None) -> FaceDataset:
    return dataset if limit is None else dataset.first_per_identity(limit)


def all_pairs_report(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Verification over every pair i < j from one Gram matrix (pairwise copies would not fit in memory)."""
    emb = normalize_rows(embeddings).astype(np.float32)
    rows, cols = np.triu_indices(len(emb), k=1)
    scores = (emb @ emb.T)[rows, cols]
    return report_from_scores(scores, labels[rows] == labels[cols]).to_dict()


def naive_resize_embeddings(pipeline: FacePipeline, images: np.ndarray) -> np.ndarray:
    size = (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE)
    return pipeline.embed_chips(np.stack([cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                                          for image in images]))


def detect_embeddings(pipeline: FacePipeline, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors of the best face of each crop where one is found, boolean found-mask over all crops)."""
    found = np.zeros(len(images), dtype=bool)
    embeddings = []
    for i, image in enumerate(images):
        faces = pipeline.detect(image)
        if faces:
            found[i] = True
            embeddings.append(faces[0].embedding)
    return np.stack(embeddings), found


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def route_row(route: str, images: int, report: dict, seconds: float, failed: int = 0) -> dict:
    return {"route": route, "images": images, "failed": failed, "seconds": round(seconds, 1), **report}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = limit_per_identity(load_dataset(args.data, layout="folders", size=112), args.limit_per_identity)
    pipeline = FacePipeline(load_faceapi_models(args.models), detector_input_size=args.detector_input_size,
                            score_threshold=args.score_threshold, batch_size=args.batch_size)
    images, labels = dataset.images, dataset.labels

    naive, naive_s = timed(lambda: naive_resize_embeddings(pipeline, images))
    reframe, reframe_s = timed(lambda: pipeline.embed_aligned_crops(images))
    (detected, found), detect_s = timed(lambda: detect_embeddings(pipeline, images))

    rows = [
        route_row("naive resize 112->150", len(images), all_pairs_report(naive, labels), naive_s),
        route_row("template re-framing", len(images), all_pairs_report(reframe, labels), reframe_s),
        route_row("detect+landmarks+align", int(found.sum()), all_pairs_report(detected, labels[found]), detect_s,
                  failed=int((~found).sum())),
        route_row("template re-framing, same subset", int(found.sum()),
                  all_pairs_report(reframe[found], labels[found]), 0.0),
    ]
    return {
        "data": str(args.data), "identities": dataset.num_classes, "images": len(images),
        "limit_per_identity": args.limit_per_identity, "detector_input_size": args.detector_input_size,
        "score_threshold": args.score_threshold, "torch_threads": torch.get_num_threads(),
        "scores": "cosine similarity of L2-normalised face-api descriptors, all pairs i < j",
        "routes": rows,
    }


def print_table(results: dict) -> None:
    limit = results["limit_per_identity"] or "all"
    print(f"{results['data']}: {results['images']} images, {results['identities']} identities, "
          f"limit per identity: {limit}, torch threads: {results['torch_threads']}")
    print(f"{'route':34} {'images':>7} {'failed':>7} {'pairs':>10} {'EER':>7} {'TAR@1e-3':>9} {'time s':>7}")
    for row in results["routes"]:
        pairs = row["genuine_pairs"] + row["impostor_pairs"]
        print(f"{row['route']:34} {row['images']:7d} {row['failed']:7d} {pairs:10d} {100 * row['eer']:6.2f}% "
              f"{100 * row['tar_at_far']['1e-3']:8.2f}% {row['seconds']:7.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results, seconds = timed(lambda: run(args))
    results["total_seconds"] = round(seconds, 1)
    print_table(results)
    print(f"total {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
