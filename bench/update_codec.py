"""Wire codecs side by side: float32 against int8-delta (and top-k) uploads, float32 against int8-delta downloads.

Run from the repository root:

    python -m bench.update_codec paired [--seeds 0 1 2 3 4 5 6 7] [--rounds 10] [--json OUT]
    python -m bench.update_codec mqtt [--arch faceapi-resnet|mobilefacenet] [--rounds 3] [--json OUT]

`paired` (accuracy): the pretrained face-api setting of bench/faceapi_finetune.py (celeb-dev, first 150
images of each identity, 4 identities held out, 4 clients, trainable `last`, lr 1e-4, margin 0, 1 local epoch),
run in one process (facefed/inprocess.py: the aggregator's round engine with the devices' own
edge_agent.trainer.LocalTrainer, frozen-trunk features cached, each encoding its update with its own residual),
without MQTT. Every variant runs
with every seed; within a seed only the codec differs (same partition, same device seeds, same heads), so the
per-seed difference to float32 is a paired sample. Reported: mean paired difference of held-out accuracy (final
round and mean of the last three rounds) with a 95 % t confidence interval. Bytes are the exact MQTT payloads
(build_transfer chunks with their 28-byte headers, plus the manifest JSON) each client would send and receive.

`mqtt` (bytes on the real wire): one `facefed simulate` federation per variant, embedded broker, aggregator and
agent processes, same seed. Upload bytes are what the aggregator received on the update topics; download bytes
are the aggregator's count: what it published on the global topics (a delta, or the full model) times the
accepted clients. Full-model fallback fetches (PROTOCOL.md 5.2) are not in that count.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedwire.messages import TrainSettings
from fedwire.compression import DEFAULT_TOPK_FRACTION, INT8_DELTA, PLAIN, TOPK_INT8_DELTA

TAIL_ROUNDS = 3


@dataclass(frozen=True)
class Variant:
    name: str
    upload: str
    download: str


VARIANTS = (
    Variant("float32", PLAIN, PLAIN),
    Variant("int8-delta up", INT8_DELTA, PLAIN),
    Variant("int8-delta up + down", INT8_DELTA, INT8_DELTA),
    Variant(f"top-{DEFAULT_TOPK_FRACTION:g} int8 up + int8 down", TOPK_INT8_DELTA, INT8_DELTA),
)


def t95(n: int) -> float:
    try:
        from scipy import stats
        return float(stats.t.ppf(0.975, n - 1))
    except ImportError:  # two-sided 95 % t quantiles, df 1..10
        return [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228][min(n - 1, 10) - 1]


def paired_stats(diffs: list[float]) -> dict:
    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "sd": None, "ci95": [None, None], "n": len(d)}
    half = t95(len(d)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return {"mean": mean, "sd": float(d.std(ddof=1)), "ci95": [mean - half, mean + half], "n": len(d)}


# ---- paired, in-process --------------------------------------------------------------------------------------

class FaceapiSetting:
    """Partitions, device trainers (with their cached trunk features) and held-out features, built once."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        import torch

        from edge_agent.trainer import LocalTrainer
        from facefed.simulate import SimulationConfig, prepare_partitions
        from model_zoo.backbones import build_backbone
        from model_zoo.checkpoint import shared_tensors
        from model_zoo.data import load_dataset
        from model_zoo.train import trunk_features

        torch.set_num_threads(1)
        celeb = load_dataset(args.celeb, layout="folders")
        limited = celeb.first_per_identity(args.train_per_identity)
        cfg = SimulationConfig(data=[], out=scratch, clients=args.clients, holdout=args.holdout, seed=0)
        self.clients, held_small = prepare_partitions(limited, cfg)
        self.held_out = celeb.of_identities(held_small.identities)
        self.model_spec = {"arch": "faceapi-resnet", "trainable": "last"}
        self.settings = TrainSettings(local_epochs=1, lr=args.lr, margin=0.0, model=self.model_spec)
        self.scratch = scratch
        self.trainers = [LocalTrainer(part, scratch / f"client-{k}", batch_size=32, augment=True, seed=1000 * k)
                         for k, part in enumerate(self.clients)]
        self.backbone = build_backbone("faceapi-resnet", trainable="last")
        self.initial = shared_tensors(self.backbone)
        start = time.time()
        self.held_features = trunk_features(self.backbone, self.held_out.images)
        # What a device computes once: its trunk features (kept across rounds) and its head, imprinted from
        # version 0's embeddings (every class is present, so the head does not depend on the device seed).
        self.heads = []
        for trainer in self.trainers:
            trainer.prepare(self.settings)
            self.heads.append((trainer.head_path.read_bytes(), trainer.head_path.with_suffix(".json").read_bytes()))
        self.setup_seconds = time.time() - start

    def evaluate(self, tensors: dict) -> dict:
        import torch

        from model_zoo.checkpoint import load_shared_tensors
        from model_zoo.evaluate import evaluate_embeddings

        load_shared_tensors(self.backbone, tensors)
        self.backbone.eval()
        with torch.inference_mode():
            emb = self.backbone.forward_tail(self.held_features).numpy()
        report = evaluate_embeddings(emb, self.held_out.labels)
        return {"accuracy": float(report["accuracy"]), "eer": float(report["eer"])}


