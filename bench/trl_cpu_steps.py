"""What the two CPU choices for TRL's trainers gain: `tinyllm sft` and `tinyllm dpo` as shipped, and with each choice
switched off, as whole processes on the same model and data.

- SFT `hidden-state loss` (`HiddenStateLossMixin`): a Tinyllm model's SFT steps take the loss from the hidden states
  at the answer tokens only. Off: TRL's fused LM head (log-probabilities, entropy and top-1 hits).
- `labelled positions only` (`score_only_labelled_positions_on_cpu`): TRL's fused head scores only positions with a
  label on a CPU. Off: every position, prompts and padding included (TRL's choice for devices without Triton).

Each variant runs the stage's recipe for --steps optimizer steps (no checkpoints, no held-out generation) into its own
folder, in interleaved rounds; printed: the median over rounds of the training seconds per step and of the whole
process, the ratio to the shipped variant of the same round (> 1: the shipped choice is faster), and the last logged
loss (equal losses: the choice changes speed, not training).

    python bench/trl_cpu_steps.py --sft-model runs/quickstart/pretrain --dpo-model runs/quickstart/sft [--steps 40]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Runs one stage in a fresh process with the named choices switched off, then prints its trainer state's summary.
RUN = """
import json, sys
off = set(sys.argv[1].split(",")) - {""}
import tinyllm_hf.trainers.common as common
if "labelled" in off:  # TRL's own choice: every position scored
    common.score_only_labelled_positions_on_cpu = lambda: None
if "hidden" in off:  # the parent's (TRL's) loss in every step
    def parent_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super(common.HiddenStateLossMixin, self).compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    common.HiddenStateLossMixin.compute_loss = parent_loss
stage = __import__(f"tinyllm_hf.trainers.{sys.argv[2]}", fromlist=["main"])
assert stage.main(sys.argv[3:]) == 0
"""
VARIANTS = {
    "sft": {"as shipped": "", "TRL's fused head": "hidden", "TRL's fused head, every position": "hidden,labelled"},
    "dpo": {"as shipped": "", "every position": "labelled"},
}


def run(stage: str, off: str, model: str, steps: int, output_dir: Path) -> dict:
    args = ["--config", f"recipes/{stage}/quickstart.yaml", "--model_name_or_path", model,
            "--output_dir", str(output_dir), "--max_steps", str(steps), "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", str(steps)]
    if stage == "sft":
        args += ["--eval_strategy", "no", "--heldout_eval_sizes", ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, off, stage, *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    train = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    return {"step": train / steps, "wall": wall, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-model", default="runs/quickstart/pretrain", help="pretrained model for `tinyllm sft`")
    parser.add_argument("--dpo-model", default="runs/quickstart/sft", help="SFT model for `tinyllm dpo`")
    parser.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    models = {"sft": args.sft_model, "dpo": args.dpo_model}
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.steps} steps, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as scratch:
        for stage in args.stages:
            results = {name: [] for name in VARIANTS[stage]}
            for round_index in range(args.rounds):
                names = list(VARIANTS[stage])
                names = names[round_index % len(names):] + names[: round_index % len(names)]  # rotate the order
                for name in names:
                    out = Path(scratch) / f"{stage}-{round_index}-{len(results[name])}-{abs(hash(name))}"
                    results[name].append(run(stage, VARIANTS[stage][name], models[stage], args.steps, out))
                    print(f"  {stage} round {round_index + 1}: {name}: {results[name][-1]}", file=sys.stderr)
            shipped = results["as shipped"]
            print(f"\n| `tinyllm {stage}` | s/step | whole process (s) | step ratio | process ratio | last loss |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, runs in results.items():
                step_ratio = statistics.median(r["step"] / s["step"] for r, s in zip(runs, shipped))
                wall_ratio = statistics.median(r["wall"] / s["wall"] for r, s in zip(runs, shipped))
                print(f"| {name} | {statistics.median(r['step'] for r in runs):.3f} | "
                      f"{statistics.median(r['wall'] for r in runs):.1f} | {step_ratio:.2f}x | {wall_ratio:.2f}x | "
                      f"{runs[-1]['loss']:.4f} |")


if __name__ == "__main__":
    main()
