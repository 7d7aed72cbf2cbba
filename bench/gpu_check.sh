#!/usr/bin/env bash
# The checks that need a GPU, as ONE prepared run of at most 10 minutes on one GPU; logs and a summary table
# (summary.md, ready for docs/benchmarks.md) go to $OUT (default /tmp/gpu-check):
#   bench/gpu_check.sh [--dry-run] [mfu] [pipeline] [moe] [deepspeed] [speedrun]    (no section: mfu pipeline)
#   mfu        pretraining tokens/s and MFU of the 92m and 210m presets through the pretraining Trainer (vocab 32768,
#              65,536 tokens per step, bf16 autocast, random blocks): eager, torch.compile, and torch.compile with
#              mode "reduce-overhead" (CUDA graphs); MFU against the measured bf16 matmul peak and against the GPU's
#              datasheet peak (bench/pretrain_throughput.py). Goal on one H200: 92m >= 30%, 210m >= 45% (datasheet).
#   pipeline   `tinyllm run --config bench/gpu_check_92m.yaml`: every stage of the 92m pipeline with its own recipes,
#              a few steps each, on one GPU, on the local data in .gpu/; the summary has each stage's time and the
#              pretraining stage's own logged MFU
#   moe        the mfu check for the moe-92m preset
#   deepspeed  the pretraining recipe under DeepSpeed ZeRO-2 and ZeRO-3 (needs a deepspeed wheel in .whl/ and the
#              pipeline's tokenizer)
#   speedrun   bench/speedrun.py on one GPU with the pipeline's tokenizer (docs/speedrun.md's one-GPU row)
# Prepared inputs, git-ignored (the GPU machine has no network): `bench/gpu_prepare.sh PYTHON [BENCHMARKS_DIR]` on a
# machine with the project's environment writes .whl/ (wheels the GPU image lacks) and .gpu/ (data); take both along.
# --dry-run, on any machine without a GPU: checks the prepared inputs and the pipeline recipe, prints the stage
# commands, and runs the mfu check's code for two steps of the tiny preset on the CPU.
# Time: each section stops at its own limit and the whole run at BUDGET_S seconds (default 570).
set -uo pipefail
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
SECTIONS=" ${*:-mfu pipeline} "
BUDGET_S=${BUDGET_S:-570}
DEADLINE=$((SECONDS + BUDGET_S))
RUN=/tmp/gpu-check/runs/92m          # the pipeline recipe's output_dir
mkdir -p "$OUT"
# At most `$1` seconds, and never past the deadline.
limit() { local left=$((DEADLINE - SECONDS)); ((left < $1)) && echo $((left > 10 ? left : 10)) || echo "$1"; }

if [[ -d .whl ]] && ((DRY_RUN == 0)); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
if [[ -f .gpu/embedded-data.tar.xz ]] && ((DRY_RUN == 0)); then  # the embedded sources' data, found by package metadata
  mkdir -p /tmp/gpu-site && tar -xJf .gpu/embedded-data.tar.xz -C /tmp/gpu-site
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/gpu-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false

