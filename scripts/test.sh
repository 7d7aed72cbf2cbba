#!/usr/bin/env bash
# The test command: a fresh virtual environment, torch's CPU wheel first (so nothing pulls a CUDA build),
# then the package with its test extras, then the whole test suite.
# A second small environment with transformers 4.57 checks that exported checkpoints load in the older
# transformers that vLLM and optimum-onnx pin.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
LEGACY_VENV=${LEGACY_VENV:-.venv-legacy}
rm -rf "$VENV" "$LEGACY_VENV"

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"

python3 -m venv "$LEGACY_VENV"
"$LEGACY_VENV/bin/pip" install -q torch==2.13.0
"$LEGACY_VENV/bin/pip" install -q "transformers==4.57.*" safetensors

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TINYLLM_LEGACY_PYTHON="$PWD/$LEGACY_VENV/bin/python"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
