#!/usr/bin/env bash
# The evidence for docs/results.md#alignment: reward model, DPO and GRPO from one SFT model, each stage shortened to
# a few minutes on 2 shared CPU cores (the recipes' other settings unchanged), then held-out accuracy of all three.
#   bash bench/alignment_quickstart.sh runs/alignment/sft runs/alignment
set -euo pipefail
SFT=${1:?SFT model folder}
OUT=${2:?output folder}
STEPS_REWARD=${STEPS_REWARD:-30}
STEPS_DPO=${STEPS_DPO:-30}
STEPS_GRPO=${STEPS_GRPO:-12}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
timed() {  # timed NAME command...: wall-clock seconds of the whole command into $OUT/NAME.time
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  echo $(( $(date +%s) - start )) > "$OUT/$name.time"
}
common=(--model_name_or_path "$SFT" --report_to none --disable_tqdm true --loss_curve false)
timed reward tinyllm reward --config recipes/reward/quickstart.yaml "${common[@]}" --output_dir "$OUT/reward" \
    --max_steps "$STEPS_REWARD" --per_device_train_batch_size 8 --save_steps "$STEPS_REWARD" &
timed dpo tinyllm dpo --config recipes/dpo/quickstart.yaml "${common[@]}" --output_dir "$OUT/dpo" \
    --max_steps "$STEPS_DPO" --per_device_train_batch_size 8 --learning_rate 2e-4 --save_steps "$STEPS_DPO" \
    --task_sizes sentiment=150,idiom_meaning=30,word_definition=30,xiehouyu=30 --max_eval_samples 100 &
wait
timed grpo tinyllm grpo --config recipes/grpo/quickstart.yaml "${common[@]}" --output_dir "$OUT/grpo" \
    --reward_model_path "$OUT/reward" --max_steps "$STEPS_GRPO" --per_device_train_batch_size 16 \
    --learning_rate 5e-5 --save_steps "$STEPS_GRPO" --logging_steps 1
timed eval python bench/alignment_eval.py --model "sft=$SFT" --model "dpo=$OUT/dpo" --model "grpo=$OUT/grpo" \
    --json "$OUT/eval.json"
for stage in reward dpo grpo eval; do echo "$stage: $(cat "$OUT/$stage.time") s"; done
cat "$OUT/reward/pairwise_accuracy.json" "$OUT/eval.json"
