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
# llama-cpp-python is an sdist: build it for any x86-64 with AVX2 (no -march=native, so no AMX kernels, which segfault
# in ggml_backend_amx_mul_mat on some Sapphire Rapids VMs: llama.cpp issue #20824), once per version and flag set.
LLAMA_CPP=llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/tinyllm-hf/wheels/$(echo "$LLAMA_CPP $LLAMA_CMAKE_ARGS" | sha1sum | cut -c1-12)"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$VENV/bin/pip" wheel -q --no-cache-dir --no-deps -w "$WHEELS" "$LLAMA_CPP"
fi
"$VENV/bin/pip" install -q "$WHEELS"/llama_cpp_python-*.whl
"$VENV/bin/pip" install -q -e ".[dev]"

python3 -m venv "$LEGACY_VENV"
"$LEGACY_VENV/bin/pip" install -q torch==2.13.0
"$LEGACY_VENV/bin/pip" install -q "transformers==4.57.*" safetensors

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TINYLLM_LEGACY_PYTHON="$PWD/$LEGACY_VENV/bin/python"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
