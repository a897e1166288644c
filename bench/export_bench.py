"""Exported MobileFaceNet formats: file size, single-thread latency per face, agreement with torch, held-out accuracy.

Run from the repository root:  python -m bench.export_bench [--checkpoint CKPT] [--epochs 10] [--json OUT]

Model: --checkpoint, else a MobileFaceNet (relu, 128-d) trained here from scratch for --epochs epochs on the
ORL identities that are not held out (split_holdout(num_holdout=10, seed=0): 28 of the 38 in
../shared/datasets/orl; TrainConfig defaults: batch 32, SGD lr 0.05, momentum 0.9, augmentation), saved as
OUT_DIR/trained.safetensors for reuse.
Calibration: images of the training identities (at most 256, evenly spread). Accuracy: the 10 held-out
identities (100 images), every pair, balanced best-threshold accuracy; "drop" is torch minus format, in points.
onnx-int8 keeps its first convolution float (see model_zoo.export); "float ends" keeps the last one float too.
Latency: batch 1, one thread everywhere (torch.set_num_threads, onnxruntime intra_op_num_threads, TFLite
num_threads), preprocessing included, median over --runs; the formats take turns run by run, so load from other
processes falls on all of them alike. CPU ms (process time) moves less with such load than wall ms.
TFLite rows need litert-torch (pip install 'facefed-edge[tflite-convert]') and are skipped without it.
When int8 ONNX is not at least 1.5x faster than fp32 ONNX (or with --profile), onnxruntime's profiler splits
both into time per operator type.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from edge_agent.backends import Embedder, TorchEmbedder, load_embedder
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, save_checkpoint
from model_zoo.data import FaceDataset, default_data_root, load_dataset
from model_zoo.export import export_model
from model_zoo.exported import InputSpec
from model_zoo.losses import ArcFaceHead
from model_zoo.metrics import verification_report
from model_zoo.partition import split_holdout
from model_zoo.train import TrainConfig, train_local

# (row name, export format, float_ends)
VARIANTS = (("onnx", "onnx", False), ("onnx-int8", "onnx-int8", False),
            ("onnx-int8 float ends", "onnx-int8", True), ("tflite", "tflite", False),
            ("tflite-int8", "tflite-int8", False))
SPEEDUP_TARGET = 1.5
WARMUP_RUNS = 20


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def trained_checkpoint(train: FaceDataset, epochs: int, path: Path) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone()
    head = ArcFaceHead(128, train.num_classes)
    result = train_local(backbone, head, train, TrainConfig(epochs=epochs))
    print(f"trained {epochs} epochs on {train.num_classes} ORL ids ({len(train)} images) in {result.seconds:.0f} s, "
          f"final loss {result.loss:.3f}")
    save_checkpoint(path, backbone, {"model_version": 0, "trained_by": "bench.export_bench", "epochs": epochs})
    return path


def export_variants(checkpoint: Path, calibration: np.ndarray, out_dir: Path) -> dict:
    """row name -> ExportResult, for each variant this machine can build."""
    has_converter = importlib.util.find_spec("litert_torch") is not None
    results = {}
    for name, fmt, float_ends in VARIANTS:
        if fmt.startswith("tflite") and not has_converter:
            print(f"skipping {name}: litert-torch is not installed (tflite-convert extra)")
            continue
        start = time.perf_counter()
        results[name] = export_model(checkpoint, fmt, out_dir / name.replace(" ", "-"),
                                     calibration if fmt.endswith("-int8") else None, float_ends=float_ends)
        print(f"exported {name} in {time.perf_counter() - start:.0f} s")
    return results


def latencies(embedders: dict[str, Embedder], face: np.ndarray, runs: int) -> dict[str, tuple[float, float]]:
    """name -> (median wall ms, median CPU ms) per face; the embedders take turns run by run."""
    wall, cpu = defaultdict(list), defaultdict(list)
    for run in range(WARMUP_RUNS + runs):
        for name, embedder in embedders.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            embedder.embed(face)
            if run >= WARMUP_RUNS:
                wall[name].append((time.perf_counter() - wall_start) * 1e3)
                cpu[name].append((time.process_time() - cpu_start) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in embedders}


def onnx_profile(path: Path, face: np.ndarray, runs: int) -> dict[str, float]:
    """Operator type -> mean microseconds per face, from onnxruntime's profiler on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = InputSpec().prepare(face)
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: pixels})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / runs
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def print_profile(profiles: dict[str, dict[str, float]]) -> None:
    ops = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, 0) for p in profiles.values()))
    print("\nonnxruntime profile, one thread, microseconds per face by operator type:")
    print(f"{'op':24}" + "".join(f"{name:>22}" for name in profiles))
    for op in ops:
        print(f"{op:24}" + "".join(f"{p.get(op, 0.0):>22.0f}" for p in profiles.values()))
    print(f"{'total':24}" + "".join(f"{sum(p.values()):>22.0f}" for p in profiles.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a MobileFaceNet checkpoint (default: train one here)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs when no checkpoint is given")
    parser.add_argument("--data", type=Path, help="ORL folder (default: model_zoo.data.default_data_root())")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per format (default 300)")
    parser.add_argument("--out", type=Path, help="folder for the trained checkpoint and exports (default: temp)")
    parser.add_argument("--profile", action="store_true", help="print onnxruntime's per-operator profile anyway")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    root = args.data or default_data_root()
    if root is None:
        parser.error("ORL not found: pass --data or set FACEFED_DATA")
    torch.set_num_threads(1)  # TorchEmbedder sets it per call as well; set once, that costs nothing
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="export_bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    orl = load_dataset(root)
    train_idx, heldout_idx = split_holdout(orl.labels, num_holdout=10, seed=0)
    train, heldout = orl.subset(train_idx), orl.subset(heldout_idx)

    checkpoint = args.checkpoint or trained_checkpoint(train, args.epochs, out_dir / "trained.safetensors")
    exports = export_variants(checkpoint, train.images, out_dir)
    embedders: dict[str, Embedder] = {"torch": TorchEmbedder(load_checkpoint(checkpoint)[0], threads=1)}
    embedders.update({name: load_embedder(result.model_path, threads=1) for name, result in exports.items()})

    reference = embedders["torch"].embed(heldout.images)
    torch_accuracy = verification_report(reference, heldout.labels).accuracy
    timing = latencies(embedders, heldout.images[:1], args.runs)
    rows = []
    for name, embedder in embedders.items():
        embeddings = embedder.embed(heldout.images)
        cosine = np.sum(embeddings * reference, axis=1)
        report = verification_report(embeddings, heldout.labels)
        size = exports[name].card.file_bytes if name in exports else checkpoint.stat().st_size
        rows.append({"format": name, "file_mb": size / 1e6, "ms_per_face": timing[name][0],
                     "cpu_ms_per_face": timing[name][1], "mean_cosine": float(cosine.mean()),
                     "min_cosine": float(cosine.min()), "heldout_accuracy": report.accuracy,
                     "accuracy_drop_points": 100 * (torch_accuracy - report.accuracy), "eer": report.eer})

    print(f"\n{cpu_name()}, 1 thread, batch 1, median of {args.runs} runs; held out: {heldout.num_classes} ORL ids "
          f"({len(heldout)} images); checkpoint {checkpoint}")
    print(f"{'format':22} {'MB':>6} {'ms/face':>8} {'cpu ms':>7} {'mean cos':>9} {'min cos':>8} {'acc':>7} "
          f"{'drop pts':>8} {'EER':>6}")
    for r in rows:
        print(f"{r['format']:22} {r['file_mb']:>6.2f} {r['ms_per_face']:>8.2f} {r['cpu_ms_per_face']:>7.2f} "
              f"{r['mean_cosine']:>9.5f} {r['min_cosine']:>8.5f} {r['heldout_accuracy']:>7.4f} "
              f"{r['accuracy_drop_points']:>8.2f} {r['eer']:>6.3f}")
    speedups = {f"{fp32} / {int8}": timing[fp32][0] / timing[int8][0]
                for fp32, int8 in (("onnx", "onnx-int8"), ("tflite", "tflite-int8")) if int8 in timing}
    for pair, ratio in speedups.items():
        print(f"int8 speed-up, {pair} latency: {ratio:.2f}x")

    profiles = None
    if args.profile or speedups["onnx / onnx-int8"] < SPEEDUP_TARGET:
        profiles = {name: onnx_profile(exports[name].model_path, heldout.images[:1], args.runs)
                    for name in ("onnx", "onnx-int8")}
        print_profile(profiles)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpu": cpu_name(), "threads": 1, "torch": torch.__version__},
            "runs": args.runs, "checkpoint": str(checkpoint),
            "trained_epochs": None if args.checkpoint else args.epochs,
            "heldout": {"identities": heldout.num_classes, "images": len(heldout)},
            "calibration_images": exports["onnx-int8"].card.quantization.calibration_images,
            "rows": rows, "int8_speedup": speedups, "onnx_profile_us": profiles}, indent=2) + "\n")


if __name__ == "__main__":
    main()
