"""facefed: local tools for a workstation (simulate a federation, evaluate a model)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Fine-tuning a pretrained embedder needs small steps and a small margin, or it forgets more than it learns
# from a few identities (bench/faceapi_finetune.py).
SIM_DEFAULTS = {"mobilefacenet": {"local_epochs": 2, "lr": 0.05, "margin": 0.5},
                "faceapi-resnet": {"local_epochs": 1, "lr": 1e-4, "margin": 0.0}}

NO_DATA_HELP = """\
facefed: no face dataset found. Looked in:
{places}
Give one with --data DIR or the environment variable FACEFED_DATA. DIR may be:
  - the ORL layout:   DIR/s1/1.pgm ... (AT&T "ORL Database of Faces")
  - the Yale layout:  DIR/subject01.normal ... (Yale Face Database, full frames)
  - one folder per person: DIR/<name>/<image>.jpg|png|pgm
In this repository's workspace the datasets live in ../shared/datasets (orl/, yale/, celeb-dev/)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facefed",
        description="FaceFed Edge workstation tools: run a whole federation locally, evaluate face models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run broker + aggregator + K agent processes over MQTT on this machine",
        description="Start an MQTT broker (embedded unless --broker), the aggregator and K agent processes, each "
        "holding only its own partition on disk, and run R federated rounds over loopback. Prints one line per "
        "round and writes metrics.jsonl, training_curves.png and final.safetensors into --out.",
    )
    sim.add_argument("--data", action="append", type=Path,
                     help="dataset folder (repeat to mix datasets); default: $FACEFED_DATA or ../shared/datasets/orl")
    sim.add_argument("--out", type=Path, default=Path("runs/simulate"), help="run folder (must be new or empty)")
    sim.add_argument("--clients", type=int, default=3, help="number of agent processes (default 3)")
    sim.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    sim.add_argument("--local-epochs", type=int, help="local epochs per round (default 2; faceapi-resnet 1)")
    sim.add_argument("--model", choices=sorted(SIM_DEFAULTS), default="mobilefacenet",
                     help="backbone: mobilefacenet from scratch, or the pretrained face-api ResNet fine-tuned "
                     "(weights from $FACEFED_FACEAPI_DIR or ../shared/models/faceapi) (default mobilefacenet)")
    sim.add_argument("--trainable", choices=["projection", "last", "last2", "all"],
                     help="faceapi-resnet only: the final projection alone, or with the last one, two or all "
                     "stages; the rest is frozen, its features cached on each device, and never sent (default last)")
    sim.add_argument("--lr", type=float, help="local SGD learning rate (default 0.05; faceapi-resnet 1e-4)")
    sim.add_argument("--margin", type=float, help="ArcFace margin in radians (default 0.5; faceapi-resnet 0)")
    sim.add_argument("--split", choices=["identity", "dirichlet"], default="identity",
                     help="by-identity (disjoint people per client) or Dirichlet non-IID (default identity)")
    sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    sim.add_argument("--holdout", type=int, help="held-out identities for evaluation (default: a quarter)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--act", choices=["relu", "prelu"], default="relu", help="backbone activation (default relu)")
    sim.add_argument("--broker", help="use this broker (mqtt://host:port) instead of the embedded one")
    sim.add_argument("--max-chunk-bytes", type=int, default=256 * 1024, help="largest MQTT payload (default 256 KiB)")
    sim.add_argument("--update-codec", choices=["safetensors", "int8-delta"], default="safetensors",
                     help="how devices upload: float32 tensors (default, exact) or int8 deltas against the round's "
                     "global model with error feedback (about 4x fewer bytes up)")

    _add_experiment_parser(sub)

    ev = sub.add_parser(
        "evaluate",
        help="verification and identification metrics of a model on a labelled folder",
        description="Embed every image of DIR, score all genuine and impostor pairs (cosine) and report "
        "best-threshold accuracy, EER, TAR at FAR 1e-2/1e-3/1e-4 and rank-1 identification "
        "(first image per person enrolled).",
    )
    ev.add_argument("--model", required=True,
                    help="a FaceFed checkpoint (.safetensors), an exported .onnx or .tflite file (with its .json "
                    "sidecar), or 'faceapi' for the pretrained face-api descriptor "
                    "through the detect/landmark/align pipeline (weights from $FACEFED_FACEAPI_DIR or "
                    "../shared/models/faceapi)")
    ev.add_argument("--aligned", choices=["auto", "yes", "no"], default="auto",
                    help="faceapi only: are the images ArcFace-aligned crops? auto: yes for folder-per-identity "
                    "datasets, no for ORL/Yale (then faces are detected and aligned by landmarks)")
    ev.add_argument("--data", required=True, type=Path, help="labelled faces: ORL, Yale or folder-per-identity")
    ev.add_argument("--json", type=Path, help="write the report here")
    ev.add_argument("--roc", type=Path, help="write a ROC curve PNG here")

    ex = sub.add_parser(
        "export",
        help="export a checkpoint for on-device inference (ONNX or TFLite, fp32 or int8)",
        description="Write DIR/facefed-v<version>-<format>.<onnx|tflite> and a .json sidecar (input size, "
        "normalisation, embedding size, source checkpoint sha256, agreement with the torch model on the "
        "calibration images). int8 formats use static post-training quantization calibrated on --calibration. "
        "TFLite needs pip install 'facefed-edge[tflite-convert]'.",
    )
    ex.add_argument("--model", required=True,
                    help="a FaceFed checkpoint (.safetensors), or 'faceapi' for the pretrained face-api descriptor "
                    "as is (model version 0; weights from $FACEFED_FACEAPI_DIR or ../shared/models/faceapi)")
    ex.add_argument("--format", required=True, choices=["onnx", "onnx-int8", "tflite", "tflite-int8"])
    ex.add_argument("--out", required=True, type=Path, help="output folder")
    ex.add_argument("--calibration", type=Path,
                    help="face images for int8 calibration and the agreement check: a folder of images, or a "
                    "labelled ORL/Yale/folder-per-identity dataset (default: $FACEFED_DATA or "
                    "../shared/datasets/orl)")
    ex.add_argument("--version", type=int, help="model version for the file name (default: the checkpoint's)")
    from facefed.bench_aggregate import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "export":
        return _export(args)
    if args.command == "bench":
        from facefed.bench_aggregate import bench_main

        return bench_main(args)
    return _evaluate(args)


