"""Privacy/utility curve of DP-FedAvg: held-out accuracy and TAR@FAR=1e-3 against epsilon, for fleets of N devices
holding one person each, against the same run without DP, in one invocation.

Setup. celeb-dev split by identity: `--holdout` people are never trained on and are what every model is scored
on; the other people's images are dealt out `--images-per-device` at a time, one person per device, so the
N = 100 fleet is the first 100 devices of the N = 1,000 one. The model is the pretrained face-api ResNet with
only its 256 -> 128 projection trained (32,768 parameters); the frozen trunk's features are computed once per
image and cached, as devices do (model_zoo.train.TrunkFeatureCache). Each device trains with the kit's
train_local: its own head, one imprinted class plus `--negative-anchors` fixed random negatives (the kit's
single-identity remedy), `--local-epochs` local epochs. Each round samples `--per-round` devices (fraction_fit = per_round / N, which the accountant
amplifies by): the same noise per round at every N, so a larger fleet spends less epsilon for it.

Aggregation is the aggregator's own code, in this process: aggregator.strategies.FedAvg, wrapped for DP by
aggregator.dp.DpStrategy (central mode: clip each update to C, N(0, (z C)^2) on the sum, uniform weights), and
epsilon from aggregator.dp.epsilon_after (dp-accounting's RDP accountant with Poisson sampling at fraction_fit).
The non-private run is plain FedAvg with the same devices, sampling and seeds. C defaults to the median
update norm of the non-private run's first round (`--clip` overrides it).

    python -m bench.dp_utility                       # N = 100 and 1,000, noise multipliers 0.5 and 1.0
    python -m bench.dp_utility --fleets 1000 --noise 1.0 --rounds 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aggregator.config import DpConfig
from aggregator.dp import DpStrategy, epsilon_after
from aggregator.strategies import FedAvg
from fedwire.dp import delta_of, l2_norm, secure_generator
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_shared_tensors, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, shared_datasets_root
from model_zoo.evaluate import evaluate_embeddings
from model_zoo.losses import AnchoredArcFaceHead, negative_anchors
from model_zoo.partition import split_holdout
from model_zoo.train import TrainConfig, TrunkFeatureCache, TrunkFeatures, imprint_head, train_local, trunk_features


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


class PrecomputedTrunk(TrunkFeatureCache):
    """A device's trunk features, computed for the whole fleet in one batched pass (what each device's own cache
    would hold after its first round; batching only saves this benchmark's time)."""

    def __init__(self, features: TrunkFeatures) -> None:
        super().__init__()
        self.features = features

    def get(self, backbone, images, mirrored):
        return self.features, 0.0


@dataclass
class Device:
    data: FaceDataset
    cache: PrecomputedTrunk
    head: AnchoredArcFaceHead


