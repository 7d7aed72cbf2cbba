"""The Chinese speedrun: wall time for pretraining to reach a fixed validation bits per character (docs/speedrun.md).

    python bench/speedrun.py --tokenizer runs/quickstart/tokenizer/tokenizer               # the quickstart recipe, 2 CPU cores
    python bench/speedrun.py --tokenizer T --recipe R.yaml -- --learning_rate 3e-3  # a change to try (recipe flags)

The target is bits per character on the whole validation split of the embedded default corpus (2,675 documents,
162,321 characters), scored by `tinyllm_hf.evaluation.perplexity` (each document on its own, after the EOS
separator). Bits per character do not depend on the tokenizer, so a run may change the tokenizer, the model, the data
order or the optimizer: anything but the validation text and the scoring.

The clock runs from the start of the first training step to the first check that reaches the target; the checks
themselves (every `--check-every` steps) are left out of it, and so is everything before training: tokenizing and
packing the corpus (cached by `datasets` after the first run, so counting it would favour the second run of a change),
building the model, training the tokenizer (an input: `tinyllm tokenizer`). The recipe's
own evaluation, checkpoints, reports and loss curve are switched off, as they are not part of reaching the target.
Prints one line per check and a result row for the table in docs/speedrun.md; exits 1 if the target is not reached.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from tinyllm_hf.evaluation.perplexity import load_texts, perplexity
from tinyllm_hf.report import cpu_name
from tinyllm_hf.rope_scaling import model_context
from tinyllm_hf.trainers import pretrain
from tinyllm_hf.trainers.common import parse_recipe

# Reached by the quickstart pretraining recipe near its end (at step 700 of 800): docs/speedrun.md.
TARGET_BITS_PER_CHAR = 6.63
REPO = Path(__file__).resolve().parents[1]


class SpeedrunClock(TrainerCallback):
    """Scores the validation text every `check_every` optimizer steps (and at the last one) with the clock stopped,
    and ends training at the first score at or below `target`."""

    def __init__(self, texts: list[str], target: float, check_every: int, block_size: int | None):
        self.texts, self.target, self.check_every = texts, target, check_every
        self.started = None
        self.block_size = block_size  # None: the model's context
        self.paused = 0.0  # seconds spent in checks
        self.checks: list[dict] = []
        self.reached: dict | None = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.check_every and state.global_step < state.max_steps:
            return
        pause = time.perf_counter()
        seconds = pause - self.started - self.paused
        was_training = model.training
        model.eval()
        score = perplexity(model, processing_class, self.texts, batch_size=64, progress=False)
        model.train(was_training)
        check = {"step": state.global_step, "seconds": round(seconds, 3), "bits_per_char": round(score["bits_per_char"], 4),
                 "tokens": state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
                 * self.block_size}
        self.checks.append(check)
        print(f"step {check['step']:>6}  {check['seconds']:>8.1f} s  {check['bits_per_char']:.4f} bits/char", flush=True)
        if score["bits_per_char"] <= self.target:
            self.reached = check
            control.should_training_stop = True
        self.paused += time.perf_counter() - pause

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.block_size = self.block_size or model_context(model.config)  # as the pretraining stage packs it
        self.started = time.perf_counter()


def machine() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    return f"{torch.get_num_threads()} CPU threads ({cpu_name()})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (tinyllm tokenizer --corpus default)")
    parser.add_argument("--recipe", default=str(REPO / "recipes/pretrain/quickstart.yaml"), help="pretraining recipe")
    parser.add_argument("--target", type=float, default=TARGET_BITS_PER_CHAR,
                        help=f"validation bits per character to reach (the fixed target: {TARGET_BITS_PER_CHAR})")
    parser.add_argument("--check-every", type=int, default=50, help="optimizer steps between checks")
    parser.add_argument("--output-dir", default=None, help="where the model goes (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the checks and the result to this JSON file")
    parser.add_argument("recipe_flags", nargs=argparse.REMAINDER, help="after --: flags for the pretraining recipe")
    args = parser.parse_args(argv)
    if args.check_every < 1:
        parser.error(f"--check-every must be at least 1, not {args.check_every}")
    if not math.isfinite(args.target) or args.target <= 0:
        parser.error(f"--target must be a positive number of bits per character, not {args.target}")
    flags = [f for f in args.recipe_flags if f != "--"]
    texts = load_texts("default")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speedrun-") as scratch:
        output_dir = args.output_dir or scratch
        model_args, data_args, training_args, run_args = parse_recipe(
            pretrain.ARGUMENTS,
            ["--config", args.recipe, "--tokenizer_name_or_path", args.tokenizer, "--output_dir", output_dir,
             "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--loss_curve", "false",
             "--disable_tqdm", "true", *flags],
            defaults=pretrain.DEFAULTS, prog="speedrun",
        )
        clock = SpeedrunClock(texts, args.target, args.check_every, data_args.block_size)
        pretrain.train(model_args, data_args, training_args, run_args, callbacks=[clock])
    result = {
        "target_bits_per_char": args.target,
        "reached": clock.reached is not None,
        **(clock.reached or clock.checks[-1]),
        "whole_process_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "recipe": os.path.relpath(args.recipe, REPO) if Path(args.recipe).is_relative_to(REPO) else args.recipe,
        "flags": " ".join(flags),
        "checks": clock.checks,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if clock.reached is None:
        print(f"target {args.target} bits/char NOT reached: best {min(c['bits_per_char'] for c in clock.checks):.4f} "
              f"after {clock.checks[-1]['step']} steps ({clock.checks[-1]['seconds']:.1f} s)")
        return 1
    print(f"| {result['date']} | {result['machine']} | {result['recipe']} {result['flags']} | "
          f"**{result['seconds']:.1f} s** | {result['step']} | {result['tokens'] / 1e6:.2f}M | {result['bits_per_char']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
