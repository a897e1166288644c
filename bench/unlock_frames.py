"""Camera domain (issue 16): which of its owner's camera frames a device gets to train on.

A successful unlock keeps the frames version 0 already accepts (FAR 1e-3): the easy ones. A PIN or passcode
fallback right after a rejected attempt confirms the owner, and the session keeps that attempt's near misses:
single faces scoring at most a margin below the threshold (edge_agent.unlock.session.FALLBACK_MARGINS). On the
camera experiment's fleet (every device's training frames of its owner, and the off-device people through
each device's camera as strangers), for each score unlock can run (cosine to the normalised mean template,
the pretrained descriptor's unlock default; raw L2 to the mean descriptor), the bench prints the threshold at
FAR 1e-3 on the strangers' frames, the training frames each device's unlocks keep, and for each margin the
share of the owner's rejected frames a fallback would keep against the share of strangers' frames that
would be near misses (what a stranger's failed attempt just before the owner's PIN could leave).

    python -m bench.unlock_frames                  # camera-quick fleets, seeds 0 1 2; ~1 min a seed
    python -m bench.unlock_frames --seeds 0 --camera door-night
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge_agent.unlock.calibration import mean_template
from facefed.camera_experiment import PRESETS, build_fleet, preset_config
from model_zoo.camera_adapt import build_model, embed
from model_zoo.metrics import score_matrix

MARGINS = {"cosine": (0.01, 0.02, 0.03, 0.05), "l2": (0.04, 0.07, 0.11, 0.18)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="camera-quick", choices=sorted(PRESETS))
    parser.add_argument("--camera", default="corridor", help="the fleet's domain, with overrides (as --camera)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser.parse_args(argv)


def frame_scores(fleet, model, score: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(each device's training-frame scores against its owner's template, every stranger frame's score)."""
    owners, strangers = [], []
    for device in fleet.devices:
        template = mean_template(embed(model, device.data.enrolment), score)[None]
        owners.append(score_matrix(template, embed(model, device.data.frames), score)[:, 0])
        strangers.append(score_matrix(template, embed(model, device.impostor_frames), score)[:, 0])
    return owners, np.concatenate(strangers)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = build_model()
    with tempfile.TemporaryDirectory(prefix="unlock-frames-") as tmp:
        for seed in args.seeds:
            cfg = preset_config(args.preset, Path(tmp) / str(seed), seed=seed, camera=args.camera)
            fleet = build_fleet(cfg, say=lambda line: None)
            for score, margins in MARGINS.items():
                owners, strangers = frame_scores(fleet, model, score)
                threshold = np.sort(strangers)[::-1][int(np.floor(1e-3 * len(strangers)))]  # accepts above
                kept = [int((o > threshold).sum()) for o in owners]
                rejected = np.concatenate([o[o <= threshold] for o in owners])
                shares = ", ".join(f"{m:g}: owner {np.mean(rejected > threshold - m):.0%} / strangers "
                                   f"{np.mean(strangers > threshold - m):.1%}" for m in margins)
                print(f"seed {seed} {score}: threshold {threshold:.3f}; unlocks keep {sum(kept)} of "
                      f"{sum(len(o) for o in owners)} frames ({min(kept)}-{max(kept)} a device); near misses at "
                      f"margin {shares}", flush=True)


if __name__ == "__main__":
    main()