def _resolve_data(given: list[Path] | None) -> list[Path] | None:
    from model_zoo.data import candidate_data_roots, default_data_root

    if given:
        return given
    root = default_data_root()
    if root is not None:
        return [root]
    places = [f"  FACEFED_DATA={os.environ.get('FACEFED_DATA', '(not set)')}"]
    places += [f"  {p}" for p in candidate_data_roots()]
    print(NO_DATA_HELP.format(places="\n".join(places)), file=sys.stderr)
    return None


def _simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from facefed.simulate import SimulationConfig, SimulationError, run_simulation

    data = _resolve_data(args.data)
    if data is None:
        return 2
    missing = [p for p in data if not p.is_dir()]
    if missing:
        print(f"facefed: no such dataset folder: {missing[0]}", file=sys.stderr)
        return 2
    if args.trainable is not None and args.model != "faceapi-resnet":
        print("facefed simulate: --trainable applies to --model faceapi-resnet only", file=sys.stderr)
        return 2
    cfg = SimulationConfig(
        data=data, out=args.out, clients=args.clients, rounds=args.rounds, **_training_settings(args),
        split=args.split, alpha=args.alpha, holdout=args.holdout, seed=args.seed, broker=args.broker,
        arch=args.model, act=args.act, max_chunk_bytes=args.max_chunk_bytes, update_codec=args.update_codec,
        model_options={"trainable": args.trainable or "last"} if args.model == "faceapi-resnet" else {},
    )
    print(f"facefed simulate: {args.clients} clients, {args.rounds} rounds, data {', '.join(map(str, data))}")
    bar = tqdm(total=args.rounds, unit="round", desc="federation", file=sys.stderr)

    def on_round(entry: dict) -> None:
        tqdm.write(_round_line(entry))
        if entry["round"] > 0:
            bar.update(1)

    try:
        result = run_simulation(cfg, on_round)
    except (SimulationError, ValueError) as exc:
        bar.close()
        print(f"facefed simulate: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(f"done in {result.seconds:.0f} s: {result.metrics_path}, {result.plot_path}, {result.final_checkpoint}")
    return 0


def _add_experiment_parser(sub) -> None:
    exp = sub.add_parser(
        "experiment",
        help="centralized vs local-only vs FedAvg/FedProx/server optimizer, side by side, with a report",
        description="On the same data, seed and epochs per client, train centralized (pooled), local-only (each "
        "client alone) and federated over real MQTT (FedAvg, FedProx, FedAvgM or FedAdam), plus optionally a "
        "single-identity-per-device setting (plain FedAvg vs negative anchors). Everything is scored on held-out "
        "identities. Writes report.md, results.json, accuracy_per_round.png and roc.png into --out. Options "
        "given next to --preset override the preset's values.",
    )
    exp.add_argument("--preset", choices=["quick", "full"],
                     help="quick: ORL, 4 clients, a few minutes; full: ORL+Yale+celeb-dev, 8 clients")
    exp.add_argument("--data", action="append", type=Path,
                     help="dataset folder (repeat to mix); default: the preset's under ../shared/datasets, "
                     "else $FACEFED_DATA or ../shared/datasets/orl")
    exp.add_argument("--out", type=Path, required=True, help="report folder (must be new or empty)")
    exp.add_argument("--clients", type=int, help="clients, 3..20")
    exp.add_argument("--rounds", type=int)
    exp.add_argument("--local-epochs", type=int, help="local epochs per round (all methods get rounds x this)")
    exp.add_argument("--lr", type=float)
    exp.add_argument("--batch-size", type=int)
    exp.add_argument("--split", choices=["identity", "dirichlet"])
    exp.add_argument("--alpha", type=float, help="Dirichlet concentration")
    exp.add_argument("--size-skew", type=float,
                     help="identity split: largest client's identities over the smallest's (1 = equal)")
    exp.add_argument("--holdout", type=int, help="held-out identities (default: a quarter)")
    exp.add_argument("--max-per-identity", type=int, help="cap images per identity")
    exp.add_argument("--seed", type=int)
    exp.add_argument("--proximal-mu", type=float, help="FedProx mu (default 0.01)")
    exp.add_argument("--server-strategy", choices=["fedavgm", "fedadam"], help="server optimizer arm")
    exp.add_argument("--server-lr", type=float, help="server optimizer step size")
    exp.add_argument("--fraction-fit", type=float, help="federated arms: share of clients sampled per round")
    exp.add_argument("--min-clients", type=int, help="federated arms: round quorum")
    exp.add_argument("--round-timeout", type=float, dest="round_timeout_s",
                     help="federated arms: round deadline in s; updates arriving later are dropped")
    exp.add_argument("--single-identity-clients", type=int,
                     help="devices holding one person each for the anchors-vs-FedAvg comparison (0 = off)")
    exp.add_argument("--negative-anchors", type=int, help="negative anchor vectors for that comparison")
    exp.add_argument("--methods", help="comma-separated subset of centralized,local,fedavg,fedprox,server")
    exp.add_argument("--jobs", type=int, help="arms run at the same time (presets: 3; 1 gives per-arm wall times)")


EXPERIMENT_FIELDS = ("clients", "rounds", "local_epochs", "lr", "batch_size", "split", "alpha", "size_skew",
                     "holdout", "max_per_identity", "seed", "proximal_mu", "server_strategy", "server_lr",
                     "fraction_fit", "min_clients", "round_timeout_s", "single_identity_clients", "negative_anchors",
                     "jobs")


def _experiment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from facefed.experiment import ExperimentConfig, ExperimentError, preset_config, run_experiment
    from model_zoo.data import shared_datasets_root

    overrides = {key: getattr(args, key) for key in EXPERIMENT_FIELDS}
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        if args.preset:
            cfg = preset_config(args.preset, shared_datasets_root(), args.out, data=args.data, **overrides)
        else:
            data = _resolve_data(args.data)
            if data is None:
                return 2
            cfg = ExperimentConfig(data=data, out=args.out, **{k: v for k, v in overrides.items() if v is not None})
        cfg.check()
    except ExperimentError as exc:
        print(f"facefed experiment: {exc}", file=sys.stderr)
        return 2
    print(f"facefed experiment: {cfg.preset or 'custom'}: data {', '.join(map(str, cfg.data))} -> {cfg.out}")
    try:
        results = run_experiment(cfg, say=tqdm.write)
    except (ExperimentError, ValueError) as exc:
        print(f"facefed experiment: {exc}", file=sys.stderr)
        return 1
    print((cfg.out / "report.md").read_text())
    print(f"done in {results['setup']['seconds']:.0f} s: {cfg.out}")
    return 0


def _training_settings(args: argparse.Namespace) -> dict:
    """local_epochs, lr and margin: as given on the command line, else the model's defaults."""
    return {key: default if getattr(args, key) is None else getattr(args, key)
            for key, default in SIM_DEFAULTS[args.model].items()}


def _round_line(entry: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (f"round {entry['round']:3d} | clients {entry['clients']} | {entry['bytes'] / 1e6:7.2f} MB | "
            f"train loss {fmt(entry.get('train_loss'), '6.3f')} | "
            f"held-out acc {fmt(entry.get('val_accuracy'), '.3f')} | EER {fmt(entry.get('eer'), '.3f')}")


def _evaluate(args: argparse.Namespace) -> int:
    from model_zoo.data import detect_layout, load_dataset
    from model_zoo.metrics import rank1_accuracy, verification_report

    try:
        dataset = load_dataset(args.data)
        embeddings = _embed_for_evaluation(args.model, dataset, args.aligned, detect_layout(args.data))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"facefed evaluate: {exc}", file=sys.stderr)
        return 2
    report = verification_report(embeddings, dataset.labels)
    result = {"model": str(args.model), "data": str(args.data), "images": len(dataset),
              "identities": len(dataset.identities), **report.to_dict(),
              "rank1": rank1_accuracy(embeddings, dataset.labels)}
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.roc:
        from facefed.plots import plot_roc

        plot_roc({Path(args.model).name: (report.fpr, report.tpr)}, args.roc, title=f"ROC on {args.data.name}")
    return 0


def _embed_for_evaluation(model: str, dataset, aligned: str, layout: str):
    """Embeddings of every image: a FaceFed checkpoint, or the pretrained face-api descriptor."""
    if model == "faceapi":
        import torch

        from model_zoo.pipeline import FacePipeline

        torch.set_num_threads(1)  # one-image detector/landmark passes are far slower with 2 threads here
        if aligned == "auto":
            # Folder datasets of 112x112 faces (celeb-dev) are ArcFace-aligned crops; ORL and Yale are not.
            aligned = "yes" if layout == "folders" else "no"
        pipeline = FacePipeline(detector_input_size=128)
        return pipeline.embed_images(dataset.images, aligned=aligned == "yes")
    from edge_agent.backends import load_embedder

    return load_embedder(model, threads=os.cpu_count() or 1).embed(dataset.images)


def _export(args: argparse.Namespace) -> int:
    from model_zoo.data import default_data_root
    from model_zoo.export import export_model

    try:
        result = export_model(args.model, args.format, args.out, args.calibration or default_data_root(),
                              args.version)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"facefed export: {exc}", file=sys.stderr)
        return 2
    check = result.card.check
    print(f"{result.model_path} ({result.card.file_bytes / 1e6:.2f} MB), sidecar {result.sidecar_path}")
    print(f"agreement with torch on {check.images} images ({check.data}): mean cosine {check.mean_cosine:.5f}, "
          f"min {check.min_cosine:.5f}" + ("" if check.torch_accuracy is None else
          f"; verification accuracy {check.torch_accuracy:.4f} -> {check.export_accuracy:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
