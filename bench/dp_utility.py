"""Privacy/utility curve of DP-FedAvg: held-out accuracy and TAR@FAR=1e-3 against epsilon, for fleets of N devices
holding one person each, against the same run without DP, in one invocation.

Setup. celeb-dev split by identity: `--holdout` people are never trained on and are what every model is scored
on; the other people's images are dealt out `--images-per-device` at a time, one person per device, so the
N = 100 fleet is the first 100 devices of the N = 1,000 one. The model is the pretrained face-api ResNet with
only its 256 -> 128 projection trained (32,768 parameters); the frozen trunk's features are computed once per
image and cached by each device (model_zoo.train.TrunkFeatureCache). Each device trains as the agent does
(edge_agent's LocalTrainer): its own head, one imprinted class plus `--negative-anchors` fixed random negatives
(the kit's single-identity remedy), `--local-epochs` local epochs. Each round samples `--per-round` devices
(fraction_fit = per_round / N, which the accountant amplifies by): the same noise per round at every N, so a
larger fleet spends less epsilon for it.

Every run is the aggregator's round engine with the devices' own LocalTrainers, in this process
(facefed/inprocess.py): the engine samples the round's devices (seeded by the config's seed, so every run of
a fleet samples the same devices), and screens, clips, noises and averages their updates. DP is the aggregator config's `dp:` section
(central mode: aggregator.dp.DpStrategy clips each update to C and adds N(0, (z C)^2) to the sum, uniform
weights), with the noise from a seeded generator so that a run repeats; epsilon is the engine's own, as the
round line and rounds.jsonl report it (dp-accounting's RDP accountant with Poisson sampling at fraction_fit).
The non-private run is plain FedAvg with the same devices, sampling and seeds. C defaults to the median
update norm of the non-private run's first round (`--clip` overrides it). Each device frees its backbone
after its turn (Device.unload), so the fleet of 1,000 fits in memory.

    python -m bench.dp_utility                       # N = 100 and 1,000, noise multipliers 0.5 and 1.0
    python -m bench.dp_utility --fleets 1000 --noise 1.0 --rounds 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aggregator.config import AggregatorConfig
from edge_agent.trainer import LocalTrainer
from facefed.inprocess import Device, InProcessModels, run_inprocess
from fedwire.config import parse_config
from fedwire.dp import delta_of, l2_norm
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_shared_tensors, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, shared_datasets_root
from model_zoo.evaluate import evaluate_embeddings
from model_zoo.partition import split_holdout
from model_zoo.train import trunk_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeb", type=Path, default=shared_datasets_root() / "celeb-dev")
    parser.add_argument("--holdout", type=int, default=4, help="people held out for scoring (default 4)")
    parser.add_argument("--holdout-images", type=int, default=100, help="images per held-out person (default 100)")
    parser.add_argument("--fleets", type=int, nargs="+", default=[100, 1000], help="fleet sizes N (default 100 1000)")
    parser.add_argument("--images-per-device", type=int, default=2, help="images of each person on a device")
    parser.add_argument("--people-per-device", type=int, default=1,
                        help="people on each device (default 1: a phone and its owner)")
    parser.add_argument("--noise", type=float, nargs="*", default=[0.5, 1.0],
                        help="noise multipliers z of the DP runs (default 0.5 1.0)")
    parser.add_argument("--clip", type=float, default=None, help="L2 clip C (default: median first-round norm)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20,
                        help="devices sampled per round (fraction_fit = per_round / N, default 20)")
    parser.add_argument("--delta", type=float, default=1e-4, help="delta of epsilon (default 1e-4, <= 1/N here)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--negative-anchors", type=int, default=64)
    parser.add_argument("--margin", type=float, default=0.5, help="ArcFace margin of the device heads (radians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def fleet_datasets(train: FaceDataset, size: int, per_device: int, people_per_device: int,
                   seed: int) -> list[FaceDataset]:
    """`size` devices' images, each `per_device` images of each of its `people_per_device` people, dealt
    greedily from the people with the most images left."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(train.labels == label))) for label in range(train.num_classes)]
    fleet = []
    for _ in range(size):
        # the people with the most images left, so that unequal people still fill the fleet
        people = sorted(range(len(pools)), key=lambda p: -len(pools[p]))[:people_per_device]
        if any(len(pools[p]) < per_device for p in people):
            raise SystemExit(f"not enough images for {size} devices of {per_device}; lower --images-per-device")
        idx = [pools[p].pop() for p in people for _ in range(per_device)]
        fleet.append(FaceDataset(train.images[idx], np.repeat(np.arange(people_per_device), per_device),
                                 [train.identities[p] for p in people]))
    return fleet


