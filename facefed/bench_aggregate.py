"""`facefed bench aggregate`: our streaming FedAvg against Flower's, on the same client updates.

The parent process writes N client updates of P float32 parameters as .npy files, then runs each
side in a fresh subprocess that reads those files: ours (aggregator.strategies.WeightedSum, adding one
client at a time) with this interpreter, Flower's `aggregate` and `aggregate_inplace` with the
interpreter of a separate venv (Flower's pins clash with ours). Each side reports the time of the
aggregation calls alone and of the whole pass including loading, and its peak RSS above what the
process held after imports, so memory for holding inputs counts where an API needs them all at once.

Values are "known": every parameter is k / 2**16 with |k| < 2**16 and every weight n_k <= 1000, so
float64 sums of n_k * w_k are exact in any order and the exact weighted mean can be computed with
integers. `exact` is true when a side's float32 result equals that mean rounded to float32, bit for bit.

This module imports only numpy and the standard library at the top, so Flower's venv can run its
side with `python -m facefed.bench_aggregate` and PYTHONPATH set to the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GRID = 2**16  # parameter values are multiples of 1 / GRID in (-1, 1)
MAX_WEIGHT = 1000  # n_k in [1, MAX_WEIGHT]: sums stay far below 2**53, so float64 holds them exactly
REPO_ROOT = Path(__file__).resolve().parents[1]
FLOWER_VENV_ENV = "FACEFED_FLOWER_VENV"
SIDES = ("ours", "flower", "flower-inplace")
SETUP_HINT = ("create it with: bench/setup_flower_venv.sh   (or: python3 -m venv {venv} && "
              "{venv}/bin/pip install 'flwr>=1.8' numpy)")


# ---- known values (pure) -------------------------------------------------------------------------

def layer_sizes(params: int, layers: int) -> list[int]:
    """Split `params` into `layers` nearly equal tensors (the first ones one larger)."""
    if params < 1 or layers < 1:
        raise ValueError(f"params and layers must be >= 1, got {params} and {layers}")
    layers = min(layers, params)
    base, extra = divmod(params, layers)
    return [base + (i < extra) for i in range(layers)]


def grid_ints(seed: int, client: int, size: int, nonnegative: bool = False) -> np.ndarray:
    """Client `client`'s parameters as integers k (the values are k / GRID)."""
    rng = np.random.default_rng([seed, client])
    low = 0 if nonnegative else -GRID + 1
    return rng.integers(low, GRID, size=size, dtype=np.int64)


def grid_values(ints: np.ndarray) -> np.ndarray:
    return (ints / GRID).astype(np.float32)  # exact: |k| < 2**16 fits a float32 mantissa


def client_weight(seed: int, client: int) -> int:
    return int(np.random.default_rng([seed, client, 1]).integers(1, MAX_WEIGHT + 1))


class ExactMean:
    """Integer running sum of n_k * k over clients; mean() is the exact weighted mean, rounded once
    to float64 by the division and then to float32, which is what a float64 streaming sum must give."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.total_weight = 0

    def add(self, ints: dict[str, np.ndarray], weight: int) -> None:
        for name, value in ints.items():
            contribution = value * weight
            if name in self.sums:
                self.sums[name] += contribution
            else:
                self.sums[name] = contribution
        self.total_weight += weight

    def mean(self) -> dict[str, np.ndarray]:
        # sums / GRID is exact in float64 (|sums| < 2**53, GRID a power of two); the division by n rounds once.
        return {name: ((s.astype(np.float64) / GRID) / self.total_weight).astype(np.float32)
                for name, s in self.sums.items()}


def compare(result: np.ndarray, reference: np.ndarray) -> dict[str, float | bool]:
    diff = np.abs(result.astype(np.float64) - reference.astype(np.float64))
    return {"exact": bool(result.dtype == reference.dtype and np.array_equal(result, reference)),
            "max_abs_err": float(diff.max()) if diff.size else 0.0,
            "mismatched": int(np.count_nonzero(result != reference))}


# ---- one side, in its own process ----------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _client_files(data: Path, meta: dict) -> list[tuple[Path, int]]:
    return [(data / f"client-{k:05d}.npy", n) for k, n in enumerate(meta["weights"])]


def _split(flat: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1])  # views, no copies


def _run_ours(files: list[tuple[Path, int]], sizes: Sequence[int]) -> tuple[np.ndarray, float]:
    from aggregator.strategies import WeightedSum

    acc, busy = WeightedSum(), 0.0
    for path, weight in files:
        layers = _split(np.load(path), sizes)
        start = time.perf_counter()
        acc.add({f"layer{i:03d}": layer for i, layer in enumerate(layers)}, weight)
        busy += time.perf_counter() - start
    start = time.perf_counter()
    mean = acc.mean()
    busy += time.perf_counter() - start
    return np.concatenate([mean[name] for name in sorted(mean)]), busy


def _run_flower(files: list[tuple[Path, int]], sizes: Sequence[int]) -> tuple[np.ndarray, float]:
    from flwr.server.strategy.aggregate import aggregate

    results = [(_split(np.load(path), sizes), weight) for path, weight in files]  # Flower takes them all at once
    start = time.perf_counter()
    layers = aggregate(results)
    return np.concatenate(layers), time.perf_counter() - start


def _run_flower_inplace(files: list[tuple[Path, int]], sizes: Sequence[int]) -> tuple[np.ndarray, float]:
    """Flower's FedAvg default (inplace=True): FitRes with serialized Parameters, as they come off the wire."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy.aggregate import aggregate_inplace

    ok = Status(code=Code.OK, message="")
    results = [(None, FitRes(ok, ndarrays_to_parameters(_split(np.load(path), sizes)), weight, {}))
               for path, weight in files]
    start = time.perf_counter()
    layers = aggregate_inplace(results)
    return np.concatenate(layers), time.perf_counter() - start


