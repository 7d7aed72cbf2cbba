r"""Pretraining throughput: tokens/s and MFU of Tinyllm against a plain `LlamaForCausalLM` under the same Trainer.

For each preset, the Llama twin has the same config and weights (`tinyllm_to_llama_model`). Every variant trains with
`PretrainTrainer` (the class `tinyllm pretrain` uses) on random packed blocks (speed does not depend on the data) for
`--steps` optimizer steps per round; rounds are interleaved (tinyllm, llama, tinyllm+bf16, ...) so that a busy machine
slows all of them alike, and the matmul peak of each precision in use (fp32, and bf16 for bf16 variants) is measured
again before every round (its best value is used).
The order of the variants rotates every round. Reported: median step time over all rounds (the first `--warmup` steps
of every round dropped), the median process CPU time per step (all threads; on a busy machine it shows the work done
when the wall clock shows the wait), tokens/s, and
MFU = tokens/s x FLOPs/token / peak of the variant's precision, with FLOPs/token =
6 x (matmul weights) + 12 x layers x attention width x seq_len (see `tinyllm_hf.trainers.common.matmul_flops_per_token`);
on a GPU that the datasheet table lists (`DATASHEET_PEAK_TFLOPS`) a second column gives MFU against its dense bf16
peak, as the Trainer logs it there.

    python bench/pretrain_throughput.py [--presets tiny 16m] [--variants tinyllm llama bf16 compile foreach]
                                        [--rounds 3] [--steps 6] [--tokens-per-step 4096] [--threads 2]

On a GPU (`--device cuda`) every variant trains in bf16 autocast and the peak is the best bf16 8192^3 matmul, e.g.
    python bench/pretrain_throughput.py --device cuda --presets 92m 210m --variants tinyllm llama compile \
        --tokens-per-step 65536 --steps 10 --warmup 3
`compile-cudagraphs` compiles with mode "reduce-overhead" (CUDA graphs), `compile-autotune` with
"max-autotune-no-cudagraphs" (Triton matmul autotuning; minutes of compilation). MoE presets have no Llama twin;
their `llama` row is left out.
"""

import argparse
import datetime
import logging
import platform
import statistics
import tempfile
import time

import datasets
import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.data.packing import collate_blocks
from tinyllm_hf.modeling.convert import tinyllm_to_llama_model
from tinyllm_hf.trainers.common import datasheet_peak_flops, matmul_flops_per_token, measure_matmul_peak
from tinyllm_hf.trainers.pretrain import PretrainTrainer

VOCAB_SIZE = 8192  # the tokenizer's default vocabulary (the 92m pipeline's is 32768: --vocab-size)
# name -> (model to use, TrainingArguments changes)
VARIANTS = {
    "tinyllm": ("tinyllm", {}),
    "llama": ("llama", {}),
    "bf16": ("tinyllm", {"bf16": True}),  # bf16 autocast, fp32 master weights
    "compile": ("tinyllm", {"torch_compile": True}),
    "compile-cudagraphs": ("tinyllm", {"torch_compile": True, "torch_compile_mode": "reduce-overhead"}),
    "compile-autotune": ("tinyllm", {"torch_compile": True, "torch_compile_mode": "max-autotune-no-cudagraphs"}),
    "foreach": ("tinyllm", {"optim": "adamw_torch"}),  # the multi-tensor AdamW instead of the default fused one
}


class StepTimer(TrainerCallback):
    """(wall, process CPU) time at the end of every step. On a GPU it waits for the device first: training steps do
    not (no host syncs), so without it a step's time would be the host's, queuing work ahead of the device."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        self.ends.append((time.perf_counter(), time.process_time()))


def random_blocks(n_blocks: int, block_size: int, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({"input_ids": rng.integers(0, vocab_size, (n_blocks, block_size), dtype=np.int32)})


def training_changes(name: str, device: str) -> dict:
    """A variant's TrainingArguments changes; on a GPU every variant trains in bf16 autocast."""
    changes = VARIANTS[name][1]
    return {"bf16": True, **changes} if device == "cuda" else changes