class HeldOutScore:
    """The engine's evaluation: held-out scores of each global model from the held-out people's trunk features
    (computed once), and how far the model moved from version 0 (L2), noise included."""

    def __init__(self, holdout: FaceDataset) -> None:
        self.backbone = build_backbone("faceapi-resnet", trainable="projection")
        self.start = shared_tensors(self.backbone)
        self.features = trunk_features(self.backbone, holdout.images)
        self.labels = holdout.labels
        self.bar = None

    def __call__(self, round_number: int, tensors) -> dict[str, float]:
        load_shared_tensors(self.backbone, tensors)
        with torch.no_grad():
            report = evaluate_embeddings(self.backbone.forward_tail(self.features).numpy(), self.labels)
        if round_number and self.bar is not None:
            self.bar.update()
        return {"accuracy": report["accuracy"], "tar_at_far_1e-3": report["tar_at_far"]["1e-3"],
                "eer": report["eer"], "moved": l2_norm(delta_of(tensors, self.start))}


def federate(fleet: list[FaceDataset], score: HeldOutScore, args, dp: dict | None, desc: str):
    """`args.rounds` rounds over `fleet` on the round engine: (the engine, the first round's update norms)."""
    fraction_fit = min(1.0, args.per_round / len(fleet))
    with tempfile.TemporaryDirectory(prefix="dp-utility-") as tmp:
        config = parse_config(AggregatorConfig, {
            "state_dir": str(Path(tmp) / "aggregator"), "rounds": args.rounds,
            "min_clients": min(args.per_round, len(fleet)), "fraction_fit": fraction_fit, "seed": args.seed,
            "model": {"arch": "faceapi-resnet", "options": {"trainable": "projection"}},
            "train": {"local_epochs": args.local_epochs, "lr": args.lr, "margin": args.margin,
                      "negative_anchors": args.negative_anchors, "anchor_seed": args.seed},
            **({"dp": dp} if dp else {})})
        devices = [Device(f"device-{k:04d}", LocalTrainer(data, Path(tmp) / f"device-{k:04d}", len(data), False,
                                                         args.seed * 100_003 + 1000 * k), unload=True)
                   for k, data in enumerate(fleet)]
        with tqdm(total=args.rounds, desc=desc, unit="round", leave=False) as score.bar:
            engine = run_inprocess(config, devices, InProcessModels(config, score.start, score),
                                   dp_rng=np.random.default_rng(args.seed))
    first = set(engine.publisher.announcements[0].participants or [d.device_id for d in devices])
    return engine, [d.update_norms[0] for d in devices if d.device_id in first]


def final_row(fleet: int, run: str, engine, seconds: float, **extra) -> dict:
    """The final model's held-out scores and epsilon, as the engine's last round summary reports them."""
    metrics = engine.publisher.summaries[-1].metrics
    return {"fleet": fleet, "run": run, "epsilon": metrics.get("epsilon", float("inf")), **extra,
            **{k: metrics[k] for k in ("accuracy", "tar_at_far_1e-3", "eer", "moved")}, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    dataset = load_dataset(args.celeb)
    train_idx, holdout_idx = split_holdout(dataset.labels, args.holdout, args.seed)
    train = dataset.subset(train_idx)
    holdout = dataset.subset(holdout_idx).first_per_identity(args.holdout_images)
    score = HeldOutScore(holdout)
    fleet = fleet_datasets(train, max(args.fleets), args.images_per_device, args.people_per_device, args.seed)
    print(f"celeb-dev: {train.num_classes} people in training, {len(holdout.identities)} held out "
          f"({len(holdout)} images); {len(fleet)} devices of {len(fleet[0])} images")
    rows = [{"fleet": 0, "run": "pretrained (version 0)", "z": None, "epsilon": 0.0,
             **score(0, score.start), "seconds": 0.0}]
    for size in args.fleets:
        t = time.time()
        engine, norms = federate(fleet[:size], score, args, None, f"N={size} no DP")
        rows.append(final_row(size, "FedAvg, no DP", engine, time.time() - t, z=None))
        clip = args.clip if args.clip is not None else float(np.median(norms))
        for z in args.noise:
            t = time.time()
            dp = {"noise_multiplier": z, "clip": clip, "delta": args.delta}
            engine, _ = federate(fleet[:size], score, args, dp, f"N={size} z={z}")
            rows.append(final_row(size, f"DP-FedAvg C={clip:.3g}", engine, time.time() - t, z=z, clip=clip))
    print(f"\n{args.rounds} rounds, {args.per_round} devices per round, {args.local_epochs} local epochs, "
          f"{args.images_per_device} images per device, delta {args.delta:g}; total {time.time() - started:.0f} s\n")
    print("| N | run | z | epsilon | held-out accuracy | TAR@FAR=1e-3 | EER | moved from v0 (L2) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        z = "-" if row["z"] is None else f"{row['z']:g}"
        eps = "∞" if row["epsilon"] == float("inf") else f"{row['epsilon']:.2f}"
        print(f"| {row['fleet'] or '-'} | {row['run']} | {z} | {eps} | {row['accuracy']:.4f} | "
              f"{row['tar_at_far_1e-3']:.4f} | {row['eer']:.4f} | {row['moved']:.4g} | {row['seconds']:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
