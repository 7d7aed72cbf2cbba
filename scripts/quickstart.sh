#!/usr/bin/env bash
# The main job: set up a virtual environment (CPU torch first, then tinyllm-hf with its training, quantization,
# serving and evaluation extras) and run the whole pipeline of recipes/quickstart.yaml on the embedded corpus.
# Run it again to continue an interrupted run; extra arguments go to `tinyllm run` (e.g. --output_dir runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/tinyllm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e ".[train,quant,serve,eval]"
fi
# PASSIVE: OpenMP threads sleep instead of spinning while they wait, which matters on a busy or small machine.
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$VENV/bin/tinyllm" run --config recipes/quickstart.yaml "$@"
