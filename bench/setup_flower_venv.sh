#!/usr/bin/env bash
# Create the separate virtual environment that `facefed bench aggregate` runs Flower's side in.
# Flower pins protobuf/grpcio versions that clash with ours, so it never goes into the kit's own env.
# Usage: bench/setup_flower_venv.sh [VENV_DIR]   (default: .venv-flower at the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-flower}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "flwr>=1.8" numpy
"$venv/bin/python" -c "import flwr; from flwr.server.strategy.aggregate import aggregate; print('flwr', flwr.__version__, 'ready in', '$venv')"