def run_side(side: str, data: Path, out: Path) -> dict:
    """Aggregate the clients in `data` with one implementation; writes the flat result to `out`."""
    meta = json.loads((data / "meta.json").read_text())
    run = {"ours": _run_ours, "flower": _run_flower, "flower-inplace": _run_flower_inplace}[side]
    baseline = _rss_mb()
    start = time.perf_counter()
    result, busy = run(_client_files(data, meta), meta["sizes"])
    total = time.perf_counter() - start
    np.save(out, result)
    return {"side": side, "seconds": busy, "total_seconds": total, "baseline_rss_mb": baseline,
            "peak_mb": _peak_rss_mb() - baseline, "numpy": np.__version__}


# ---- the benchmark (parent process) --------------------------------------------------------------

def flower_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no Flower venv at {venv}; " + SETUP_HINT.format(venv=venv))
    return python


def default_flower_venv() -> Path:
    return Path(os.environ.get(FLOWER_VENV_ENV, REPO_ROOT / ".venv-flower"))


def write_clients(data: Path, clients: int, params: int, layers: int, seed: int) -> np.ndarray:
    """Write client-NNNNN.npy (flat float32) and meta.json; returns the exact mean (flat float32)."""
    sizes = layer_sizes(params, layers)
    weights = [client_weight(seed, k) for k in range(clients)]
    exact = ExactMean()
    for k, weight in enumerate(weights):
        ints = grid_ints(seed, k, params)
        np.save(data / f"client-{k:05d}.npy", grid_values(ints))
        exact.add({"flat": ints}, weight)
    (data / "meta.json").write_text(json.dumps({"sizes": sizes, "weights": weights}))
    return exact.mean()["flat"]


def _side_process(python: Path, side: str, data: Path) -> dict:
    out = data / f"result-{side}.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([str(python), "-m", "facefed.bench_aggregate", "--side", side, "--data", str(data),
                           "--out", str(out)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["result"] = np.load(out)
    out.unlink()
    return report


def bench_aggregate(clients: int, params: int, layers: int = 8, seed: int = 0, flower_venv: Path | None = None,
                    workdir: Path | None = None) -> dict:
    """Run every side on the same files; flower_venv=None runs ours only."""
    python = flower_python(flower_venv) if flower_venv is not None else None
    with tempfile.TemporaryDirectory(prefix="facefed-bench-agg-", dir=workdir) as tmp:
        data = Path(tmp)
        reference = write_clients(data, clients, params, layers, seed)
        sides = [("ours", Path(sys.executable))]
        if python is not None:
            sides += [("flower", python), ("flower-inplace", python)]
        reports = {side: _side_process(py, side, data) for side, py in sides}
    out: dict = {"clients": clients, "params": params, "layers": layers, "seed": seed,
                 "input_mb": clients * params * 4 / 2**20}
    for side, report in reports.items():
        key = side.replace("-", "_")
        check = compare(report.pop("result"), reference)
        out.update({f"{key}_s": report["seconds"], f"{key}_total_s": report["total_seconds"],
                    f"{key}_peak_mb": report["peak_mb"], f"{key}_max_abs_err": check["max_abs_err"],
                    f"{key}_mismatched": check["mismatched"], f"{key}_exact": check["exact"],
                    f"{key}_numpy": report["numpy"]})
    out["exact"] = out["ours_exact"]
    if python is not None:
        for flower in ("flower", "flower_inplace"):
            out[f"{flower}_over_ours_time"] = out[f"{flower}_s"] / out["ours_s"]
            out[f"{flower}_over_ours_peak"] = out[f"{flower}_peak_mb"] / max(out["ours_peak_mb"], 1e-9)
    return out


