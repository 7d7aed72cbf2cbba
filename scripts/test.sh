#!/usr/bin/env bash
# The test command: a fresh virtual environment, torch's CPU wheel first (so nothing pulls a CUDA build),
# then the package with its test extras, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
