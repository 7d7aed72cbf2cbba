#!/usr/bin/env bash
# The checks that need a GPU, as one script for a short GPU lease (results go to $OUT, default /tmp/gpu-check):
#   1. pretraining tokens/s and MFU of Tinyllm vs Llama (bf16, plain and torch.compile) for the 92m and 210m presets,
#      and of the moe-92m preset (bench/pretrain_throughput.py --device cuda);
#   2. real `accelerate launch` runs of the 92m recipe under DeepSpeed ZeRO-2 and ZeRO-3 (recipes/accelerate/), with
#      the Trainer's tokens/s and MFU logs.
# Prepared inputs (git-ignored, built on a CPU machine first because the GPU machine has no network):
#   .whl/       wheels the GPU image lacks (transformers, datasets, deepspeed and their missing dependencies)
#   .gpu/corpus a local text folder (the embedded corpus written out), .gpu/tokenizer a trained tokenizer
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' | tee -a "$OUT/machine.txt"

timeout 240 python3 bench/pretrain_throughput.py --device cuda --presets 92m 210m --variants tinyllm llama compile \
  --tokens-per-step 65536 --rounds 2 --steps 10 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
timeout 90 python3 bench/pretrain_throughput.py --device cuda --presets moe-92m --variants tinyllm \
  --tokens-per-step 65536 --rounds 2 --steps 10 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/throughput_moe.txt"

for stage in 2 3; do
  timeout 150 accelerate launch --config_file "recipes/accelerate/deepspeed_zero$stage.yaml" --num_processes 1 \
    -m tinyllm_hf.trainers.pretrain --config recipes/pretrain/92m.yaml \
    --tokenizer_name_or_path .gpu/tokenizer --dataset_name .gpu/corpus --streaming false \
    --max_steps 50 --warmup_steps 10 --eval_strategy no --save_strategy no --logging_steps 10 \
    --report_to none --output_dir "/tmp/ds-zero$stage" 2>&1 | tee "$OUT/deepspeed_zero$stage.log" | grep -E "mfu|Error|error" | tail -8
done
