"""The main of a bench that returns its results as a dict: run it, time it, print its tables, write --json."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable


def run_and_report(args: argparse.Namespace, run_bench: Callable[[argparse.Namespace], dict],
                   print_results: Callable[[dict], None]) -> None:
    start = time.perf_counter()
    results = run_bench(args)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    print_results(results)
    print(f"total {results['total_seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