if ((DRY_RUN)); then
  status=0
  for path in .gpu/embedded-data.tar.xz .gpu/wikipedia .gpu/belle.jsonl .gpu/ceval .gpu/cmmlu; do
    [[ -e $path ]] || { echo "missing $path: run bench/gpu_prepare.sh PYTHON [BENCHMARKS_DIR] first"; status=1; }
  done
  ls .whl/*.whl >/dev/null 2>&1 || { echo "missing .whl/*.whl: run bench/gpu_prepare.sh first"; status=1; }
  tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  extra=$(du -cb .whl .gpu 2>/dev/null | tail -1 | cut -f1)
  echo "to take to the GPU machine: $(( (tracked + extra) / 1048576 )) MiB (tracked files, .whl, .gpu)"
  "$PYTHON" - <<'PY' || status=1
from pathlib import Path

from tinyllm_hf.pipeline import Pipeline, load_pipeline_recipe
from tinyllm_hf.runs import STAGES, TRAINING_STAGES

path = Path("bench/gpu_check_92m.yaml")
recipe = load_pipeline_recipe(path)
pipeline = Pipeline(recipe, Path(recipe["output_dir"]), path)
for stage in STAGES:
    if not pipeline.configured(stage):
        print(f"[{stage}] not in the recipe")
        continue
    entry = recipe[stage] or {}
    if entry.get("recipe") and not Path(entry["recipe"]).is_file():
        raise SystemExit(f"[{stage}] recipe {entry['recipe']} does not exist")
    if stage in TRAINING_STAGES:
        print(f"[{stage}] accelerate launch {pipeline.launcher(stage)} -m tinyllm_hf.trainers.{stage} "
              + " ".join(pipeline.training_args(stage)))
    else:
        print(f"[{stage}] runs")
PY
  timeout 300 "$PYTHON" bench/pretrain_throughput.py --device cpu --presets tiny --variants tinyllm --rounds 1 \
    --steps 2 --warmup 1 --tokens-per-step 1024 --vocab-size 512 2>&1 | grep -v Warning | tail -4 || status=1
  bash -n "$0" || status=1
  if [[ ${*:-} == *pipeline* ]]; then  # the pipeline recipe itself, each stage for a step or two of the tiny preset
    CPU_RUN=/tmp/gpu-check/cpu-run
    rm -rf "$CPU_RUN"
    "$PYTHON" - "$CPU_RUN" <<'PY' || status=1
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

recipe = yaml.safe_load(open("bench/gpu_check_92m.yaml", encoding="utf-8"))
small = {"use_cpu": True, "bf16": False, "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4,
         "gradient_accumulation_steps": 1, "max_length": 256}
cpu = {
    "pretrain": {"model_preset": "tiny", "block_size": 256, "torch_compile": False, "optim": "adamw_torch",
                 "eval_steps": 2, "max_eval_samples": 8, "max_length": None},
    "sft": {"dtype": "float32", "eval_steps": 2, "max_eval_samples": 8, "heldout_eval_sizes": "sentiment=4"},
    "reward": {"max_eval_samples": 8, "task_sizes": "sentiment=16,idiom_meaning=8"},
    "dpo": {"task_sizes": "sentiment=16,idiom_meaning=8"},
    "grpo": {"max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4, "max_length": None},
}
recipe["output_dir"] = sys.argv[1]
recipe["accelerate"] = False
recipe["tokenizer"]["vocab_size"] = 8192
for stage, changes in cpu.items():
    args = {**recipe[stage]["args"], **small, **changes}
    recipe[stage]["args"] = {key: value for key, value in args.items() if value is not None}
recipe["eval"]["task_sizes"] = "sentiment=4,idiom_meaning=2"
recipe["eval"]["benchmarks"]["limit"] = 1
# Perplexity on 20 documents, not the whole validation split (minutes per model on a CPU).
texts = pq.read_table(".gpu/wikipedia/train-00000-of-00001.parquet", columns=["text"]).column("text").to_pylist()
open(f"{sys.argv[1]}-ppl.txt", "w", encoding="utf-8").write("\n".join(texts[-20:]) + "\n")
recipe["eval"]["args"] = {"max-new-tokens": 8, "text-file": f"{sys.argv[1]}-ppl.txt"}
recipe["quantize"]["drift"] = {"tasks": 4, "eval_chunks": 1, "task_tokens": 8}
path = f"{sys.argv[1]}.yaml"
yaml.safe_dump(recipe, open(path, "w", encoding="utf-8"), allow_unicode=True)
print(f"running {path} on the CPU")
sys.exit(subprocess.call([sys.executable, "-m", "tinyllm_hf.cli", "run", "--config", path]))
PY
  fi
  echo "dry run: $([[ $status == 0 ]] && echo ready || echo NOT ready)"
  exit $status
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
"$PYTHON" -c 'import torch, transformers, trl, datasets; print("torch", torch.__version__, "transformers",
  transformers.__version__, "trl", trl.__version__, "datasets", datasets.__version__)' 2>&1 | tee -a "$OUT/machine.txt"

if [[ $SECTIONS == *" mfu "* ]]; then  # one call per preset, each with its own limit: compiling takes most of it
  for preset in 92m 210m; do
    timeout "$(limit 120)" "$PYTHON" bench/pretrain_throughput.py --device cuda --presets $preset \
      --variants tinyllm compile compile-cudagraphs --vocab-size 32768 --tokens-per-step 65536 --rounds 1 --steps 12 \
      --warmup 4 2>&1 | grep -v Warning | tee "$OUT/throughput_$preset.txt"
  done
fi
if [[ $SECTIONS == *" pipeline "* ]]; then
  rm -rf "$RUN"
  start=$SECONDS
  timeout "$(limit 330)" "$PYTHON" -m tinyllm_hf.cli run --config bench/gpu_check_92m.yaml 2>&1 \
    | grep --line-buffered -v Warning > "$OUT/pipeline.log"
  echo "pipeline: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/pipeline.log"
  grep -E "^\[[a-z]+\] (finished|starting)|Error|error:" "$OUT/pipeline.log" | tail -30
  tar -czf "$OUT/pipeline_logs.tar.gz" -C "$RUN" logs 2>/dev/null
fi
if [[ $SECTIONS == *" moe "* ]]; then
  timeout "$(limit 120)" "$PYTHON" bench/pretrain_throughput.py --device cuda --presets moe-92m --variants tinyllm compile \
    --vocab-size 32768 --tokens-per-step 65536 --rounds 1 --steps 10 --warmup 3 2>&1 | grep -v Warning \
    | tee "$OUT/throughput_moe.txt"
fi
if [[ $SECTIONS == *" deepspeed "* ]]; then
  for run in zero2 zero3; do
    timeout "$(limit 150)" accelerate launch --config_file "recipes/accelerate/deepspeed_$run.yaml" --num_processes 1 \
      -m tinyllm_hf.trainers.pretrain --config recipes/pretrain/92m.yaml --tokenizer_name_or_path "$RUN/tokenizer/tokenizer" \
      --dataset_name .gpu/wikipedia --streaming false --max_steps 50 --warmup_steps 10 --eval_strategy no \
      --save_strategy no --logging_steps 10 --report_to none --output_dir "/tmp/pretrain-$run" 2>&1 \
      | tee "$OUT/deepspeed_$run.log" | grep -E "mfu|Error" | tail -3
  done
fi
if [[ $SECTIONS == *" speedrun "* ]]; then
  timeout "$(limit 120)" "$PYTHON" bench/speedrun.py --tokenizer "$RUN/tokenizer/tokenizer" --json "$OUT/speedrun.json" \
    -- --use_cpu false --bf16 true 2>&1 | grep -v Warning | tee "$OUT/speedrun.txt" | tail -3
fi

# The summary: the MFU table as the benchmark printed it, then the pipeline's stages.
"$PYTHON" - "$OUT" "$RUN" <<'PY' | tee "$OUT/summary.md"
import json
import sys
from pathlib import Path

out, run = Path(sys.argv[1]), Path(sys.argv[2])
machine = (out / "machine.txt").read_text().strip().splitlines() if (out / "machine.txt").exists() else []
print("Machine: " + "; ".join(machine))
for throughput in sorted(out.glob("throughput_*.txt")):
    lines = throughput.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    print(f"\nPretraining MFU, {throughput.stem.removeprefix('throughput_')} (bench/pretrain_throughput.py):\n")
    print("\n".join(table) if table else "\n".join(["stopped before its table; measured:"]
                                                  + [line for line in lines if line.startswith("  ")]))
if (out / "pipeline.log").exists():
    print("\nThe 92m pipeline on one GPU (bench/gpu_check_92m.yaml):\n")
    print("| stage | result | wall time (s) | steps | tokens | final loss |")
    print("|---|---|---:|---:|---:|---:|")
    import yaml

    from tinyllm_hf.runs import STAGES

    recipe = yaml.safe_load(open("bench/gpu_check_92m.yaml", encoding="utf-8"))
    for stage in (s for s in STAGES if recipe.get(s) is not None):
        summary = run / stage / "stage.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            loss = f"{s['final_loss']:.3f}" if s.get("final_loss") is not None else ""
            print(f"| {stage} | done | {s['wall_time_s']:.0f} | {s.get('steps') or ''} | {s.get('tokens') or ''} | {loss} |")
        elif (run / "logs" / f"{stage}.log").exists():
            print(f"| {stage} | FAILED or cut off (logs/{stage}.log in pipeline_logs.tar.gz) | | | | |")
        else:
            print(f"| {stage} | not reached | | | | |")
    state = run / "pretrain" / "trainer_state.json"
    if state.exists():
        logged = [e for e in json.loads(state.read_text())["log_history"] if "mfu" in e]
        if logged:
            e = logged[-1]
            print(f"\nPretraining stage, as the Trainer logged it at step {e['step']} (recipes/pretrain/92m.yaml, eager): "
                  f"{e['tokens_per_second']:,.0f} tokens/s, MFU {e['mfu']:.1%} against {e['peak_gflops'] / 1e3:.0f} "
                  "TFLOP/s" + (f", {e['mfu_vs_measured']:.1%} against the measured "
                               f"{e['measured_peak_gflops'] / 1e3:.0f} TFLOP/s" if "mfu_vs_measured" in e else ""))
PY
