"""Inversion audit: what one device's update leaks about its faces, without and with differential privacy.

Attack: Geiping et al., "Inverting Gradients - How easy is it to break privacy in federated learning?"
(NeurIPS 2020). The attacker holds the global model the device started from and the device's update, and
optimises dummy images so that their gradient points the way the update does: loss = 1 - cosine(gradient of
the dummies, observed update) + tv_weight * total variation, Adam with a step decay, pixels kept in [0, 1].
It is given more than a real attacker has (an upper bound on the leak): the device's labels, its ArcFace head
(which never leaves a device in the kit) and its batch size.

Target: a from-scratch MobileFaceNet (model_zoo, seeded init), one device holding `--batch` celeb-dev faces
of different people. Scenarios:
- one step: a single SGD step on the batch (the update is then -lr * the gradient, Geiping's easiest case);
- kit training: the kit's own local training (model_zoo.train.train_local: `--local-epochs` epochs over
  `--device-images` images of the same people, batch `--batch`, augmentation on), the whole update inverted as
  if it were one gradient of the batch;
- each of those with DP as the aggregator sees the update in distributed mode (clipped to C, plus this device's
  noise share N(0, (z C)^2 / m), fedwire.dp.privatize_update), C the update's own norm / 2 so that clipping bites.

Score of each reconstruction: SSIM against the original (skimage, on grey), and whether the pretrained face-api
descriptor matches it to the true person at the unlock threshold (cosine >= edge_agent's PRETRAINED_THRESHOLDS
to the person's template: the normalised mean of `--enrol` other images, as `facefed-agent enroll` builds it).
Writes a PNG: originals on top, one row of reconstructions per scenario. Each row also reports the gradient
cosine the attack reached, and a landscape probe: the attack's similarity at the true faces plus pixel noise,
which says whether there is a basin to descend into (BENCHMARKS.md, "Inversion audit").

    python -m bench.inversion_audit --png runs/inversion.png        # defaults (300 iterations at 28x28): ~10 min
    python -m bench.inversion_audit --iterations 2000 --resolution 112 --threads 1 --png DIR/audit.png  # ~54 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from tqdm import tqdm

from edge_agent.unlock.commands import PRETRAINED_THRESHOLDS
from fedwire.dp import delta_of, device_noise_std, l2_norm, privatize_update, secure_generator
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_shared_tensors, shared_tensors
from model_zoo.data import FaceDataset, load_dataset, normalize_pixels, shared_datasets_root
from model_zoo.losses import ArcFaceHead
from model_zoo.train import TrainConfig, embed_images, train_local


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeb", type=Path, default=shared_datasets_root() / "celeb-dev")
    parser.add_argument("--batch", type=int, default=2, help="faces in the device's batch, one person each")
    parser.add_argument("--device-images", type=int, default=8, help="kit training: images per person on the device")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05, help="the device's SGD learning rate (kit default)")
    parser.add_argument("--iterations", type=int, default=300, help="attack iterations per scenario")
    parser.add_argument("--attack-lr", type=float, default=0.1)
    parser.add_argument("--resolution", type=int, default=28, help="side of the searched image (112: full)")
    parser.add_argument("--scenarios", nargs="+", choices=["one-step", "kit"], default=["one-step", "kit"],
                        help="which updates to invert (each also with DP)")
    parser.add_argument("--tv-weight", type=float, default=1e-2)
    parser.add_argument("--signed", action=argparse.BooleanOptionalAction, default=False,
                        help="step on the sign of the pixels' gradient (an option of Geiping et al.'s; default raw)")
    parser.add_argument("--probe-noise", type=float, nargs="*", default=[1.0, 2.0, 5.0, 20.0],
                        help="landscape probe: pixel noise levels (of 255) around the true faces")
    parser.add_argument("--noise", type=float, default=1.0, help="DP noise multiplier z")
    parser.add_argument("--shares", type=int, default=100, help="DP: devices splitting the noise (m)")
    parser.add_argument("--enrol", type=int, default=5, help="images in each person's template")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--png", type=Path, default=Path("runs/inversion_audit.png"))
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def pick_people(dataset: FaceDataset, count: int, per_person: int, rng) -> list[np.ndarray]:
    """Image indices of `count` people, `per_person` each (shuffled, seeded)."""
    people = rng.choice(dataset.num_classes, size=count, replace=False)
    return [rng.permutation(np.flatnonzero(dataset.labels == p))[:per_person] for p in people]


def device_loss(backbone, head, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The kit's training loss (model_zoo.train): ArcFace cross-entropy on normalised pixels in [0, 255]."""
    return F.cross_entropy(head(backbone(normalize_pixels(pixels)), labels), labels)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(backbone, head, observed: dict[str, np.ndarray], labels: torch.Tensor, args, desc: str
           ) -> tuple[np.ndarray, float]:
    """Geiping et al.'s cosine attack: (uint8 NHWC reconstructions, the gradient cosine it reached; 1 is a
    perfect match, so a low value says the attack did not fit, a high one with no face says the match is
    not unique)."""
    params, target = gradient_target(backbone, observed)
    gen = torch.Generator().manual_seed(args.seed)
    # Pixels searched at --resolution and upsampled: far fewer unknowns, so a short budget gets further.
    z = torch.rand(len(labels), 3, args.resolution, args.resolution, generator=gen).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=args.attack_lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [int(args.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
    cosine = 0.0
    for _ in tqdm(range(args.iterations), desc=desc, unit="it", leave=False):
        optimizer.zero_grad()
        x = F.interpolate(z, size=(112, 112), mode="bilinear", align_corners=False)
        grads = torch.autograd.grad(device_loss(backbone, head, x * 255.0, labels), params, create_graph=True)
        similarity = cosine_to(grads, target)
        loss = 1 - similarity + args.tv_weight * total_variation(x)
        loss.backward()
        cosine = float(similarity.detach())
        if args.signed:  # an option of Geiping et al.'s: Adam on the sign of the pixels' gradient
            z.grad.sign_()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            z.clamp_(0, 1)
    x = F.interpolate(z.detach(), size=(112, 112), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), cosine


def gradient_target(backbone, observed: dict[str, np.ndarray]) -> tuple[list, list[torch.Tensor]]:
    """(the parameters the update covers, the update's tensors in the same order)."""
    named = [(name, p) for name, p in backbone.named_parameters() if name in observed]
    return [p for _, p in named], [torch.from_numpy(np.asarray(observed[name], np.float32)) for name, _ in named]


def cosine_to(grads, target: list[torch.Tensor]) -> torch.Tensor:
    """The attack's similarity (1 - its loss without TV): cosine of a gradient to the target, over all tensors."""
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norms = torch.sqrt(sum((g * g).sum() for g in grads)) * torch.sqrt(sum((t * t).sum() for t in target))
    return dot / (norms + 1e-12)


def landscape(backbone, head, originals: np.ndarray, observed: dict[str, np.ndarray], labels: torch.Tensor,
              noise: list[float], seed: int) -> dict[str, float]:
    """How wide the attack's basin is: its similarity at the true faces, and at the true faces plus Gaussian
    pixel noise of each level (of 255). Where even small noise scores near 0, descent from a random start has
    no slope to follow."""
    params, target = gradient_target(backbone, observed)
    pixels = torch.from_numpy(originals).permute(0, 3, 1, 2).float()
    gen = torch.Generator().manual_seed(seed)

    def at(x: torch.Tensor) -> float:
        return float(cosine_to(torch.autograd.grad(device_loss(backbone, head, x, labels), params), target))

    out = {"0": at(pixels)}
    for sigma in noise:
        out[f"{sigma:g}"] = at((pixels + sigma * torch.randn(pixels.shape, generator=gen)).clamp(0, 255))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    rng = np.random.default_rng(args.seed)
    dataset = load_dataset(args.celeb)
    per_person = pick_people(dataset, args.batch, 1 + args.device_images + args.enrol, rng)
    batch_idx = np.array([idx[0] for idx in per_person])
    device_idx = np.concatenate([idx[:args.device_images] for idx in per_person])  # the batch images first
    originals = dataset.images[batch_idx]
    labels = torch.arange(args.batch)

    # The pretrained descriptor and each person's template from images the device never trained on.
    descriptor = build_backbone("faceapi-resnet")
    templates = [embed_images(descriptor, dataset.images[idx[-args.enrol:]]) for idx in per_person]
    templates = np.stack([t.mean(0) / np.linalg.norm(t.mean(0)) for t in (t / np.linalg.norm(t, axis=1,
                                                                                            keepdims=True)
                                                                          for t in templates)])

    torch.manual_seed(args.seed)
    backbone = build_backbone("mobilefacenet")
    head = ArcFaceHead(128, args.batch)
    start = shared_tensors(backbone)
    backbone.train()  # BatchNorm on batch statistics, as the device trains (and the attacker imitates)

    # Scenario 1: one SGD step on the batch.
    load_shared_tensors(backbone, start)
    pixels = torch.from_numpy(originals).permute(0, 3, 1, 2).float()
    grads = torch.autograd.grad(device_loss(backbone, head, pixels, labels), list(backbone.parameters()))
    names = [n for n, _ in backbone.named_parameters()]
    one_step = {n: (start[n] - args.lr * g.numpy()).astype(np.float32) for n, g in zip(names, grads)}
    # Scenario 2: the kit's local training over the device's images.
    load_shared_tensors(backbone, start)
    device_data = FaceDataset(dataset.images[device_idx], np.repeat(np.arange(args.batch), args.device_images),
                              [str(i) for i in range(args.batch)])
    kit_head = ArcFaceHead(128, args.batch)
    kit_head.load_state_dict(head.state_dict())
    train_local(backbone, kit_head, device_data, TrainConfig(epochs=args.local_epochs, batch_size=args.batch,
                                                             lr=args.lr, seed=args.seed))
    kit = shared_tensors(backbone)

    scenarios = []
    for name, update in (("one step", one_step), ("kit training", kit)):
        if name.replace(" training", "").replace(" ", "-") not in args.scenarios:
            continue
        scenarios.append((name, update))
        clip = l2_norm(delta_of(update, start)) / 2
        noised = privatize_update(update, start, clip, device_noise_std(clip, args.noise, args.shares),
                                  secure_generator(args.seed))
        scenarios.append((f"{name} + DP (C={clip:.3g}, z={args.noise:g}, m={args.shares})", noised))

    rows, recons = [], []
    for name, update in scenarios:
        load_shared_tensors(backbone, start)
        backbone.train()
        # The attacker inverts the direction the update moved the weights: -(update - start) ~ the gradient.
        direction = {n: -(np.asarray(update[n], np.float64) - start[n]) for n in names}
        probe = landscape(backbone, head, originals, direction, labels, args.probe_noise, args.seed)
        t = time.time()
        recon, cosine = invert(backbone, head, direction, labels, args, name)
        seconds = time.time() - t
        emb = embed_images(descriptor, recon)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        cos_true = (emb * templates).sum(1)
        ssim = [structural_similarity(np.asarray(o, np.float64).mean(2), np.asarray(r, np.float64).mean(2),
                                      data_range=255.0) for o, r in zip(originals, recon)]
        rows.append({"scenario": name, "ssim": [round(s, 4) for s in ssim], "cosine_to_true": cos_true.round(4).tolist(),
                     "matched": int((cos_true >= PRETRAINED_THRESHOLDS["cosine"]).sum()), "faces": args.batch,
                     "gradient_cosine": round(cosine, 4), "landscape": {k: round(v, 4) for k, v in probe.items()},
                     "seconds": round(seconds, 1)})
        recons.append(recon)

    # Reference: how the descriptor scores the originals themselves against the templates.
    emb = embed_images(descriptor, originals)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    original_cos = (emb * templates).sum(1)
    print(f"\n{args.batch} faces, MobileFaceNet from scratch, {args.iterations} attack iterations per scenario, "
          f"unlock threshold {PRETRAINED_THRESHOLDS['cosine']}; total {time.time() - started:.0f} s")
    print(f"originals' cosine to their own template: {', '.join(f'{c:.3f}' for c in original_cos)}\n")
    print("| scenario | gradient cosine reached | SSIM per face | cosine to the true person's template | "
          "matched at the unlock threshold | attack s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scenario']} | {row['gradient_cosine']:.3f} | {', '.join(f'{s:.3f}' for s in row['ssim'])} | "
              f"{', '.join(f'{c:.3f}' for c in row['cosine_to_true'])} | {row['matched']} of {row['faces']} | "
              f"{row['seconds']:.0f} |")
    print("\nThe attack's similarity around the true faces (pixel noise of 255; 1 = a perfect match):\n")
    print("| scenario | " + " | ".join(f"noise {k}" for k in rows[0]["landscape"]) + " |")
    print("|---|" + "---|" * len(rows[0]["landscape"]))
    for row in rows:
        print(f"| {row['scenario']} | " + " | ".join(f"{v:.3f}" for v in row["landscape"].values()) + " |")
    write_png(args.png, originals, recons, [r["scenario"] for r in rows])
    print(f"\nreconstructions: {args.png}")
    if args.json is not None:
        args.json.write_text(json.dumps({"original_cosine": original_cos.tolist(), "rows": rows}, indent=1))


def write_png(path: Path, originals: np.ndarray, recons: list[np.ndarray], titles: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = 1 + len(recons), len(originals)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 2.5, 2.2 * rows), squeeze=False)
    for r, (images, title) in enumerate(zip([originals, *recons], ["original", *titles])):
        for c in range(cols):
            axes[r][c].imshow(images[c])
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
