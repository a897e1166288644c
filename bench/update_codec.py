"""Upload codecs side by side: float32 (safetensors) against int8-delta, in one run, same seeds.

Run from the repository root:  python -m bench.update_codec [--seeds 0 1] [--rounds 10] [--json OUT]

Each (codec, seed) pair is a full `facefed simulate` federation over the real MQTT path (embedded broker,
aggregator process, agent processes) with the README's setup: ORL, 3 clients, 2 local epochs. Only the
update codec differs between the two runs of a seed. Bytes are what the aggregator received on the update
topics (chunks with their headers, plus manifests), per accepted client and round. Held-out accuracy is the
aggregator's per-round check on identities no client holds; a single round's figure swings by several points
in this setup, so the mean over the last three rounds is reported next to the final one.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from facefed.simulate import SimulationConfig, run_simulation
from fedwire.compression import INT8_DELTA, PLAIN
from model_zoo.data import default_data_root

CODECS = (PLAIN, INT8_DELTA)
TAIL_ROUNDS = 3


def summarize(rounds: list[dict]) -> dict:
    """Per-run figures from the aggregator's rounds.jsonl entries (round 0 is the initial model)."""
    trained = [r for r in rounds if r["round"] > 0]
    updates = sum(r["clients"] for r in trained)
    tail = [r["val_accuracy"] for r in trained[-TAIL_ROUNDS:]]
    return {
        "upload_mb_per_client_round": sum(r["bytes_up"] for r in trained) / updates / 1e6,
        "download_mb_per_client_round": sum(r["bytes_down"] for r in trained) / updates / 1e6,
        "final_accuracy": trained[-1]["val_accuracy"],
        "final_eer": trained[-1]["eer"],
        f"mean_accuracy_last_{TAIL_ROUNDS}": float(np.mean(tail)),
        "accuracy_per_round": [r["val_accuracy"] for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="default: $FACEFED_DATA or ../shared/datasets/orl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = args.data or default_data_root()

    results: dict[str, dict[int, dict]] = {codec: {} for codec in CODECS}
    with tempfile.TemporaryDirectory(prefix="codec-bench-") as scratch:
        for seed in args.seeds:
            for codec in CODECS:
                start = time.time()
                run = run_simulation(SimulationConfig(data=[data], out=Path(scratch) / f"{codec}-{seed}",
                                                      clients=args.clients, rounds=args.rounds, seed=seed,
                                                      update_codec=codec))
                results[codec][seed] = summarize(run.rounds) | {"seconds": time.time() - start}
                print(f"seed {seed} {codec}: {json.dumps({k: v for k, v in results[codec][seed].items() if k != 'accuracy_per_round'})}",
                      flush=True)

    tail_key = f"mean_accuracy_last_{TAIL_ROUNDS}"
    print(f"\n| codec | seed | upload MB / client / round | final acc | mean acc, last {TAIL_ROUNDS} rounds | final EER |")
    print("|---|---|---|---|---|---|")
    for codec in CODECS:
        for seed, r in results[codec].items():
            print(f"| {codec} | {seed} | {r['upload_mb_per_client_round']:.3f} | {r['final_accuracy']:.3f} | "
                  f"{r[tail_key]:.3f} | {r['final_eer']:.3f} |")
    mean = {codec: {key: float(np.mean([r[key] for r in results[codec].values()]))
                    for key in ("upload_mb_per_client_round", "final_accuracy", tail_key)} for codec in CODECS}
    ratio = mean[PLAIN]["upload_mb_per_client_round"] / mean[INT8_DELTA]["upload_mb_per_client_round"]
    print(f"\nupload bytes: {ratio:.2f}x fewer with {INT8_DELTA}; accuracy change (int8 - float32), mean over seeds: "
          f"final {100 * (mean[INT8_DELTA]['final_accuracy'] - mean[PLAIN]['final_accuracy']):+.2f} points, "
          f"last-{TAIL_ROUNDS} mean {100 * (mean[INT8_DELTA][tail_key] - mean[PLAIN][tail_key]):+.2f} points")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "mean": mean, "upload_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
