"""Camera domain (issue 16): how well a device measures its own camera (model_zoo.camera_measure).

Each device of the camera experiment's fleet (facefed.camera_experiment.build_fleet: cameras drawn around the
domain, the owner's training frames and clean enrolment photos) measures its camera from those frames and
photos alone; the bench prints, per device, the camera it was given and the one it measured, then the errors
over all devices: grey right, and mean, RMS and largest error of gamma, face size (px) and noise (/255).

    python -m bench.camera_measure                          # camera-quick fleets, seeds 0 1 2; ~1 min a seed
    python -m bench.camera_measure --camera door-night --seeds 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from facefed.camera_experiment import PRESETS, build_fleet, preset_config
from model_zoo.camera_measure import measure_camera

FIELDS = ("gamma", "face_px", "noise")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="camera-quick", choices=sorted(PRESETS))
    parser.add_argument("--camera", default="corridor", help="the fleet's domain, with overrides (as --camera)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grey_right, errors, seconds = [], [], []
    with tempfile.TemporaryDirectory(prefix="camera-measure-") as tmp:
        for seed in args.seeds:
            cfg = preset_config(args.preset, Path(tmp) / str(seed), seed=seed, camera=args.camera)
            for i, device in enumerate(build_fleet(cfg, say=lambda line: None).devices):
                start = time.process_time()
                measured = measure_camera(device.data.frames, device.data.enrolment)
                seconds.append(time.process_time() - start)
                grey_right.append(measured.grey == device.camera.grey)
                errors.append([getattr(measured, f) - getattr(device.camera, f) for f in FIELDS])
                print(f"seed {seed} device {i}: given {device.camera.describe()}; measured {measured.describe()}",
                      flush=True)
    errors = np.array(errors, float)
    print(f"\n{len(errors)} devices ({args.preset}, {args.camera}, seeds {' '.join(map(str, args.seeds))}): "
          f"grey right on {sum(grey_right)}; {np.mean(seconds):.1f} CPU s a device")
    for f, column in zip(FIELDS, errors.T):
        print(f"  {f}: error mean {column.mean():+.2f}, RMS {np.sqrt((column ** 2).mean()):.2f}, "
              f"largest {np.abs(column).max():.2f}")


if __name__ == "__main__":
    main()
