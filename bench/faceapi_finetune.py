"""Federated partial fine-tuning of the pretrained face-api ResNet: held-out verification and device cost.

Accuracy. celeb-dev is split by identity as `facefed simulate` splits it: `--holdout` identities are never
trained on, the others are dealt to `--clients` clients (the first `--train-per-identity` images of each).
The federation runs through `facefed simulate`'s code: an embedded MQTT broker, the aggregator and one agent
process per client, `--rounds` rounds of FedAvg over the tail tensors. Then, on people no client saw:
- celeb-dev held out: every image of the held-out identities (112x112 ArcFace-aligned crops), pretrained
  and fine-tuned backbone alike (the backbone re-frames crops into the dlib chip itself);
- ORL (all 38 people, never trained on; tight 92x112 grey crops, not ArcFace-aligned): the pretrained net
  through the pipeline route of `facefed evaluate --model faceapi` (68 landmarks -> dlib chip), and, since
  the backbones take ArcFace crops, pretrained and fine-tuned backbones on 112x112 ArcFace crops warped from
  the same landmarks (5 points -> ARCFACE_112 template).
Scores: cosine of L2-normalised embeddings over all pairs; accuracy is the balanced best-threshold accuracy.

int8 trunk. The frozen trunk of `--trainable` (after the fixed re-framing) exported to ONNX and quantized
statically by ONNX Runtime (QDQ, int8 per-channel weights, uint8 activations, MinMax calibration on client
images); held-out celeb-dev through int8 trunk + float tail, and trunk milliseconds per image.

Device cost. One client's partition, torch.set_num_threads(1): the one-time trunk pass (plain + mirrored
images, cached across rounds), then seconds per local epoch, and the bytes a device uploads per round
(safetensors payload of the shared tensors), for trainable projection / last / last2 / all and MobileFaceNet.
The machine is shared: wall seconds move with other load, CPU seconds (process time) much less.

Remedies (issue 3: fine-tuning must not make held-out figures worse than the pretrained net). Every version of
the global model (version 0 = the pretrained net, then one per round) is scored on both held-out sets and on an
operator-owned validation set, Yale (15 people never trained on or tested; frames -> 68 landmarks -> ArcFace
crops), from frozen-trunk features computed once. Then:
- `--l2sp-alpha A`: devices add A/2 * ||w - w_version0||^2 (L2-SP) to their loss; announced as the train setting
  `l2sp_alpha`. `--federation in-process` runs the same devices (edge_agent.trainer.LocalTrainer, the agents'
  settings and seeds) and the aggregator's round engine (FedAvg; facefed/inprocess.py) in this process, without
  the wire, for quick screens.
- `--negative-anchors N`: N seeded random negative class vectors join every device head (model_zoo/losses).
- server-side selection: the version the operator would deploy when choosing, among versions 0..R, the lowest
  validation EER (ties: the earlier version), and what that version scores on the held-out sets.

    python -m bench.faceapi_finetune --json results.json
    python -m bench.faceapi_finetune --federation in-process --l2sp-alpha 1000 --no-int8 --cost-epochs 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facefed.bench_report import run_and_report
from facefed.simulate import SimulationConfig, prepare_partitions, run_simulation
from fedwire.codec import encode_tensors
from fedwire.messages import TrainSettings
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, save_folders, shared_datasets_root, to_model_input
from model_zoo.evaluate import evaluate_embeddings, verification_row
from edge_agent.backends import load_embedder
from model_zoo.export import Int8Trunk, export_model
from model_zoo.losses import ArcFaceHead
from model_zoo.pipeline import FacePipeline
from model_zoo.train import TrainConfig, TrunkFeatureCache, embed_images, train_local, trunk_features

COST_MODELS = (("faceapi-resnet", "projection"), ("faceapi-resnet", "last"), ("faceapi-resnet", "last2"),
               ("faceapi-resnet", "all"), ("mobilefacenet", None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = shared_datasets_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeb", type=Path, default=shared / "celeb-dev", help="ArcFace-aligned folder dataset")
    parser.add_argument("--orl", type=Path, default=shared / "orl", help="ORL faces, held out entirely")
    parser.add_argument("--holdout", type=int, default=4, help="celeb-dev identities held out (default 4)")
    parser.add_argument("--clients", type=int, default=4, help="federated clients (default 4)")
    parser.add_argument("--train-per-identity", type=int, default=150,
                        help="first N images of each training identity (default 150)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--trainable", choices=["projection", "last", "last2", "all"], default="last")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--margin", type=float, default=0.0, help="ArcFace margin of the device heads (radians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trunk-precision", choices=["fp32", "int8"], default="fp32",
                        help="devices run the frozen trunk in fp32 (torch) or int8 (ONNX Runtime) while training")
    parser.add_argument("--cost-epochs", type=int, default=2,
                        help="epochs timed per device-cost row (0: skip the device-cost rows)")
    parser.add_argument("--federation", choices=["mqtt", "in-process"], default="mqtt",
                        help="mqtt: facefed simulate's processes over an embedded broker (default); in-process: "
                        "the same LocalTrainers and FedAvg code in this process, no wire")
    parser.add_argument("--l2sp-alpha", type=float, default=0.0,
                        help="L2-SP pull towards the pretrained weights (model version 0), announced as l2sp_alpha")
    parser.add_argument("--negative-anchors", type=int, default=0,
                        help="seeded random negative class vectors in every device head (0: off)")
    parser.add_argument("--weight-decay", type=float, default=None, help="announced weight decay (default 5e-4)")
    parser.add_argument("--validation", type=Path, default=shared / "yale",
                        help="the operator's validation set for server-side selection (default Yale; '' to skip)")
    parser.add_argument("--no-int8", action="store_true", help="skip the onnx-int8 export and the int8 trunk rows")
    parser.add_argument("--out", type=Path, default=None, help="keep the federation's run folder here")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


# --- federation ---

def federate(sim_config: SimulationConfig) -> tuple[Path, list[dict]]:
    """Run the federation over MQTT; (final checkpoint, the aggregator's round log)."""
    start = time.perf_counter()
    result = run_simulation(sim_config, on_round=lambda entry: print(
        f"  round {entry['round']}: clients {entry['clients']}, {entry['bytes_up'] / 1e6:.1f} MB up, "
        f"held-out EER {entry.get('eer', float('nan')):.4f} ({time.perf_counter() - start:.0f} s)", flush=True))
    return result.final_checkpoint, result.rounds


def remedy_settings(args: argparse.Namespace) -> dict:
    """Announced train settings beyond local_epochs, lr and margin."""
    extra = {}
    if args.l2sp_alpha > 0:
        extra["l2sp_alpha"] = args.l2sp_alpha
    if args.negative_anchors > 0:
        extra.update(negative_anchors=args.negative_anchors, anchor_seed=args.seed)
    if args.weight_decay is not None:
        extra["weight_decay"] = args.weight_decay
    return extra


def check_announceable(extra: dict) -> None:
    """The MQTT route announces what fedwire.messages.TrainSettings holds; anything else stops the aggregator."""
    import dataclasses

    missing = sorted(set(extra) - {f.name for f in dataclasses.fields(TrainSettings)})
    if missing:
        raise SystemExit(f"the aggregator cannot announce {', '.join(missing)} yet (fedwire.messages.TrainSettings "
                         "lacks it): use --federation in-process")


def federate_in_process(clients: list[FaceDataset], args: argparse.Namespace, extra: dict, workdir: Path
                        ) -> tuple[Path, list[dict]]:
    """The agents' training (LocalTrainer, batch 32, augmentation, seed + 1000 k, state in workdir) and the
    aggregator's round engine (FedAvg over n_k), in this process (facefed/inprocess.py): (the aggregator's state
    dir, its round log)."""
    from aggregator.config import AggregatorConfig
    from edge_agent.trainer import LocalTrainer
    from facefed.inprocess import Device, InProcessModels, run_inprocess
    from fedwire.config import parse_config

    devices = [Device(f"client-{k}", LocalTrainer(part, workdir / f"client-{k}" / "state", batch_size=32,
                                                  augment=True, seed=args.seed + 1000 * k,
                                                  trunk_precision=args.trunk_precision))
               for k, part in enumerate(clients)]
    config = parse_config(AggregatorConfig, {
        "state_dir": str(workdir / "aggregator"), "rounds": args.rounds, "min_clients": len(devices),
        "model": {"arch": "faceapi-resnet", "options": {"trainable": args.trainable}},
        "train": {"local_epochs": args.local_epochs, "lr": args.lr, "margin": args.margin, **extra}})
    start = time.perf_counter()

    def progress(round_number: int, tensors) -> dict:
        if round_number:
            print(f"  round {round_number}: clients {len(devices)}, "
                  f"{sum(d.upload_bytes[-1] for d in devices) / 1e6:.1f} MB up ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        return {}

    engine = run_inprocess(config, devices, InProcessModels(config, evaluate=progress))
    return engine.state.root, engine.state.read_log()[1:]


# --- every version on the held-out sets and the validation set, from trunk features computed once ---

def version_table(trainable: str, versions: list[dict], sets: dict[str, tuple[np.ndarray, np.ndarray]]
                  ) -> list[dict]:
    """For each version: {name: (EER, TAR@1e-3, accuracy)} per set; the trunk runs once per image."""
    net = build_backbone("faceapi-resnet", trainable=trainable).eval()
    features = {name: trunk_features(net, images) for name, (images, _) in sets.items()}
    table = []
    for number, tensors in enumerate(versions):
        load_shared_tensors(net, tensors)
        row = {"version": number}
        with torch.no_grad():
            for name, (_, labels) in sets.items():
                f = features[name]
                emb = torch.cat([net.forward_tail(f[i:i + 128]) for i in range(0, len(f), 128)]).numpy()
                report = evaluate_embeddings(emb, labels)
                row[name] = {"eer": report["eer"], "tar_at_far_1e-3": report["tar_at_far"]["1e-3"],
                             "accuracy": report["accuracy"]}
        table.append(row)
    return table


def select_version(table: list[dict], validation: str) -> int:
    """Server-side selection: the version with the lowest validation EER; ties go to the earlier version."""
    return min(table, key=lambda row: (round(row[validation]["eer"], 6), row["version"]))["version"]


def checkpoint_versions(state_dir: Path) -> list[dict]:
    """Global tensors of every version the aggregator wrote (round-0000 = version 0)."""
    paths = sorted((state_dir / "checkpoints").glob("round-*.safetensors"))
    return [shared_tensors(load_checkpoint(path)[0]) for path in paths]


# --- ORL: landmarks once, two kinds of input ---

def frame_landmarks(pipeline: FacePipeline, images: np.ndarray) -> np.ndarray:
    """[N, 68, 2] landmarks of the best face of each image (FacePipeline.primary_landmarks)."""
    return np.stack([pipeline.primary_landmarks(image) for image in images])


def arcface_crops(images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """112x112 crops aligned to the ArcFace 5-point template, the input the backbones expect."""
    return np.stack([FacePipeline.arcface_crop(image, points) for image, points in zip(images, landmarks)])


# --- int8 trunk through ONNX Runtime ---

def int8_trunk_check(trainable: str, calibration: np.ndarray, held_out: FaceDataset) -> list[dict]:
    """Held-out verification and trunk ms/image: torch float trunk vs ONNX Runtime int8 trunk, float tail."""
    net = build_backbone("faceapi-resnet", trainable=trainable)
    layers = net.trunk_layers()  # the weights; the fixed re-framing stays float
    with torch.no_grad():
        chips = net.trunk.chip(to_model_input(calibration)).numpy()
        eval_chips = net.trunk.chip(to_model_input(held_out.images)).numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
        int8 = Int8Trunk(layers, chips, threads=1)
    runners = {
        "torch fp32": lambda batch: layers(torch.from_numpy(batch)).numpy(),
        "onnxruntime int8": lambda batch: int8(torch.from_numpy(batch)).numpy(),
    }
    rows, reference = [], None
    for name, run in runners.items():
        start = time.perf_counter()
        with torch.no_grad():
            features = np.concatenate([run(eval_chips[i:i + 32]) for i in range(0, len(eval_chips), 32)])
            ms = 1000 * (time.perf_counter() - start) / len(eval_chips)
            embeddings = net.forward_tail(torch.from_numpy(features)).numpy()
        reference = embeddings if reference is None else reference
        row = verification_row(f"pretrained, {name} trunk", "celeb-dev held out", embeddings, held_out.labels)
        rows.append({**row, "trunk_ms_per_image": ms,
                     "min_cosine_to_fp32": float((embeddings * reference).sum(axis=1).min())})
    return rows


# --- device cost ---

def device_cost(arch: str, trainable: str | None, data: FaceDataset, epochs: int) -> dict:
    """One-time trunk pass, then wall and CPU seconds per local epoch, and the bytes of one upload."""
    torch.manual_seed(0)
    net = build_backbone(arch, trainable=trainable) if trainable else build_backbone(arch)
    head = ArcFaceHead(128, data.num_classes)
    cache = TrunkFeatureCache()
    first = train_local(net, head, data, TrainConfig(epochs=1, batch_size=32, lr=1e-4), trunk_cache=cache)
    wall, cpu = time.perf_counter(), time.process_time()
    train_local(net, head, data, TrainConfig(epochs=epochs, batch_size=32, lr=1e-4), trunk_cache=cache)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tensors = shared_tensors(net)
    return {"model": arch, "trainable": trainable or "all", "images": len(data),
            "trained_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "trunk_once_s": first.trunk_seconds, "epoch_wall_s": wall / epochs, "epoch_cpu_s": cpu / epochs,
            "upload_bytes": len(encode_tensors(tensors))}


# --- the run ---

def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    extra = remedy_settings(args)
    if args.federation == "mqtt":
        check_announceable(extra)
    celeb = load_dataset(args.celeb, layout="folders")
    limited = celeb.first_per_identity(args.train_per_identity)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        save_folders(limited, Path(tmp) / "celeb")
        sim_config = SimulationConfig(
            data=[Path(tmp) / "celeb"], out=out, clients=args.clients, rounds=args.rounds,
            local_epochs=args.local_epochs, lr=args.lr, margin=args.margin, holdout=args.holdout, seed=args.seed,
            arch="faceapi-resnet", model_options={"trainable": args.trainable},
            trunk_precision=args.trunk_precision, train_extra=extra)
        clients, held_out_small = prepare_partitions(load_dataset(Path(tmp) / "celeb", layout="folders"), sim_config)
        print(f"federation ({args.federation}): {args.clients} clients "
              f"({', '.join(str(len(c)) for c in clients)} images), held out: "
              f"{', '.join(held_out_small.identities)}; announced extra settings {extra or 'none'}", flush=True)
        if args.federation == "mqtt":
            final_path, rounds = federate(sim_config)
            versions = checkpoint_versions(out / "aggregator")
        else:
            state_dir, rounds = federate_in_process(clients, args, extra, Path(tmp) / "in-process")
            versions = checkpoint_versions(state_dir)
            final_path = state_dir / "checkpoints" / f"round-{args.rounds:04d}.safetensors"
        fine_tuned, _ = load_checkpoint(final_path)
        calibration = np.concatenate([c.images for c in clients])
        calibration = calibration[np.random.default_rng(args.seed).choice(len(calibration), 128, replace=False)]
        deployed = deployed_celeb = None
        if not args.no_int8:
            print("exporting the fine-tuned model as deployed: onnx-int8 ...", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                deployed = load_embedder(export_model(final_path, "onnx-int8", Path(tmp) / "export", calibration,
                                                      model_version=args.rounds).model_path)
                deployed_celeb = deployed.embed(celeb.of_identities(held_out_small.identities).images)
    pretrained = build_backbone("faceapi-resnet", trainable=args.trainable)
    held_out = celeb.of_identities(held_out_small.identities)

    print("held-out celeb-dev and ORL ...", flush=True)
    rows = [verification_row("pretrained", "celeb-dev held out", embed_images(pretrained, held_out.images),
                             held_out.labels),
            verification_row("fine-tuned", "celeb-dev held out", embed_images(fine_tuned, held_out.images),
                             held_out.labels)]
    if deployed is not None:
        rows.append(verification_row("fine-tuned, deployed onnx-int8", "celeb-dev held out", deployed_celeb,
                                     held_out.labels))
    orl = load_dataset(args.orl)
    pipeline = FacePipeline(detector_input_size=128)
    landmarks = frame_landmarks(pipeline, orl.images)
    chips = np.stack([pipeline.chip_from_landmarks(image, points) for image, points in zip(orl.images, landmarks)])
    crops = arcface_crops(orl.images, landmarks)
    rows += [verification_row("pretrained, pipeline (dlib chip)", "ORL", pipeline.embed_chips(chips), orl.labels),
             verification_row("pretrained", "ORL", embed_images(pretrained, crops), orl.labels),
             verification_row("fine-tuned", "ORL", embed_images(fine_tuned, crops), orl.labels)]
    if deployed is not None:
        rows.append(verification_row("fine-tuned, deployed onnx-int8", "ORL", deployed.embed(crops), orl.labels))

    sets = {"celeb-dev held out": (held_out.images, held_out.labels), "ORL": (crops, orl.labels)}
    if args.validation and str(args.validation) not in ("", ".") and Path(args.validation).is_dir():
        print("validation set (operator's) ...", flush=True)
        validation = load_dataset(args.validation)
        sets["validation"] = (arcface_crops(validation.images, frame_landmarks(FacePipeline(), validation.images)),
                              validation.labels)
    print(f"scoring versions 0..{len(versions) - 1} ...", flush=True)
    per_version = version_table(args.trainable, versions, sets)
    selected = select_version(per_version, "validation") if "validation" in sets else None

    int8_rows = []
    if not args.no_int8:
        print("int8 trunk ...", flush=True)
        int8_rows = int8_trunk_check(args.trainable, calibration, held_out)

    print("device cost ...", flush=True)
    cost_rows = [device_cost(arch, trainable, clients[0], args.cost_epochs) for arch, trainable in COST_MODELS
                 if args.cost_epochs > 0]
    return {
        "celeb": str(args.celeb), "orl": str(args.orl), "held_out_identities": held_out.identities,
        "clients": args.clients, "client_images": [len(c) for c in clients],
        "train_per_identity": args.train_per_identity, "rounds": args.rounds, "local_epochs": args.local_epochs,
        "trainable": args.trainable, "trunk_precision": args.trunk_precision, "lr": args.lr, "margin": args.margin, "seed": args.seed,
        "announced_extra": extra, "validation": str(args.validation) if "validation" in sets else None,
        "federation": ("facefed simulate code: embedded MQTT broker, aggregator and agent processes"
                       if args.federation == "mqtt" else
                       "in-process: the agents' LocalTrainer and the aggregator's round engine, no wire"),
        "torch_threads": torch.get_num_threads(),
        "round_log": [{k: r.get(k) for k in ("round", "clients", "bytes_up", "train_loss", "eer")} for r in rounds],
        "verification": rows, "int8_trunk": int8_rows, "device_cost": cost_rows,
        "per_version": per_version, "selected_version": selected,
    }


def print_tables(results: dict) -> None:
    print(f"\nheld out: {', '.join(results['held_out_identities'])}; {results['clients']} clients "
          f"({results['client_images']} images), {results['rounds']} rounds x {results['local_epochs']} local "
          f"epochs, trainable {results['trainable']}, lr {results['lr']}, margin {results['margin']}, "
          f"extra settings {results.get('announced_extra') or 'none'}; {results['federation']}")
    print(f"{'round':>5} {'clients':>7} {'MB up':>7} {'train loss':>10} {'EER (aggregator eval)':>22}")
    for r in results["round_log"]:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        eer = "-" if r.get("eer") is None else f"{100 * r['eer']:.2f}%"
        print(f"{r['round']:5d} {r['clients']:7d} {r['bytes_up'] / 1e6:7.2f} {loss:>10} {eer:>22}")
    print(f"\n{'model':34} {'data':19} {'images':>6} {'genuine':>7} {'accuracy':>8} {'EER':>7} {'TAR@1e-3':>8} "
          f"{'rank-1':>7}")
    for row in results["verification"] + results["int8_trunk"]:
        print(f"{row['model']:34} {row['data']:19} {row['images']:6d} {row['genuine_pairs']:7d} "
              f"{100 * row['accuracy']:7.2f}% "
              f"{100 * row['eer']:6.2f}% {100 * row['tar_at_far_1e-3']:7.2f}% {100 * row['rank1']:6.2f}%")
    print_versions(results)
    for row in results["int8_trunk"]:
        print(f"  {row['model']}: trunk {row['trunk_ms_per_image']:.2f} ms/image, "
              f"min cosine to the fp32 embeddings {row['min_cosine_to_fp32']:.5f}")
    if not results["device_cost"]:
        return
    print(f"\ndevice cost, one client ({results['device_cost'][0]['images']} images), "
          f"torch threads {results['torch_threads']}")
    print(f"{'model':15} {'trainable':9} {'trained params':>14} {'trunk once s':>12} {'epoch wall s':>12} "
          f"{'epoch CPU s':>11} {'upload / round':>14}")
    for row in results["device_cost"]:
        print(f"{row['model']:15} {row['trainable']:9} {row['trained_parameters']:14,d} {row['trunk_once_s']:12.2f} "
              f"{row['epoch_wall_s']:12.2f} {row['epoch_cpu_s']:11.2f} {row['upload_bytes'] / 1e6:11.2f} MB")


def print_versions(results: dict) -> None:
    table = results.get("per_version") or []
    if not table:
        return
    names = [k for k in table[0] if k != "version"]
    print("\nevery global model version (0 = pretrained): EER / TAR@1e-3 / accuracy, %")
    print(f"{'version':>7} " + " ".join(f"{name:>28}" for name in names))
    for row in table:
        cells = [f"{100 * row[n]['eer']:6.3f} / {100 * row[n]['tar_at_far_1e-3']:6.2f} / "
                 f"{100 * row[n]['accuracy']:6.2f}" for n in names]
        mark = "  <- selected on validation" if row["version"] == results.get("selected_version") else ""
        print(f"{row['version']:7d} " + " ".join(f"{c:>28}" for c in cells) + mark)


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run, print_tables)


if __name__ == "__main__":
    main()
