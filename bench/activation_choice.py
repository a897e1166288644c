"""ReLU vs PReLU for MobileFaceNet: CPU cost per epoch and held-out verification on ORL.

Run from the repository root:  python -m bench.activation_choice [--epochs 10] [--seeds 0 1]
Timing: one thread (torch.set_num_threads(1)), 90 ORL images (9 identities), mean over epochs after the first;
wall seconds and process CPU seconds (the latter is robust to other processes competing for the cores).
Quality: 28 ORL identities pooled for training, 10 other identities held out for verification (all pairs).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model_zoo.backbones import build_backbone
from model_zoo.data import FaceDataset, default_data_root, load_dataset
from model_zoo.evaluate import evaluate_backbone
from model_zoo.losses import ArcFaceHead
from model_zoo.partition import split_holdout
from model_zoo.train import TrainConfig, train_local

ACTS = ("relu", "prelu")


def seconds_per_epoch(act: str, dataset: FaceDataset, epochs: int = 4) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch, skipping the first epoch, which pays one-off kernel setup."""
    torch.manual_seed(0)
    backbone, head = build_backbone(act=act), ArcFaceHead(128, dataset.num_classes)
    wall, cpu = [], []
    for epoch in range(epochs):
        cpu_start = time.process_time()
        wall.append(train_local(backbone, head, dataset, TrainConfig(epochs=1, seed=epoch)).seconds)
        cpu.append(time.process_time() - cpu_start)
    return float(np.mean(wall[1:])), float(np.mean(cpu[1:]))


def heldout_quality(act: str, train: FaceDataset, heldout: FaceDataset, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    backbone, head = build_backbone(act=act), ArcFaceHead(128, train.num_classes)
    result = train_local(backbone, head, train, TrainConfig(epochs=epochs, seed=seed))
    return {"train_loss": result.loss, "train_s": result.seconds, **evaluate_backbone(backbone, heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs for the held-out comparison")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed and act")
    parser.add_argument("--data", default=None, help="ORL folder (default: model_zoo.data.default_data_root())")
    args = parser.parse_args()
    root = args.data or default_data_root()
    if root is None:
        parser.error("ORL not found: pass --data or set FACEFED_DATA")
    orl = load_dataset(root)
    threads = torch.get_num_threads()

    torch.set_num_threads(1)
    timing_set = orl.subset(np.flatnonzero(orl.labels < 9))
    cost = {act: seconds_per_epoch(act, timing_set) for act in ACTS}
    torch.set_num_threads(threads)

    train_idx, heldout_idx = split_holdout(orl.labels, num_holdout=10, seed=0)
    train, heldout = orl.subset(train_idx), orl.subset(heldout_idx)
    print(f"ORL: {train.num_classes} ids ({len(train)} images) train, {heldout.num_classes} ids "
          f"({len(heldout)} images) held out; {args.epochs} epochs, {threads} threads for training")
    print(f"{'act':6} {'params':>9} {'wall s/ep':>9} {'cpu s/ep':>8} {'seed':>4} {'loss':>7} {'train_s':>7} "
          f"{'ver_acc':>7} {'eer':>6} {'tar@1e-2':>8} {'rank1':>6}")
    for act in ACTS:
        params = sum(p.numel() for p in build_backbone(act=act).parameters())
        for seed in args.seeds:
            q = heldout_quality(act, train, heldout, args.epochs, seed)
            print(f"{act:6} {params:>9,} {cost[act][0]:>9.2f} {cost[act][1]:>8.2f} {seed:>4} {q['train_loss']:>7.3f} {q['train_s']:>7.1f} "
                  f"{q['accuracy']:>7.3f} {q['eer']:>6.3f} {q['tar_at_far']['1e-2']:>8.3f} {q['rank1']:>6.3f}")


if __name__ == "__main__":
    main()
