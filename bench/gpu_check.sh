#!/usr/bin/env bash
# The checks that need a GPU, as one script for a short GPU lease (results go to $OUT, default /tmp/gpu-check):
#   bench/gpu_check.sh [throughput] [moe] [deepspeed] [sft] [speedrun]        (no argument: all five)
#   throughput  pretraining tokens/s and MFU of Tinyllm vs Llama (bf16, plain and torch.compile), 92m and 210m presets
#               (bench/pretrain_throughput.py --device cuda)
#   moe         the same for the moe-92m preset (no Llama twin)
#   deepspeed   real `accelerate launch` runs of recipes/pretrain/92m.yaml under DeepSpeed ZeRO-2 (eager and
#               torch.compile) and ZeRO-3, with the Trainer's tokens/s and MFU logs; the ZeRO-2 model is kept for sft
#   sft         `accelerate launch` of recipes/sft/92m.yaml from that model, on a local JSONL sample of the embedded set
#               (the recipe's Hub dataset and flash-attn are unavailable offline: sdpa, no packing)
#   speedrun    bench/speedrun.py on one GPU: the quickstart pretraining recipe in bf16 to the fixed validation
#               bits per character (docs/speedrun.md's one-GPU row)
# Prepared inputs (git-ignored, built on a CPU machine first because the GPU machine has no network):
#   .whl/          wheels the GPU image lacks (transformers, datasets, trl, deepspeed and their missing dependencies)
#   .gpu/corpus    the embedded corpus written out as text files; .gpu/tokenizer a trained tokenizer (the
#                  quickstart's: `tinyllm tokenizer train --corpus default --vocab-size 8192`);
#   .gpu/sft.jsonl a sample of the embedded SFT set as `messages` rows
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
SECTIONS=${*:-throughput moe deepspeed sft speedrun}
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' | tee -a "$OUT/machine.txt"
summary() { grep -E "mfu|Error|error" | tail -"$1"; }

if [[ $SECTIONS == *throughput* ]]; then
  timeout 240 python3 bench/pretrain_throughput.py --device cuda --presets 92m 210m --variants tinyllm llama compile \
    --tokens-per-step 65536 --rounds 2 --steps 10 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
fi
if [[ $SECTIONS == *moe* ]]; then
  timeout 120 python3 bench/pretrain_throughput.py --device cuda --presets moe-92m --variants tinyllm compile \
    --tokens-per-step 65536 --rounds 2 --steps 10 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/throughput_moe.txt"
fi
if [[ $SECTIONS == *deepspeed* ]]; then
  for run in zero2 zero2-compile zero3; do
    extra=()
    [[ $run == *compile ]] && extra=(--torch_compile true)
    timeout 150 accelerate launch --config_file "recipes/accelerate/deepspeed_${run%-compile}.yaml" --num_processes 1 \
      -m tinyllm_hf.trainers.pretrain --config recipes/pretrain/92m.yaml \
      --tokenizer_name_or_path .gpu/tokenizer --dataset_name .gpu/corpus --streaming false \
      --max_steps 50 --warmup_steps 10 --eval_strategy no --save_strategy no --logging_steps 10 \
      --report_to none --output_dir "/tmp/pretrain-$run" "${extra[@]}" 2>&1 | tee "$OUT/deepspeed_$run.log" | summary 3
  done
fi
if [[ $SECTIONS == *sft* ]]; then
  timeout 150 accelerate launch --config_file recipes/accelerate/single_gpu.yaml \
    -m tinyllm_hf.trainers.sft --config recipes/sft/92m.yaml --model_name_or_path /tmp/pretrain-zero2 \
    --dataset_name .gpu/sft.jsonl --eval_fraction 0.02 --max_eval_samples 200 --attn_implementation sdpa \
    --packing false --max_steps 60 --warmup_steps 5 --eval_strategy steps --eval_steps 60 --save_strategy no \
    --logging_steps 10 --report_to none --output_dir /tmp/sft-92m 2>&1 | tee "$OUT/sft.log" | summary 4
  grep -o "'eval_loss': '[0-9.]*'" "$OUT/sft.log" | tail -1
fi
if [[ $SECTIONS == *speedrun* ]]; then
  timeout 120 python3 bench/speedrun.py --tokenizer .gpu/tokenizer --json "$OUT/speedrun.json" \
    -- --use_cpu false --bf16 true 2>&1 | grep -v Warning | tee "$OUT/speedrun.txt" | tail -3
fi
