"""Distilling the pretrained face-api descriptor into MobileFaceNet: held-out verification of teacher and students.

celeb-dev is split by identity exactly as `facefed simulate --holdout 4 --seed 0` (and bench.faceapi_finetune)
splits it: the 4 held-out people (Hugh Laurie, Jessica Alba, Keanu Reeves, Leonardo DiCaprio) are never trained
on. From the other 8, the first `--per-identity` images each are the training set of both students, for the same
epochs and batch size, from the same seeded initialisation:
- distilled: MobileFaceNet trained to reproduce the teacher's normalised embedding (model_zoo.distill), no labels;
- from scratch: MobileFaceNet + ArcFace head on the 8 identities' labels (model_zoo.train.train_local, the
  kit's from-scratch defaults: SGD lr 0.05, margin 0.5, augmentation).
The teacher is the face-api descriptor on the same 112x112 ArcFace crops, re-framed into its dlib chip.

Held out: all images of the 4 celeb-dev people, and all of ORL (38 people; 92x112 grey frames turned into
ArcFace crops from the pipeline's 68 landmarks, as bench.faceapi_finetune does). Scores: cosine of embeddings over
all pairs; accuracy is the balanced best-threshold accuracy, EER, TAR at FAR 1e-3, rank-1.

Teacher embeddings (and ORL crops) are cached as safetensors under --cache, keyed by the images' SHA-256.

    python -m bench.distill --json runs/distill.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from facefed.bench_report import run_and_report
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import save_checkpoint
from model_zoo.data import FaceDataset, load_dataset, shared_datasets_root
from model_zoo.distill import (DistillConfig, arcface_crops, cached_teacher_embeddings, centred, distill,
                               images_digest)
from model_zoo.evaluate import verification_row
from model_zoo.losses import ArcFaceHead
from model_zoo.partition import split_holdout
from model_zoo.train import TrainConfig, embed_images, train_local


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = shared_datasets_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeb", type=Path, default=shared / "celeb-dev", help="ArcFace-aligned folder dataset")
    parser.add_argument("--orl", type=Path, default=shared / "orl", help="ORL faces, held out entirely")
    parser.add_argument("--holdout", type=int, default=4, help="celeb-dev identities held out (default 4)")
    parser.add_argument("--per-identity", type=int, default=250,
                        help="first N images of each training identity (default 250: 2,000 images)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="distillation AdamW peak lr (default 2e-3)")
    parser.add_argument("--scratch-lr", type=float, default=0.05, help="from-scratch SGD lr (default 0.05)")
    parser.add_argument("--scratch-margin", type=float, default=0.5, help="from-scratch ArcFace margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-scratch", action="store_true", help="leave out the from-scratch student")
    parser.add_argument("--raw-targets", action="store_true",
                        help="distil towards the raw teacher embeddings, not centred on their training mean")
    parser.add_argument("--cache", type=Path, default=Path("runs/distill_cache"),
                        help="teacher embeddings and ORL crops, safetensors (default runs/distill_cache)")
    parser.add_argument("--out", type=Path, default=None, help="write the students' checkpoints here")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def split(celeb: FaceDataset, holdout: int, per_identity: int, seed: int) -> tuple[FaceDataset, FaceDataset]:
    """(training set: first per_identity images of each non-held-out person, held-out set: all images of the
    held-out people), split as facefed simulate splits."""
    train_idx, held_idx = split_holdout(celeb.labels, holdout, seed)
    return celeb.subset(train_idx).first_per_identity(per_identity), celeb.subset(held_idx)


def orl_crops(orl: FaceDataset, cache: Path) -> np.ndarray:
    """ArcFace crops of the ORL frames from the pipeline's landmarks; cached by the frames' SHA-256."""
    digest = images_digest(orl.images)
    path = cache / "orl-arcface-crops.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("frames_sha256") == digest:
                return f.get_tensor("crops")
    crops = arcface_crops(orl.images)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"crops": np.ascontiguousarray(crops)}, str(path), metadata={"frames_sha256": digest})
    return crops


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    timings = {}
    celeb = load_dataset(args.celeb, layout="folders")
    train, held = split(celeb, args.holdout, args.per_identity, args.seed)
    orl = load_dataset(args.orl)
    print(f"train: {len(train)} images of {', '.join(train.identities)}; held out: {', '.join(held.identities)} "
          f"({len(held)} images) and ORL ({len(orl)} images)", flush=True)

    start = time.perf_counter()
    crops_orl = orl_crops(orl, args.cache)
    teacher = cached_teacher_embeddings(train.images, args.cache / "teacher-celeb-train.safetensors")
    teacher_held = cached_teacher_embeddings(held.images, args.cache / "teacher-celeb-held.safetensors").plain
    teacher_orl = cached_teacher_embeddings(crops_orl, args.cache / "teacher-orl.safetensors").plain
    timings["teacher_and_crops_s"] = time.perf_counter() - start
    print(f"teacher embeddings: {timings['teacher_and_crops_s']:.0f} s (train set from cache: {teacher.from_cache})",
          flush=True)

    rows = [verification_row("teacher: face-api, pretrained", "celeb-dev held out", teacher_held, held.labels),
            verification_row("teacher: face-api, pretrained", "ORL", teacher_orl, orl.labels)]
    students = {}

    torch.manual_seed(args.seed)
    student = build_backbone("mobilefacenet")
    cfg = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        center_targets=not args.raw_targets)
    result = distill(student, train.images, teacher, cfg, progress=True)
    if result.teacher_mean is not None:  # what the student imitates: the teacher centred on the training mean
        rows += [verification_row("teacher, centred (student's target)", "celeb-dev held out",
                                  centred(teacher_held, result.teacher_mean), held.labels),
                 verification_row("teacher, centred (student's target)", "ORL",
                                  centred(teacher_orl, result.teacher_mean), orl.labels)]
    timings["distill_s"] = result.seconds
    print(f"distilled: {result.steps} steps in {result.seconds:.0f} s, loss per epoch "
          f"{', '.join(f'{x:.4f}' for x in result.epoch_losses)}", flush=True)
    students["MobileFaceNet, distilled"] = (student, {"epoch_losses": result.epoch_losses,
                                                      "teacher_mean": result.teacher_mean})

    if not args.skip_scratch:
        torch.manual_seed(args.seed)
        scratch = build_backbone("mobilefacenet")
        head = ArcFaceHead(128, train.num_classes, margin=args.scratch_margin)
        start = time.perf_counter()
        res = train_local(scratch, head, train, TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                            lr=args.scratch_lr, seed=args.seed), progress=True)
        timings["scratch_s"] = time.perf_counter() - start
        print(f"from scratch: {timings['scratch_s']:.0f} s, last-epoch loss {res.loss:.3f}, train acc "
              f"{res.accuracy:.3f}", flush=True)
        students["MobileFaceNet, from scratch"] = (scratch.eval(), {"loss": res.loss, "train_accuracy": res.accuracy})

    for name, (net, info) in students.items():
        for data, images, labels, target in (("celeb-dev held out", held.images, held.labels, teacher_held),
                                             ("ORL", crops_orl, orl.labels, teacher_orl)):
            embeddings = embed_images(net, images)
            row = verification_row(name, data, embeddings, labels)
            unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
            target = centred(target, result.teacher_mean) if "distilled" in name else target
            row["mean_cosine_to_teacher"] = float((unit * target).sum(axis=1).mean())
            rows.append(row)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / ("distilled.safetensors" if "distilled" in name else "scratch.safetensors")
            save_checkpoint(path, net, {"model": name, "train_images": len(train), "epochs": args.epochs,
                                        "held_out_identities": held.identities, **info})
            print(f"wrote {path}", flush=True)

    return {"celeb": str(args.celeb), "orl": str(args.orl), "train_identities": train.identities,
            "held_out_identities": held.identities, "train_images": len(train), "per_identity": args.per_identity,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "scratch_lr": args.scratch_lr,
            "scratch_margin": args.scratch_margin, "seed": args.seed, "torch_threads": torch.get_num_threads(),
            "center_targets": not args.raw_targets, "distill_epoch_losses": result.epoch_losses,
            "timings": timings, "verification": rows}


def print_tables(results: dict) -> None:
    print(f"\ntrain: {results['train_images']} images of {len(results['train_identities'])} people, "
          f"{results['epochs']} epochs; held out: {', '.join(results['held_out_identities'])} and ORL")
    print(f"{'model':36} {'data':19} {'images':>6} {'accuracy':>8} {'EER':>7} {'TAR@1e-3':>8} {'rank-1':>7} "
          f"{'cos to teacher':>14}")
    for row in results["verification"]:
        cos = row.get("mean_cosine_to_teacher")
        print(f"{row['model']:36} {row['data']:19} {row['images']:6d} {100 * row['accuracy']:7.2f}% "
              f"{100 * row['eer']:6.2f}% {100 * row['tar_at_far_1e-3']:7.2f}% {100 * row['rank1']:6.2f}% "
              f"{'-' if cos is None else f'{cos:.3f}':>14}")


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run, print_tables)


if __name__ == "__main__":
    main()