def run_paired_variant(setting: FaceapiSetting, variant: Variant, seed: int, rounds: int, heads: list[bytes]) -> dict:
    from aggregator.config import AggregatorConfig
    from facefed.inprocess import Device, InProcessModels, run_inprocess
    from fedwire.config import parse_config

    devices = []
    for k, (trainer, head) in enumerate(zip(setting.trainers, heads)):  # every run starts from the imprinted heads
        trainer.head_path.write_bytes(head[0])
        trainer.head_path.with_suffix(".json").write_bytes(head[1])
        trainer.seed = 1000 * k + 100 * seed  # device seed: batch order and mirroring
        devices.append(Device(f"client-{k}", trainer))
    state_dir = setting.scratch / "aggregator"
    shutil.rmtree(state_dir, ignore_errors=True)
    config = parse_config(AggregatorConfig, {
        "state_dir": str(state_dir), "rounds": rounds, "min_clients": len(devices), "strategy": "fedavg",
        "update_codec": variant.upload, "download_codec": variant.download,
        "model": {"arch": "faceapi-resnet", "options": {"trainable": "last"}},
        "train": {"local_epochs": setting.settings.local_epochs, "lr": setting.settings.lr, "margin": 0.0}})
    engine = run_inprocess(config, devices, InProcessModels(config, setting.initial,
                                                            lambda _, tensors: setting.evaluate(tensors)))
    curve = engine.state.read_log()  # round 0 (the initial model) first
    accs = [c["accuracy"] for c in curve]
    up = [b for device in devices for b in device.upload_bytes]
    down = engine.publisher.download_bytes[1:]  # each round's new model; [0] is version 0
    return {"variant": variant.name, "seed": seed, "accuracy_per_round": accs, "final_accuracy": accs[-1],
            "final_eer": curve[-1]["eer"], f"mean_accuracy_last_{TAIL_ROUNDS}": float(np.mean(accs[-TAIL_ROUNDS:])),
            "upload_bytes_per_client_round": float(np.mean(up)), "download_bytes_per_client_round": float(np.mean(down))}


