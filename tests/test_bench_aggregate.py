"""`facefed bench aggregate`: our side is exact on small sizes; Flower's side runs when its venv exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facefed.bench_aggregate import (
    ExactMean,
    default_flower_venv,
    grid_ints,
    grid_values,
    layer_sizes,
)
from facefed.cli import main


def test_layer_sizes_cover_all_parameters() -> None:
    assert layer_sizes(10, 3) == [4, 3, 3]
    assert layer_sizes(2, 8) == [1, 1]
    with pytest.raises(ValueError):
        layer_sizes(0, 1)


def test_exact_mean_matches_float64_streaming_sum_bit_for_bit() -> None:
    exact, total, weights = ExactMean(), np.zeros(1000), [3, 1000, 7]
    for client, weight in enumerate(weights):
        ints = grid_ints(0, client, 1000)
        exact.add({"x": ints}, weight)
        total += grid_values(ints).astype(np.float64) * weight
    assert np.array_equal(exact.mean()["x"], (total / sum(weights)).astype(np.float32))


def test_bench_aggregate_ours_only_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "aggregate", "--clients", "5", "--params", "2000", "--layers", "3", "--ours-only",
                 "--json", str(out), "--workdir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert result["exact"] is True and result["ours_mismatched"] == 0
    assert result["clients"] == 5 and result["params"] == 2000
    assert result["ours_s"] > 0 and result["ours_peak_mb"] >= 0
    assert "flower_s" not in result


def test_bench_aggregate_without_flower_venv_says_how_to_create_it(tmp_path: Path, capsys) -> None:
    code = main(["bench", "aggregate", "--clients", "2", "--params", "10", "--flower-venv", str(tmp_path / "none")])
    assert code == 2
    assert "setup_flower_venv.sh" in capsys.readouterr().err


def test_bench_aggregate_against_flower(tmp_path: Path) -> None:
    venv = default_flower_venv()
    if not (venv / "bin" / "python").is_file():
        pytest.skip(f"Flower's venv is absent at {venv} (create it with bench/setup_flower_venv.sh)")
    out = tmp_path / "bench.json"
    main(["bench", "aggregate", "--clients", "4", "--params", "3000", "--json", str(out), "--workdir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert result["exact"] is True
    for key in ("flower_s", "flower_peak_mb", "flower_inplace_s", "flower_over_ours_time"):
        assert result[key] > 0
    assert result["flower_max_abs_err"] < 1e-6  # Flower accumulates in float32: close, not always exact