def step_times(model, blocks, batch_size: int, steps: int, warmup: int, changes: dict, output_dir: str,
               device: str) -> list[tuple]:
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=device == "cpu", per_device_train_batch_size=batch_size, max_steps=steps + warmup,
        learning_rate=1e-4, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10_000,
        dataloader_num_workers=0, **changes,
    )
    timer = StepTimer()
    trainer = PretrainTrainer(model=model, args=args, train_dataset=blocks, data_collator=collate_blocks, callbacks=[timer])
    trainer.train()
    if device == "cuda":
        model.cpu()  # free the GPU for the next variant
        torch.cuda.empty_cache()
    intervals = np.diff(np.array(timer.ends), axis=0).tolist()  # [(wall, cpu)] per step
    return intervals[warmup - 1:]  # the interval ending at step warmup+1 is the first steady one


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "16m"])
    parser.add_argument("--variants", nargs="+", default=["tinyllm", "llama", "bf16", "compile", "foreach"],
                        choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)

    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        config = TinyllmConfig.from_preset(preset, vocab_size=args.vocab_size)
        block_size = config.max_position_embeddings
        batch_size = max(args.tokens_per_step // block_size, 1)
        tokens_per_step = batch_size * block_size
        blocks = random_blocks(batch_size * (args.steps + args.warmup), block_size, args.vocab_size)
        tinyllm = TinyllmForCausalLM(config)
        models = {"tinyllm": tinyllm}
        if not config.num_experts:
            models["llama"] = tinyllm_to_llama_model(tinyllm)
        # Each variant trains its own copy, so an optimizer step of one never changes another's weights.
        copies = {name: type(models[kind])(models[kind].config) for name, (kind, _) in VARIANTS.items()
                  if name in args.variants and kind in models}
        for name, model in copies.items():
            model.load_state_dict(models[VARIANTS[name][0]].state_dict())
        flops_per_token = matmul_flops_per_token(tinyllm, block_size)
        times = {name: [] for name in copies}
        # The dtype each variant's matmuls run in, and its measured peaks: a bf16 variant is measured against the bf16
        # matmul peak, as the Trainer's MFU is.
        precision = {name: torch.bfloat16 if training_changes(name, args.device).get("bf16") else torch.float32
                     for name in copies}
        peaks = {dtype: [] for dtype in set(precision.values())}
        with tempfile.TemporaryDirectory() as tmp:
            names = list(copies)
            for round_index in range(args.rounds):
                for dtype in peaks:
                    peaks[dtype].append(measure_matmul_peak(args.device, dtype))
                # Rotate the order every round so that no variant always runs first (or right after the peak test).
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name] += step_times(copies[name], blocks, batch_size, args.steps, args.warmup,
                                              training_changes(name, args.device), tmp, args.device)
        n_params = sum(p.numel() for p in tinyllm.parameters())
        for name in copies:
            step = statistics.median(wall for wall, _ in times[name])
            cpu = statistics.median(cpu for _, cpu in times[name])
            tokens_per_second = tokens_per_step / step
            peak = max(peaks[precision[name]])
            rows.append((preset, n_params, name, step, cpu, tokens_per_second, tokens_per_second * flops_per_token / peak,
                         flops_per_token))
        measured = ", ".join(f"{str(dtype).removeprefix('torch.')} {max(p) / 1e9:.1f} (min {min(p) / 1e9:.1f})"
                             for dtype, p in peaks.items())
        print(f"{preset}: {flops_per_token / 1e6:.2f} MFLOP/token, matmul peak GFLOP/s, best of {args.rounds}: {measured}",
              flush=True)
        for row in rows:  # as soon as a preset is done: a run stopped at a time limit keeps what it measured
            if row[0] == preset:
                print(f"  {row[2]}: {row[5]:,.0f} tokens/s, MFU {row[6]:.1%} (measured peak)", flush=True)

    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    datasheet = datasheet_peak_flops(machine, torch.bfloat16) if args.device == "cuda" else None
    header = "| preset | params | variant | median step (s) | CPU s/step | tokens/s | MFU | vs llama |"
    rule = "|---|---|---|---|---|---|---|---|"
    if datasheet:
        header += f" MFU vs datasheet ({datasheet / 1e12:.0f} TFLOP/s bf16) |"
        rule += "---|"
    lines = [header, rule]
    for preset, n_params, name, step, cpu, tps, mfu, flops_per_token in rows:
        llama = next((r[5] for r in rows if r[0] == preset and r[2] == "llama"), None)
        ratio = f"{tps / llama:.2f}" if llama else "-"
        line = f"| {preset} | {n_params / 1e6:.2f}M | {name} | {step:.3f} | {cpu:.3f} | {tps:,.0f} | {mfu:.1%} | {ratio} |"
        if datasheet:
            line += f" {tps * flops_per_token / datasheet:.1%} |"
        lines.append(line)
    print(f"\n{datetime.date.today()}, {machine}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.tokens_per_step} tokens/step, vocab {args.vocab_size}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
