"""facefed: local tools for a workstation (simulate a federation, evaluate a model)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from model_zoo.vision import DEFAULT_DETECTOR, DEFAULT_LANDMARKS, DETECTORS, LANDMARK_MODELS

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
    sim.add_argument("--update-codec", choices=["safetensors", "int8-delta", "topk-int8-delta"], default="safetensors",
                     help="how devices upload: float32 tensors (default, exact), int8 deltas against the round's "
                     "global model with error feedback (about 4x fewer bytes up), or only the largest 10%% of each "
                     "kernel's delta entries, int8 (about 8x fewer)")
    sim.add_argument("--download-codec", choices=["safetensors", "int8-delta"], default="safetensors",
                     help="how the aggregator publishes global models: float32 (default) or int8 deltas against the "
                     "previous version, with the full model kept retained for devices that lack it")
    sim.add_argument("--bn-statistics", choices=["averaged", "measured"], default="averaged",
                     help="BatchNorm statistics of each global model: FedAvg of the devices' own (default), or "
                     "measured by the devices on the averaged weights in a statistics phase after each round "
                     "(forward passes only; which scores higher depends on the fleet, see BENCHMARKS.md issue 4)")
    sim.add_argument("--dashboard", type=int, metavar="PORT", dest="dashboard_port",
                     help="serve the live fleet dashboard on http://127.0.0.1:PORT/ while the federation runs")
    sim.add_argument("--dp-clip", type=float, metavar="C",
                     help="differential privacy (DP-FedAvg): clip each device's update to L2 norm C; needs --dp-noise")
    sim.add_argument("--dp-noise", type=float, metavar="Z",
                     help="DP noise multiplier: Gaussian noise of std Z*C on the sum of clipped updates; epsilon "
                     "(at --dp-delta) is printed per round and written to metrics.jsonl")
    sim.add_argument("--dp-mode", choices=["central", "distributed"], default="central",
                     help="who adds the noise: the aggregator (central, default) or each device its share "
                     "(distributed: no update leaves a device in the clear)")
    sim.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported epsilon (default 1e-5)")
    sim.add_argument("--dp-epsilon-budget", type=float, metavar="EPS",
                     help="stop training before a round would take epsilon past EPS")

    _add_experiment_parser(sub)

    ev = sub.add_parser(
        "evaluate",
        help="verification and identification metrics of a model on a labelled folder",
        description="Embed every image of DIR, score all genuine and impostor pairs (or, with --gallery, the "
        "gallery-vs-probe pairs only) and report "
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
    ev.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                    help="faceapi on frames (not --aligned yes): blazeface (MediaPipe, TFLite) or tiny (the face-api "
                    f"port) (default {DEFAULT_DETECTOR})")
    ev.add_argument("--landmarks", choices=LANDMARK_MODELS, default=DEFAULT_LANDMARKS,
                    help="faceapi on frames: mesh (MediaPipe Face Mesh, 468 points) or 68 "
                    f"(default {DEFAULT_LANDMARKS})")
    ev.add_argument("--gallery", type=Path,
                    help="score only gallery-vs-probe pairs, as unlock compares: enrolment faces here, probes in "
                    "--data, identity = folder name (genuine: same name; rank-1 then skipped)")
    ev.add_argument("--camera", help="pass the probes (--data) through a simulated camera: a domain ("
                    "door-night, corridor, far-night), field overrides or both, e.g. corridor or "
                    "face_px=32,gamma=2.0,noise=7,jpeg=50 (fields: grey, gamma, face_px, noise, jpeg, blur)")
    ev.add_argument("--camera-seed", type=int, default=0, help="seed of the simulated camera's noise (default 0)")
    ev.add_argument("--score", choices=["auto", "cosine", "l2"], default="auto",
                    help="pair score: cosine, or l2 (minus the euclidean distance of the raw descriptors); auto: "
                    "l2 for faceapi (lower EER, measured in BENCHMARKS.md), cosine for checkpoints and exports "
                    "(their embeddings are L2-normalised, where both rank alike)")
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
    _add_distill_parser(sub)
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
    if args.command == "distill":
        return _distill(args)
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
    if (args.dp_clip is None) != (args.dp_noise is None):
        print("facefed simulate: --dp-clip and --dp-noise go together", file=sys.stderr)
        return 2
    dp = None if args.dp_clip is None else {"clip": args.dp_clip, "noise_multiplier": args.dp_noise,
                                            "mode": args.dp_mode, "delta": args.dp_delta,
                                            "epsilon_budget": args.dp_epsilon_budget}
    cfg = SimulationConfig(
        data=data, out=args.out, clients=args.clients, rounds=args.rounds, **_training_settings(args),
        split=args.split, alpha=args.alpha, holdout=args.holdout, seed=args.seed, broker=args.broker,
        arch=args.model, act=args.act, max_chunk_bytes=args.max_chunk_bytes,
        update_codec=args.update_codec, download_codec=args.download_codec, bn_statistics=args.bn_statistics,
        dashboard_port=args.dashboard_port,
        model_options={"trainable": args.trainable or "last"} if args.model == "faceapi-resnet" else {},
        dp=dp,
    )
    print(f"facefed simulate: {args.clients} clients, {args.rounds} rounds, data {', '.join(map(str, data))}")
    if args.dashboard_port is not None:
        print(f"facefed simulate: fleet dashboard at http://127.0.0.1:{args.dashboard_port}/")
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
    exp.add_argument("--preset", choices=["quick", "full", "camera-quick", "camera"],
                     help="quick: ORL, 4 clients, a few minutes; full: ORL+Yale+celeb-dev, 6 clients; camera-quick "
                     "(<= 15 min) and camera (<= 45 min): one owner per device in a simulated camera, arms version0, "
                     "local, fedavg, fedavg_personal, pooled (facefed/camera_experiment.py; takes --data, --camera, "
                     "--rounds, --seed, --methods, --out)")
    exp.add_argument("--camera", help="camera presets: the device cameras' domain, e.g. corridor (default), "
                     "door-night, or corridor,face_px=24 (fields: grey, gamma, face_px, noise, jpeg, blur)")
    exp.add_argument("--camera-model", choices=["own", "measured", "domain", "none"],
                     help="camera presets: what each device knows of its camera for its synthetic pairs: its own "
                     "exactly (default), the one it measures on its frames and enrolment, only the domain's "
                     "nominal one, or none (only its owner's frames show it)")
    exp.add_argument("--owner-frames", choices=["all", "unlocked"],
                     help="camera presets: which camera frames of its owner a device trains on: all (default; what "
                     "PIN fallbacks after rejected faces add up to) or unlocked (only those version 0 matches at "
                     "the FAR 1e-3 unlock threshold: what successful unlocks alone keep)")
    exp.add_argument("--household", help="camera presets: people per device, 1 (one owner, default) or a range "
                     "such as 2-5 (household devices; each member's frames against their own enrolment)")
    exp.add_argument("--transport", choices=["mqtt", "inprocess"],
                     help="camera presets: the federated arms over a real MQTT broker, the aggregator service and an "
                     "agent per device (default), or on the round engine alone in this process (same figures)")
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
    exp.add_argument("--methods", help="comma-separated subset of centralized,local,fedavg,fedprox,server "
                     "(camera presets: of version0,local,fedavg,fedavg_personal,pooled)")
    exp.add_argument("--jobs", type=int, help="arms run at the same time (presets: 3; 1 gives per-arm wall times)")
    exp.add_argument("--bn-statistics", choices=["averaged", "measured"],
                     help="federated arms: BatchNorm statistics averaged from the clients' (default), or measured by "
                     "the clients on each averaged model in a statistics phase; measured also scores the averaged "
                     "ones on the same weights (the *_averaged_bn rows)")


EXPERIMENT_FIELDS = ("clients", "rounds", "local_epochs", "lr", "batch_size", "split", "alpha", "size_skew",
                     "holdout", "max_per_identity", "seed", "proximal_mu", "server_strategy", "server_lr",
                     "fraction_fit", "min_clients", "round_timeout_s", "single_identity_clients", "negative_anchors",
                     "jobs", "bn_statistics")


def _experiment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from facefed.experiment import ExperimentConfig, ExperimentError, preset_config, run_experiment
    from model_zoo.data import shared_datasets_root

    if args.preset in ("camera-quick", "camera"):
        from facefed.camera_experiment import main as camera_main

        return camera_main(args)
    camera_only = [flag for flag, value in (("--camera", args.camera), ("--camera-model", args.camera_model),
                                            ("--owner-frames", args.owner_frames), ("--transport", args.transport), ("--household", args.household))
                   if value is not None]
    if camera_only:
        print(f"facefed experiment: {', '.join(camera_only)} apply to the camera presets only "
              "(--preset camera-quick or camera)", file=sys.stderr)
        return 2
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
            f"held-out acc {fmt(entry.get('val_accuracy'), '.3f')} | EER {fmt(entry.get('eer'), '.3f')}"
            + (f" | epsilon {entry['epsilon']:.2f}" if "epsilon" in entry else ""))


def _evaluate(args: argparse.Namespace) -> int:
    from model_zoo.data import detect_layout, load_dataset
    import numpy as np

    from model_zoo.metrics import gallery_pair_scores, rank1_accuracy, report_from_scores, verification_report

    from model_zoo.backbones import model_score

    score = model_score(args.model) if args.score == "auto" else args.score
    try:
        dataset = load_dataset(args.data)
        if args.camera:
            from model_zoo.camera import capture_frames, parse_camera

            dataset.images = capture_frames(dataset.images, parse_camera(args.camera),
                                            np.random.default_rng(args.camera_seed), face_spread=0.0)
        embeddings = _embed_for_evaluation(args.model, dataset, args.aligned, detect_layout(args.data),
                                           args.detector, args.landmarks)
        if args.gallery:
            gallery = load_dataset(args.gallery)
            gallery_embeddings = _embed_for_evaluation(args.model, gallery, args.aligned, detect_layout(args.gallery),
                                                       args.detector, args.landmarks)
            names = np.asarray(dataset.identities)
            report = report_from_scores(*gallery_pair_scores(
                gallery_embeddings, np.asarray(gallery.identities)[gallery.labels],
                embeddings, names[dataset.labels], score))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"facefed evaluate: {exc}", file=sys.stderr)
        return 2
    result = {"model": str(args.model), "data": str(args.data), "images": len(dataset),
              "identities": len(dataset.identities), "score": score, "camera": args.camera}
    if args.gallery:
        result.update({"gallery": str(args.gallery), "gallery_images": len(gallery), **report.to_dict()})
    else:
        report = verification_report(embeddings, dataset.labels, score=score)
        result.update({**report.to_dict(), "rank1": rank1_accuracy(embeddings, dataset.labels)})
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.roc:
        from facefed.plots import plot_roc

        plot_roc({Path(args.model).name: (report.fpr, report.tpr)}, args.roc, title=f"ROC on {args.data.name}")
    return 0


def _embed_for_evaluation(model: str, dataset, aligned: str, layout: str, detector: str = DEFAULT_DETECTOR,
                          landmarks: str = DEFAULT_LANDMARKS):
    """Embeddings of every image: a FaceFed checkpoint, or the pretrained face-api descriptor."""
    if model == "faceapi":
        import torch

        from model_zoo.pipeline import FacePipeline

        torch.set_num_threads(1)  # one-image detector/landmark passes are far slower with 2 threads here
        if aligned == "auto":
            # Folder datasets of 112x112 faces (celeb-dev) are ArcFace-aligned crops; ORL and Yale are not.
            aligned = "yes" if layout == "folders" else "no"
        pipeline = FacePipeline(detector_input_size=128, detector=detector, landmarks=landmarks)
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


# --- facefed distill ---

def _add_distill_parser(sub) -> None:
    dist = sub.add_parser(
        "distill",
        help="train MobileFaceNet to reproduce the pretrained face-api descriptor (distillation)",
        description="Distil the pretrained face-api descriptor (through the kit's alignment) into MobileFaceNet on "
        "the faces of --data, without labels: the student learns to point its normalised 128-d embedding where "
        "the teacher's points. Writes DIR/student.safetensors (a FaceFed checkpoint: usable with evaluate, "
        "export, and as the federation's starting model via aggregator.yaml model.init_checkpoint), "
        "DIR/teacher.safetensors (the cached teacher embeddings) and DIR/distill.json.",
    )
    dist.add_argument("--out", required=True, type=Path, help="output folder")
    dist.add_argument("--data", action="append", type=Path,
                      help="face dataset (repeat to mix): ArcFace-aligned folder-per-identity crops are used as "
                      "they are, other layouts are aligned from 68 landmarks (default: ../shared/datasets/celeb-dev)")
    dist.add_argument("--holdout", type=int, default=0,
                      help="leave out the identities `facefed simulate --holdout K --seed S` holds out (default 0)")
    dist.add_argument("--exclude", action="append", default=[], metavar="NAME",
                      help="leave out this identity too (repeatable; prefixed '<folder>_' when mixing datasets)")
    dist.add_argument("--max-per-identity", type=int, help="first N images of each identity")
    dist.add_argument("--epochs", type=int, default=3)
    dist.add_argument("--batch-size", type=int, default=32)
    dist.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (default 2e-3)")
    dist.add_argument("--seed", type=int, default=0, help="student init, batches and the --holdout split")
    dist.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _distill_faces(roots: list[Path]):
    """(ArcFace crops, labels, identity names) of every image of roots; names prefixed as load_datasets does."""
    import numpy as np

    from model_zoo import align
    from model_zoo.data import detect_layout, load_dataset
    from model_zoo.distill import arcface_crops

    crops, labels, names = [], [], []
    for root in roots:
        part = load_dataset(root)
        aligned = detect_layout(root) == "folders" and part.images.shape[1:3] == (align.ARCFACE_SIZE,) * 2
        crops.append(part.images if aligned else arcface_crops(part.images))
        labels.append(part.labels + len(names))
        names += [f"{Path(root).name}_{i}" for i in part.identities] if len(roots) > 1 else list(part.identities)
    return np.concatenate(crops), np.concatenate(labels), names


def _distill(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch

    from model_zoo.backbones import build_backbone
    from model_zoo.checkpoint import save_checkpoint
    from model_zoo.data import shared_datasets_root
    from model_zoo.distill import TEACHER_NAME, DistillConfig, cached_teacher_embeddings, distill
    from model_zoo.partition import split_holdout

    data = args.data or [shared_datasets_root() / "celeb-dev"]
    missing = [p for p in data if not p.is_dir()]
    if missing:
        print(f"facefed distill: no such dataset folder: {missing[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr).check()
        crops, labels, names = _distill_faces(data)
        held = [names[i] for i in np.unique(labels[split_holdout(labels, args.holdout, args.seed)[1]])]
    except (ValueError, FileNotFoundError) as exc:
        print(f"facefed distill: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.exclude) - set(names))
    if unknown:
        print(f"facefed distill: --exclude {unknown[0]}: no such identity", file=sys.stderr)
        return 2
    left_out = set(held) | set(args.exclude)
    keep = [i for i in range(len(labels)) if names[labels[i]] not in left_out]
    if args.max_per_identity:  # the first N of each identity, in dataset order
        seen: dict[int, int] = {}
        capped = []
        for i in keep:
            seen[labels[i]] = seen.get(labels[i], 0) + 1
            if seen[labels[i]] <= args.max_per_identity:
                capped.append(i)
        keep = capped
    if len(keep) < 2:
        print("facefed distill: fewer than 2 images left to train on", file=sys.stderr)
        return 2
    crops = np.ascontiguousarray(crops[keep])
    used = sorted({names[labels[i]] for i in keep})
    print(f"facefed distill: {len(crops)} faces of {len(used)} identities; left out: "
          f"{', '.join(sorted(left_out)) or 'none'}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    targets = cached_teacher_embeddings(crops, args.out / "teacher.safetensors")
    teacher_s = time.perf_counter() - start
    print(f"teacher embeddings: {'from cache' if targets.from_cache else f'{teacher_s:.0f} s'}")
    torch.manual_seed(args.seed)
    student = build_backbone("mobilefacenet")
    cfg = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    result = distill(student, crops, targets, cfg, progress=True)
    meta = {"teacher": TEACHER_NAME, "images": len(crops), "identities": used,
            "held_out_identities": sorted(left_out), "epoch_losses": result.epoch_losses, "config": result.config,
            "teacher_mean": result.teacher_mean}
    save_checkpoint(args.out / "student.safetensors", student, meta)
    (args.out / "distill.json").write_text(json.dumps({**meta, "data": [str(p) for p in data], "steps": result.steps,
                                                       "seconds": round(result.seconds, 1),
                                                       "teacher_seconds": round(teacher_s, 1)}, indent=2) + "\n")
    print(f"loss (1 - cos to the teacher) per epoch: {', '.join(f'{x:.4f}' for x in result.epoch_losses)} "
          f"({result.seconds:.0f} s)")
    print(f"wrote {args.out / 'student.safetensors'}; start a federation from it with aggregator.yaml "
          f"model: {{arch: mobilefacenet, init_checkpoint: {args.out / 'student.safetensors'}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
