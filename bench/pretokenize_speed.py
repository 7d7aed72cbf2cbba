"""Pre-tokenization throughput per CPU core, the cost of reading the saved blocks, and the time a resumed run takes to
its first step, early and late in the same run, for docs/training.md and docs/benchmarks.md.

    python bench/pretokenize_speed.py --tokenizer runs/tok32k [--corpus default] [--num-proc 1,2] \
        [--resume-steps 10,1000] [--json out.json]

1. Tokenize + pack: `pack_dataset` (what `tinyllm pretokenize` runs) over the corpus's train split with each
   `--num-proc`, datasets' cache off (nothing reused); tokens/s and tokens/s per process.
2. Read: the blocks saved by `pretokenize`, memory-mapped, through a DataLoader with `collate_blocks` as the Trainer
   batches them (one process, no workers); tokens/s.
3. Resume: one tiny-model run on the pre-tokenized blocks saves checkpoints at each `--resume-steps` step; each is
   resumed in a fresh folder and the seconds from `trainer.train()` to the end of its first step are measured. The
   same for the streaming path (`streaming: true`), which re-reads and re-tokenizes every trained batch to resume.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, TrainerCallback

from tinyllm_hf.data.corpus import load_corpus
from tinyllm_hf.data.packing import collate_blocks, pack_dataset
from tinyllm_hf.data.pretokenized import pretokenize
from tinyllm_hf.trainers import pretrain
from tinyllm_hf.trainers.common import parse_recipe


def tokenize_rate(corpus, tokenizer, block_size: int, num_proc: int) -> dict:
    datasets.disable_caching()
    try:
        start = time.perf_counter()
        blocks = pack_dataset(corpus["train"], tokenizer, block_size, num_proc=num_proc if num_proc > 1 else None)
        seconds = time.perf_counter() - start
    finally:
        datasets.enable_caching()
    tokens = len(blocks) * block_size
    return {"num_proc": num_proc, "documents": len(corpus["train"]), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "tokens_per_s_per_process": round(tokens / seconds / num_proc)}


def read_rate(folder: Path, batch_size: int = 32, max_batches: int = 2000) -> dict:
    train = datasets.load_from_disk(str(folder))["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate_blocks,
                                         generator=torch.Generator().manual_seed(0))
    tokens, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        tokens += batch["input_ids"].numel()
        if i + 1 == max_batches:
            break
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}


class SaveAt(TrainerCallback):
    """Saves a checkpoint after each of `steps` (and only then)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class FirstStep(TrainerCallback):
    """Notes when the first (resumed) step ends, and stops training there."""

    def __init__(self):
        self.first_step_end = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()
        control.should_training_stop = True  # one resumed step is what is measured


def run_args(tokenizer_dir, corpus, out, max_steps, **extra) -> list[str]:
    values = {"tokenizer_name_or_path": tokenizer_dir, "dataset_name": corpus, "output_dir": out,
              "config_overrides": "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
                                  "max_position_embeddings=64",
              "per_device_train_batch_size": 8, "max_steps": max_steps, "save_strategy": "no", "eval_strategy": "no",
              "report_to": "none", "loss_curve": "false", "peak_flops": 1e11, "use_cpu": "true", "logging_steps": 100,
              "dataloader_num_workers": 0, "max_eval_samples": 8, **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def resume_times(tokenizer_dir, corpus, work: Path, steps: list[int], label: str, **extra) -> dict:
    """Train once to max(steps) + 1 with checkpoints at `steps`; resume each in a fresh folder, time to its first step."""
    source = work / f"{label}-run"
    pretrain.train(*parse_recipe(pretrain.ARGUMENTS, run_args(tokenizer_dir, corpus, source, max(steps) + 1, **extra),
                                 defaults=pretrain.DEFAULTS), callbacks=[SaveAt(steps)])
    times = {}
    for step in steps:
        folder = work / f"{label}-resume-{step}"
        shutil.copytree(source / f"checkpoint-{step}", folder / f"checkpoint-{step}")
        first = FirstStep()
        args = run_args(tokenizer_dir, corpus, folder, max(steps) + 1, resume="true", **extra)
        parsed = parse_recipe(pretrain.ARGUMENTS, args, defaults=pretrain.DEFAULTS)
        start = time.perf_counter()
        pretrain.train(*parsed, callbacks=[first])
        times[step] = round(first.first_step_end - start, 2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--num-proc", default="1,2", help="tokenize with each of these process counts ('': skip)")
    parser.add_argument("--resume-steps", default="10,1000", help="checkpoint steps to resume from ('': skip)")
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    corpus = load_corpus(args.corpus)
    result = {"tokenizer": args.tokenizer, "vocab_size": len(tokenizer), "block_size": args.block_size}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.num_proc:
            result["tokenize"] = [tokenize_rate(corpus, tokenizer, args.block_size, int(n))
                                  for n in args.num_proc.split(",")]
            pretokenize(args.corpus, tokenizer, args.block_size, work / "blocks")
            result["read"] = read_rate(work / "blocks")
            print(json.dumps({key: result[key] for key in ("tokenize", "read")}, indent=1), flush=True)
        if not args.resume_steps:
            return print_json(result, args.json)
        steps = [int(s) for s in args.resume_steps.split(",")]
        result["resume_seconds"] = {
            "pretokenized": resume_times(args.tokenizer, args.corpus, work, steps, "blocks",
                                         tokenized_dataset=work / "blocks64", block_size=64)}
        if not args.skip_streaming:
            result["resume_seconds"]["streaming"] = resume_times(args.tokenizer, args.corpus, work, steps, "stream",
                                                                 streaming="true", shuffle_buffer_size=1000,
                                                                 block_size=64)
    print_json(result, args.json)


def print_json(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=1), flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
