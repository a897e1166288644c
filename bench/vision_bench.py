"""Edge vision: BlazeFace + Face Mesh (TFLite) against the tiny detector + 68-point net (face-api ports, torch),
measured in one run on the same images, one thread, the routes interleaved image by image.

Run from the repository root:  python -m bench.vision_bench [--celeb-per-person 40] [--scenes 200]

- Latency: the whole unlock frame (UnlockSession.process, liveness off) on Yale full frames (320x243), each frame
  through both routes back to back (order alternating), with the int8 ONNX export of the pretrained face-api
  descriptor as the embedder (the model a device runs; int8 calibration on 64 celeb-dev images of people outside
  the EER sets below is not needed for latency, so it uses the first two people). Stage medians and the ratio of
  median frame times.
- Detection recall: an image counts when the detector returns a face (celeb-dev tight 112x112 aligned crops, ORL
  92x112 crops, Yale full frames); for scenes, when a detection's box holds the centre of the pasted face. Scenes:
  640x480 frames (smooth colour blobs and noise, no face) with one celeb-dev or ORL face pasted at 40-90 px wide
  at a random place. Tiny runs at unlock's input size (320); BlazeFace as unlock runs it (short
  range, padded retry, full range).
- Verification EER through each route, the unlock path (FaceAnalyzer.analyze_photo: detect, landmarks, ArcFace
  alignment, int8 embedding; a photo without a detection taken whole), on celeb-dev (per-person spread) and ORL,
  all pairs.
- Eye openness: the eye aspect ratio of each landmark set on Yale's normal and sleepy frames of the same people
  (sleepy: eyes closed or nearly), the closed/open margin as the ratio sleepy / normal per person.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from edge_agent.unlock.analyzer import FaceAnalyzer, load_model
from edge_agent.unlock.decision import DecisionRules
from edge_agent.unlock.geometry import mean_eye_aspect_ratio
from edge_agent.unlock.liveness import NoChallenge
from edge_agent.unlock.session import UnlockSession
from edge_agent.unlock.sources import Frame
from edge_agent.unlock.store import Enrolment
from model_zoo.backbones import build_backbone
from model_zoo.data import read_gif, read_image, shared_datasets_root, to_rgb
from model_zoo.export import export_model
from model_zoo.faceapi import load_faceapi_models
from model_zoo.metrics import verification_report
from model_zoo.pipeline import FacePipeline

ROUTES = {"tiny+68": ("tiny", "68"), "blazeface+mesh": ("blazeface", "mesh")}
YALE_CONDITIONS = ("centerlight", "glasses", "happy", "leftlight", "noglasses", "normal", "rightlight", "sad",
                   "sleepy", "surprised", "wink")


def load_sets(root: Path, per_person: int) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """(images, labels) of celeb-dev (per_person spread over each person's files), ORL, Yale."""
    sets = {}
    celeb = sorted(d for d in (root / "celeb-dev").iterdir() if d.is_dir())
    images, labels = [], []
    for label, person in enumerate(celeb):
        files = sorted(person.glob("*.jpg"))
        for i in np.linspace(0, len(files) - 1, min(per_person, len(files))).round().astype(int):
            images.append(np.ascontiguousarray(to_rgb(read_image(files[i]))))
            labels.append(label)
    sets["celeb-dev"] = (images, np.array(labels))
    orl = sorted((d for d in (root / "orl").iterdir() if d.is_dir()), key=lambda d: int(d.name[1:]))
    sets["ORL"] = ([np.ascontiguousarray(to_rgb(read_image(f))) for d in orl for f in sorted(d.glob("*.pgm"))],
                   np.array([i for i, d in enumerate(orl) for _ in sorted(d.glob("*.pgm"))]))
    yale = sorted(p for p in (root / "yale").iterdir() if p.name.startswith("subject"))
    sets["Yale"] = ([np.ascontiguousarray(to_rgb(read_gif(p))) for p in yale],
                    np.array([int(p.name[7:9]) for p in yale]))
    return sets


def make_scenes(sets: dict, count: int, seed: int = 0) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """640x480 frames, each with one small face (40-90 px wide) pasted on a face-free background (smooth colour
    blobs plus fine noise: a room out of focus); returns (frame, centre of the pasted face)."""
    rng = np.random.default_rng(seed)
    faces = sets["celeb-dev"][0] + sets["ORL"][0]
    scenes = []
    for _ in range(count):
        blobs = cv2.resize(rng.integers(30, 220, size=(6, 8, 3)).astype(np.uint8), (640, 480),
                           interpolation=cv2.INTER_CUBIC)
        background = np.clip(blobs + rng.normal(0, 6, blobs.shape), 0, 255).astype(np.uint8)
        face = faces[rng.integers(len(faces))]
        width = int(rng.integers(40, 91))
        height = int(round(width * face.shape[0] / face.shape[1]))
        x, y = int(rng.integers(0, 640 - width)), int(rng.integers(0, 480 - height))
        frame = background.copy()
        frame[y:y + height, x:x + width] = cv2.resize(face, (width, height), interpolation=cv2.INTER_AREA)
        scenes.append((frame, (x + width / 2.0, y + height / 2.0)))
    return scenes


def recall(pipelines: dict[str, FacePipeline], sets: dict, scenes: list) -> dict[str, dict[str, float]]:
    out = {name: {} for name in pipelines}
    for set_name in ("celeb-dev", "ORL", "Yale"):
        images = sets[set_name][0]
        for name, pipeline in pipelines.items():
            out[name][set_name] = float(np.mean([bool(pipeline.detector.detect(image)) for image in
                                                 tqdm(images, desc=f"recall {set_name} {name}", leave=False)]))
    for name, pipeline in pipelines.items():
        hits = []
        for frame, (cx, cy) in tqdm(scenes, desc=f"recall scenes {name}", leave=False):
            hits.append(any(d.box[0] <= cx <= d.box[0] + d.box[2] and d.box[1] <= cy <= d.box[1] + d.box[3]
                            for d in pipeline.detector.detect(frame)))
        out[name]["scenes"] = float(np.mean(hits))
    return out


def latency(analyzers: dict[str, FaceAnalyzer], frames: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Stage medians (ms) per route; each frame goes through every route in turn, the order alternating."""
    sessions = {}
    for name, analyzer in analyzers.items():
        owner = [analyzer.analyze_photo(frame) for frame in frames[:4]]
        enrolment = Enrolment("owner", np.stack([f.chip for f in owner]), np.stack([f.embedding for f in owner]),
                              analyzer.model)
        sessions[name] = UnlockSession(analyzer, [enrolment], DecisionRules(0.9), NoChallenge())
        sessions[name].process(Frame(0, 0.0, frames[0]))  # warm-up
    records = {name: [] for name in sessions}
    names = list(sessions)
    for i, frame in enumerate(tqdm(frames, desc="latency", leave=False)):
        for name in (names if i % 2 == 0 else names[::-1]):
            records[name].append(sessions[name].process(Frame(i, i / 10, frame))[0])
    return {name: {**{k: statistics.median(r.stage_ms[k] for r in rs) for k in rs[0].stage_ms},
                   "total": statistics.median(r.ms for r in rs),
                   "total_p90": float(np.percentile([r.ms for r in rs], 90))}
            for name, rs in records.items()}


def eer(analyzers: dict[str, FaceAnalyzer], sets: dict) -> dict[str, dict[str, float]]:
    out = {name: {} for name in analyzers}
    for set_name in ("celeb-dev", "ORL"):
        images, labels = sets[set_name]
        embeddings = {name: [] for name in analyzers}
        for image in tqdm(images, desc=f"EER {set_name}", leave=False):
            for name, analyzer in analyzers.items():  # interleaved: the same load on both routes
                embeddings[name].append(analyzer.analyze_photo(image).embedding)
        for name in analyzers:
            out[name][set_name] = verification_report(np.stack(embeddings[name]), labels).eer
    return out


def eye_openness(pipelines: dict[str, FacePipeline], root: Path) -> dict[str, dict[str, float]]:
    yale = root / "yale"
    out = {}
    for name, pipeline in pipelines.items():
        ratios, normal, sleepy = [], [], []
        for subject in range(1, 16):
            pair = [yale / f"subject{subject:02d}.{c}" for c in ("normal", "sleepy")]
            if not all(p.is_file() for p in pair):
                continue
            ears = [mean_eye_aspect_ratio(pipeline.primary_landmarks(np.ascontiguousarray(to_rgb(read_gif(p)))))
                    for p in pair]
            normal.append(ears[0])
            sleepy.append(ears[1])
            ratios.append(ears[1] / ears[0])
        out[name] = {"normal": float(np.median(normal)), "sleepy": float(np.median(sleepy)),
                     "ratio_median": float(np.median(ratios)), "ratio_max": float(np.max(ratios)),
                     "below_0.86": int(np.sum(np.array(ratios) < 0.86)),
                     "below_0.82": int(np.sum(np.array(ratios) < 0.82)), "people": len(ratios)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeb-per-person", type=int, default=40, help="celeb-dev images per person (spread)")
    parser.add_argument("--scenes", type=int, default=200, help="640x480 frames with a small pasted face")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = shared_datasets_root()
    start = time.perf_counter()
    sets = load_sets(root, args.celeb_per_person)
    scenes = make_scenes(sets, args.scenes)
    models = load_faceapi_models()
    pipelines = {name: FacePipeline(models, detector=d, landmarks=lm, threads=1) for name, (d, lm) in ROUTES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        # int8 calibration faces from two celeb-dev people; they are also in the EER set (as in bench/unlock_bench's
        # calibration people), which shifts both routes alike.
        calibration = np.stack(sets["celeb-dev"][0][:2 * args.celeb_per_person])
        exported = export_model(build_backbone("faceapi-resnet"), "onnx-int8", tmp, calibration, model_version=0)
        embedder, ref = load_model(exported.model_path, threads=1)
        analyzers = {name: FaceAnalyzer(embedder, ref, pipeline) for name, pipeline in pipelines.items()}
        timing = latency(analyzers, sets["Yale"][0])
        found = recall(pipelines, sets, scenes)
        errors = eer(analyzers, sets)
    eyes = eye_openness(pipelines, root)
    elapsed = time.perf_counter() - start

    base, new = "tiny+68", "blazeface+mesh"
    print(f"\nmachine: {platform.processor() or platform.machine()}, 1 thread (torch, onnxruntime, TFLite), "
          f"python {platform.python_version()}, torch {torch.__version__}; {elapsed:.0f} s\n")
    print(f"Per unlock frame, Yale 320x243 ({len(sets['Yale'][0])} frames, each through both routes), median ms:\n")
    print("| route | detect | landmarks | align | embed (int8) | decide | total | total p90 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in timing.items():
        print(f"| {name} | " + " | ".join(f"{t[k]:.1f}" for k in ("detect", "landmarks", "align", "embed", "decide",
                                                                  "total", "total_p90")) + " |")
    vision = {name: t["detect"] + t["landmarks"] for name, t in timing.items()}
    print(f"\nwhole frame {new} / {base}: {timing[new]['total'] / timing[base]['total']:.2f}x (target <= 0.3x); "
          f"detect + landmarks: {vision[new] / vision[base]:.2f}x\n")
    print("Detection recall:\n")
    print(f"| route | celeb-dev crops ({len(sets['celeb-dev'][0])}) | ORL ({len(sets['ORL'][0])}) | "
          f"Yale ({len(sets['Yale'][0])}) | scenes, 40-90 px faces ({len(scenes)}) |")
    print("|---|---|---|---|---|")
    for name, r in found.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f} %" for k in ("celeb-dev", "ORL", "Yale", "scenes")) + " |")
    print("\nVerification EER, unlock path (all pairs):\n")
    print("| route | celeb-dev | ORL |")
    print("|---|---|---|")
    for name, e in errors.items():
        print(f"| {name} | {100 * e['celeb-dev']:.2f} % | {100 * e['ORL']:.2f} % |")
    print("\nEye aspect ratio, Yale normal vs sleepy of the same people (median; ratio sleepy/normal per person):\n")
    print("| landmarks | normal | sleepy | ratio median | ratio max | people below 0.86 | below 0.82 |")
    print("|---|---|---|---|---|---|---|")
    for name, e in eyes.items():
        print(f"| {name} | {e['normal']:.3f} | {e['sleepy']:.3f} | {e['ratio_median']:.2f} | {e['ratio_max']:.2f} | "
              f"{e['below_0.86']} of {e['people']} | {e['below_0.82']} of {e['people']} |")


if __name__ == "__main__":
    main()