def paired(args: argparse.Namespace) -> dict:
    start = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="codec-paired-"))
    try:
        setting = FaceapiSetting(args, scratch)
        print(f"setup (trunk features, imprinted heads): {setting.setup_seconds:.0f} s; clients "
              f"{[len(c) for c in setting.clients]} images, held out {setting.held_out.identities} "
              f"({len(setting.held_out)} images)", flush=True)
        runs = []
        for seed in args.seeds:
            for variant in VARIANTS:
                t0 = time.time()
                run = run_paired_variant(setting, variant, seed, args.rounds, setting.heads)
                run["seconds"] = time.time() - t0
                runs.append(run)
                print(f"seed {seed} {variant.name}: final {run['final_accuracy']:.4f}, last-{TAIL_ROUNDS} "
                      f"{run[f'mean_accuracy_last_{TAIL_ROUNDS}']:.4f}, up {run['upload_bytes_per_client_round'] / 1e6:.3f} MB, "
                      f"down {run['download_bytes_per_client_round'] / 1e6:.3f} MB ({run['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize_paired(runs, args, time.time() - start)


def summarize_paired(runs: list[dict], args: argparse.Namespace, seconds: float) -> dict:
    tail = f"mean_accuracy_last_{TAIL_ROUNDS}"
    by = {(r["variant"], r["seed"]): r for r in runs}
    base = VARIANTS[0].name
    table = []
    for variant in VARIANTS:
        rs = [by[(variant.name, s)] for s in args.seeds]
        row = {"variant": variant.name, "upload": variant.upload, "download": variant.download,
               "upload_mb": float(np.mean([r["upload_bytes_per_client_round"] for r in rs])) / 1e6,
               "download_mb": float(np.mean([r["download_bytes_per_client_round"] for r in rs])) / 1e6,
               "final_accuracy": float(np.mean([r["final_accuracy"] for r in rs])),
               tail: float(np.mean([r[tail] for r in rs])),
               "final_eer": float(np.mean([r["final_eer"] for r in rs]))}
        if variant.name != base:
            row["diff_final_points"] = paired_stats([100 * (by[(variant.name, s)]["final_accuracy"]
                                                            - by[(base, s)]["final_accuracy"]) for s in args.seeds])
            row["diff_tail_points"] = paired_stats([100 * (by[(variant.name, s)][tail] - by[(base, s)][tail])
                                                    for s in args.seeds])
        table.append(row)
    b = table[0]
    print(f"\n{len(args.seeds)} seeds, {args.rounds} rounds, {seconds:.0f} s\n")
    print("| variant | up MB/client/round | down MB/client/round | up+down vs float32 | final acc (mean) | "
          f"last-{TAIL_ROUNDS} acc (mean) | Δ final, pts [95 % CI] | Δ last-{TAIL_ROUNDS}, pts [95 % CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        fmt = lambda s: "–" if s is None else f"{s['mean']:+.3f}" if s["sd"] is None else f"{s['mean']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
        ratio = (b["upload_mb"] + b["download_mb"]) / (row["upload_mb"] + row["download_mb"])
        print(f"| {row['variant']} | {row['upload_mb']:.3f} ({b['upload_mb'] / row['upload_mb']:.2f}×) | "
              f"{row['download_mb']:.3f} ({b['download_mb'] / row['download_mb']:.2f}×) | {ratio:.2f}× | "
              f"{row['final_accuracy']:.4f} | {row[tail]:.4f} | {fmt(row.get('diff_final_points'))} | "
              f"{fmt(row.get('diff_tail_points'))} |")
    return {"mode": "paired", "setting": "faceapi-resnet trainable last, celeb-dev", "lr": args.lr,
            "seeds": args.seeds, "rounds": args.rounds, "seconds": seconds, "table": table, "runs": runs}


# ---- real MQTT -------------------------------------------------------------------------------------------------

def mqtt(args: argparse.Namespace) -> dict:
    from facefed.simulate import SimulationConfig, run_simulation
    from model_zoo.data import default_data_root, load_dataset, save_folders

    results = []
    start_all = time.time()
    with tempfile.TemporaryDirectory(prefix="codec-mqtt-") as scratch:
        if args.arch == "faceapi-resnet":
            data = Path(scratch) / "celeb"
            save_folders(load_dataset(args.celeb, layout="folders").first_per_identity(args.train_per_identity), data)
            extra = {"arch": "faceapi-resnet", "model_options": {"trainable": "last"}, "lr": args.lr, "margin": 0.0,
                     "local_epochs": 1, "holdout": args.holdout}
        else:
            data = args.data or default_data_root()
            extra = {}
        for variant in VARIANTS:
            start = time.time()
            run = run_simulation(SimulationConfig(
                data=[data], out=Path(scratch) / variant.upload / variant.download, clients=args.clients,
                rounds=args.rounds, seed=args.seed, update_codec=variant.upload, download_codec=variant.download,
                **extra))
            trained = [r for r in run.rounds if r["round"] > 0]
            updates = sum(r["clients"] for r in trained)
            row = {"variant": variant.name, "seconds": time.time() - start,
                   "upload_mb": sum(r["bytes_up"] for r in trained) / updates / 1e6,
                   "download_mb": sum(r["bytes_down"] for r in trained) / updates / 1e6,
                   "final_accuracy": trained[-1]["val_accuracy"],
                   "accuracy_per_round": [r["val_accuracy"] for r in run.rounds]}
            results.append(row)
            print(json.dumps(row), flush=True)
    b = results[0]
    print(f"\n{args.arch}, {args.clients} clients, {args.rounds} rounds, seed {args.seed}, {time.time() - start_all:.0f} s\n")
    print("| variant | upload MB/client/round | download MB/client/round | final held-out acc | wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['upload_mb']:.3f} ({b['upload_mb'] / r['upload_mb']:.2f}×) | "
              f"{r['download_mb']:.3f} ({b['download_mb'] / r['download_mb']:.2f}×) | {r['final_accuracy']:.4f} | "
              f"{r['seconds']:.0f} |")
    return {"mode": "mqtt", "arch": args.arch, "rounds": args.rounds, "seed": args.seed, "runs": results}


def main(argv: list[str] | None = None) -> None:
    from model_zoo.data import shared_datasets_root

    shared = shared_datasets_root()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["paired", "mqtt"])
    parser.add_argument("--celeb", type=Path, default=shared / "celeb-dev")
    parser.add_argument("--data", type=Path, default=None, help="mqtt with mobilefacenet: default ../shared/datasets/orl")
    parser.add_argument("--arch", choices=["faceapi-resnet", "mobilefacenet"], default="faceapi-resnet")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--seed", type=int, default=0, help="mqtt: the one seed")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--train-per-identity", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = paired(args) if args.mode == "paired" else mqtt(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