def markdown_rows(results: Sequence[dict]) -> str:
    """One table: aggregation time and peak memory per side, and Flower/ours ratios."""
    lines = [("| clients | params | ours s | ours peak MB | ours exact | Flower aggregate s | peak MB | exact | "
             "Flower aggregate_inplace s | peak MB | exact | time ratio (Flower/ours) | memory ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        row = [f"{r['clients']}", f"{r['params']:,}", f"{r['ours_s']:.3f}", f"{r['ours_peak_mb']:.0f}",
               "yes" if r["ours_exact"] else "NO"]
        if "flower_s" in r:
            for key in ("flower", "flower_inplace"):
                row += [f"{r[f'{key}_s']:.3f}", f"{r[f'{key}_peak_mb']:.0f}",
                        "yes" if r[f"{key}_exact"] else f"no (max err {r[f'{key}_max_abs_err']:.1e})"]
            row += [f"{r['flower_over_ours_time']:.2f} / {r['flower_inplace_over_ours_time']:.2f}",
                    f"{r['flower_over_ours_peak']:.1f} / {r['flower_inplace_over_ours_peak']:.1f}"]
        else:
            row += ["-"] * 8
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`facefed bench aggregate`, registered by facefed.cli."""
    bench = sub.add_parser("bench", help="server-side benchmarks (`bench aggregate`: ours vs Flower's FedAvg)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    agg = bench_sub.add_parser(
        "aggregate", help="time and peak memory of our streaming FedAvg vs Flower's, on the same arrays",
        description="Write N client updates of P float32 parameters (known values, so the exact weighted mean is "
        "known) to a temp dir, then aggregate them in a fresh subprocess per side: ours (aggregator.strategies.weighted_sum) and "
        "Flower's aggregate / aggregate_inplace, run in a separate venv because Flower's pins clash with ours. "
        "Prints a markdown table; --json writes ours_s, flower_s, ours_peak_mb, flower_peak_mb, exact and more.")
    agg.add_argument("--clients", type=int, nargs="+", default=[10], metavar="N", help="client counts (default 10)")
    agg.add_argument("--params", type=int, default=1_000_000, metavar="P", help="parameters per update (default 1M)")
    agg.add_argument("--layers", type=int, default=8, help="tensors the parameters are split into (default 8)")
    agg.add_argument("--seed", type=int, default=0)
    agg.add_argument("--json", type=Path, metavar="OUT", help="write the results here (one object, or a list)")
    agg.add_argument("--flower-venv", type=Path, default=None,
                     help=f"venv with flwr installed (default ${FLOWER_VENV_ENV} or .venv-flower in the repository)")
    agg.add_argument("--ours-only", action="store_true", help="skip Flower's side")
    agg.add_argument("--workdir", type=Path, help="where to write the temporary client files (default: system temp)")


def bench_main(args: argparse.Namespace) -> int:
    if min(args.clients) < 1 or args.params < 1 or args.layers < 1:
        print("facefed bench aggregate: --clients, --params and --layers must be >= 1", file=sys.stderr)
        return 2
    venv = None if args.ours_only else (args.flower_venv or default_flower_venv())
    if venv is not None and not (venv / "bin" / "python").is_file():
        print(f"facefed bench aggregate: no Flower venv at {venv}; {SETUP_HINT.format(venv=venv)}; "
              "or run with --ours-only", file=sys.stderr)
        return 2
    results = []
    for clients in args.clients:
        results.append(bench_aggregate(clients, args.params, args.layers, args.seed, venv, args.workdir))
        print(markdown_rows(results[-1:]).splitlines()[-1] if len(results) > 1 else markdown_rows(results), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2, sort_keys=True) + "\n")
    return 0 if all(r["exact"] for r in results) else 1


def _side_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m facefed.bench_aggregate",
                                     description="one side of `facefed bench aggregate` (run by it)")
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(run_side(args.side, args.data, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(_side_main(sys.argv[1:]))