def build_fleet(backbone, train: FaceDataset, size: int, per_device: int, people_per_device: int, anchors: int,
                margin: float, seed: int) -> list[Device]:
    """`size` devices, each holding `per_device` images of each of its `people_per_device` people, dealt
    greedily from the people with the most images left."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(train.labels == label))) for label in range(train.num_classes)]
    chosen, labels = [], []
    for k in range(size):
        # the people with the most images left, so that unequal people still fill the fleet
        people = sorted(range(len(pools)), key=lambda p: -len(pools[p]))[:people_per_device]
        if any(len(pools[p]) < per_device for p in people):
            raise SystemExit(f"not enough images for {size} devices of {per_device}; lower --images-per-device")
        chosen.append([pools[p].pop() for p in people for _ in range(per_device)])
        labels.append(np.repeat(np.arange(people_per_device), per_device))
    flat = np.concatenate(chosen)
    features = torch.cat([trunk_features(backbone, train.images[flat[i:i + 256]])
                          for i in tqdm(range(0, len(flat), 256), desc="trunk features", unit="batch", leave=False)])
    devices, n = [], per_device * people_per_device
    for k, idx in enumerate(chosen):
        data = FaceDataset(train.images[idx], labels[k], [train.identities[train.labels[i]] for i in idx[::per_device]])
        own = TrunkFeatures(backbone.trunk, data.images, features[k * n:(k + 1) * n], None)
        head = AnchoredArcFaceHead(128, people_per_device, negative_anchors(anchors, 128, seed), margin=margin)
        with torch.no_grad():
            imprint_head(head, backbone.forward_tail(own.plain).numpy(), data.labels)
        devices.append(Device(data, PrecomputedTrunk(own), head))
    return devices


def score(backbone, tensors, start, holdout_features: torch.Tensor, labels: np.ndarray) -> dict:
    """Held-out scores, and how far the model moved from version 0 (L2), noise included."""
    load_shared_tensors(backbone, tensors)
    with torch.no_grad():
        report = evaluate_embeddings(backbone.forward_tail(holdout_features).numpy(), labels)
    return {"accuracy": report["accuracy"], "tar_at_far_1e-3": report["tar_at_far"]["1e-3"], "eer": report["eer"],
            "moved": l2_norm(delta_of(tensors, start))}


def federate(backbone, devices: list[Device], strategy, start, args, seed: int, desc: str) -> tuple[dict, list]:
    """`args.rounds` rounds; returns the final tensors and the update norms of round 1."""
    rng = np.random.default_rng(seed)
    tensors, first_norms = dict(start), []
    per_round = min(args.per_round, len(devices))
    for r in tqdm(range(1, args.rounds + 1), desc=desc, unit="round", leave=False):
        strategy.begin_round(tensors)
        for k in rng.choice(len(devices), size=per_round, replace=False):
            device = devices[k]
            load_shared_tensors(backbone, tensors)
            cfg = TrainConfig(epochs=args.local_epochs, batch_size=len(device.data), lr=args.lr,
                              augment=False, seed=seed * 100_003 + r * 1009 + int(k))
            train_local(backbone, device.head, device.data, cfg, trunk_cache=device.cache)
            update = shared_tensors(backbone)
            if r == 1:
                first_norms.append(l2_norm(delta_of(update, tensors)))
            strategy.accumulate(update, len(device.data))
        tensors = strategy.aggregate()
    return tensors, first_norms


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    dataset = load_dataset(args.celeb)
    train_idx, holdout_idx = split_holdout(dataset.labels, args.holdout, args.seed)
    train = dataset.subset(train_idx)
    holdout = dataset.subset(holdout_idx).first_per_identity(args.holdout_images)
    backbone = build_backbone("faceapi-resnet", trainable="projection")
    start = shared_tensors(backbone)
    holdout_features = trunk_features(backbone, holdout.images)
    fleet = build_fleet(backbone, train, max(args.fleets), args.images_per_device, args.people_per_device,
                        args.negative_anchors, args.margin, args.seed)
    print(f"celeb-dev: {train.num_classes} people in training, {len(holdout.identities)} held out "
          f"({len(holdout)} images); features of {sum(len(d.data) for d in fleet) + len(holdout)} images "
          f"in {time.time() - started:.0f} s")
    pretrained = score(backbone, start, start, holdout_features, holdout.labels)
    rows = [{"fleet": 0, "run": "pretrained (version 0)", "z": None, "epsilon": 0.0, **pretrained, "seconds": 0.0}]
    for size in args.fleets:
        devices = fleet[:size]
        fraction_fit = min(1.0, args.per_round / size)
        t = time.time()
        plain, norms = federate(backbone, devices, FedAvg(), start, args, args.seed, f"N={size} no DP")
        rows.append({"fleet": size, "run": "FedAvg, no DP", "z": None, "epsilon": float("inf"),
                     **score(backbone, plain, start, holdout_features, holdout.labels), "seconds": time.time() - t})
        clip = args.clip if args.clip is not None else float(np.median(norms))
        for z in args.noise:
            t = time.time()
            dp = DpConfig(noise_multiplier=z, clip=clip, delta=args.delta)
            strategy = DpStrategy(FedAvg(), dp, fraction_fit, rng=secure_generator(args.seed))
            tensors, _ = federate(backbone, devices, strategy, start, args, args.seed, f"N={size} z={z}")
            rows.append({"fleet": size, "run": f"DP-FedAvg C={clip:.3g}", "z": z,
                         "clip": clip, "epsilon": epsilon_after(args.rounds, z, fraction_fit, args.delta),
                         **score(backbone, tensors, start, holdout_features, holdout.labels), "seconds": time.time() - t})
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
