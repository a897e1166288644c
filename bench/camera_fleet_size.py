"""Camera domain (issue 16): how the federated shared part carries to people on no device as the fleet grows.

The question: a device adapts to its own owner, but what does the part the federation averages (per-channel
scale/shift through the net) do for someone who never was on a device, in those cameras? This bench runs the
camera experiment (facefed.camera_experiment, the library's own fleet, trainer, arms and scoring) at several
fleet sizes and reports unseen-people camera EER (and TAR@FAR=1e-3) for version 0 and FedAvg of the shared
part, beside the owners' figures.

Pool: celeb-dev (12 people), ORL (40) and Yale (15), ArcFace-aligned as the experiment aligns them. Fixed at
every size (seeded): the 3 off-device people (celeb-dev: only they have the photos the unseen probes need) and
the public bank (`--bank-people` ORL and Yale people, `--bank-per-identity` photos each, never on a device).
A fleet of N people holds the 3 off-device people, the other 9 celeb-dev people, then ORL and Yale people in a
seeded order up to N; every person on a device owns one. ORL and Yale people have 10-11 photos: their camera
frames are re-captured from the few photos they have (`reuse_photos`), so their frames vary by camera draw and
little by pose; read the larger fleets with that in mind.

    python -m bench.camera_fleet_size --out runs/fleet-size          # 12, 24 and all 55 people, quick settings
    python -m bench.camera_fleet_size --sizes 12 24 --out DIR        # a shorter look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from facefed.camera_experiment import PRESETS, aligned_crops, preset_config, run_camera_experiment
from model_zoo.data import load_datasets, save_folders, shared_datasets_root

ARMS = ("version0", "fedavg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = shared_datasets_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeb", type=Path, default=root / "celeb-dev")
    parser.add_argument("--more", type=Path, nargs="+", default=[root / "orl", root / "yale"],
                        help="datasets whose people join the fleet after celeb-dev's (default: ORL, Yale)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 24, 0],
                        help="people in the fleet, off-device people included (0: everyone not in the bank)")
    parser.add_argument("--bank-people", type=int, default=12, help="ORL/Yale people kept as the public bank")
    parser.add_argument("--bank-per-identity", type=int, default=8)
    parser.add_argument("--camera", default="corridor")
    parser.add_argument("--preset", default="camera-quick", choices=sorted(PRESETS),
                        help="rounds, steps and frames per device (default camera-quick)")
    parser.add_argument("--transport", default="inprocess", choices=["inprocess", "mqtt"],
                        help="the federated arm's rounds (inprocess: the same figures as mqtt, tested; faster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="a new folder: one experiment folder per size")
    return parser.parse_args(argv)


def fleet_people(celeb: list[str], more: list[str], bank: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(off-device people, people in the order they join devices, bank people): seeded, the same at every size."""
    rng = np.random.default_rng(seed)
    celeb, more = list(rng.permutation(celeb)), list(rng.permutation(more))
    return celeb[:3], celeb[3:] + more[bank:], more[:bank]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty")
    started = time.time()
    roots = [args.celeb, *args.more]
    pool = aligned_crops(load_datasets(roots), roots)
    celeb = [name for name in pool.identities if name.startswith(f"{args.celeb.name}_")]
    unseen, joining, bank = fleet_people(celeb, [n for n in pool.identities if n not in celeb], args.bank_people,
                                         args.seed)
    sizes = [len(unseen) + len(joining) if size == 0 else size for size in args.sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="camera-fleet-size-") as tmp:
        save_folders(pool.of_identities(bank), Path(tmp) / "bank")
        for size in sizes:
            people = unseen + joining[:size - len(unseen)]
            data = Path(tmp) / f"fleet-{size}"
            save_folders(pool.of_identities(people), data)
            cfg = preset_config(args.preset, args.out / f"people-{size}", data=[data], camera=args.camera,
                                seed=args.seed, bank=[Path(tmp) / "bank"], bank_per_identity=args.bank_per_identity,
                                arms=ARMS, transport=args.transport, reuse_photos=True,
                                unseen=tuple(f"{data.name}_{name}" for name in unseen))
            print(f"fleet of {size} people ({size - len(unseen)} on devices) -> {cfg.out}", flush=True)
            results = run_camera_experiment(cfg)
            for arm, a in results["arms"].items():
                rows.append({"people": size, "devices": len(results["setup"]["devices"]), "arm": arm,
                             **{k: a[k] for k in ("unseen_camera_eer", "unseen_camera_tar_at_far_1e-3",
                                                  "unseen_clean_eer", "owner_camera_eer", "owner_tar_at_far_1e-3")},
                             "seconds": a["seconds"]})
    print(f"\n{args.preset} settings, camera {args.camera}, seed {args.seed}; off-device people "
          f"{', '.join(unseen)}; total {time.time() - started:.0f} s\n")
    print("| people | devices | arm | unseen camera EER | TAR@1e-3 | unseen clean EER | owner camera EER | TAR@1e-3 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['people']} | {r['devices']} | {r['arm']} | {r['unseen_camera_eer']:.3f} | "
              f"{r['unseen_camera_tar_at_far_1e-3']:.2f} | {r['unseen_clean_eer']:.3f} | {r['owner_camera_eer']:.3f} | "
              f"{r['owner_tar_at_far_1e-3']:.2f} |")
    (args.out / "fleet_size.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out / "unseen_camera_eer_by_fleet_size.png")
    print(f"\n{args.out / 'fleet_size.json'}, {args.out / 'unseen_camera_eer_by_fleet_size.png'}")


def plot(rows: list[dict], path: Path) -> None:
    from facefed.plots import plot_method_curves

    curves = {arm: [(r["people"], r["unseen_camera_eer"]) for r in rows if r["arm"] == arm] for arm in ARMS}
    plot_method_curves(curves, path, title="Unseen people, camera EER by fleet size", xlabel="people in the fleet",
                       ylabel="EER", legend_loc="upper right")


if __name__ == "__main__":
    main()
