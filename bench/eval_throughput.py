r"""C-Eval ppl-mode throughput (questions/s) of a `16m`-preset Tinyllm on CPU: batched against one by one.

Three ways to score the same questions, with the same prompts and the same results:
- per option:   one forward pass per (question, option): 4 passes per question, the naive way;
- per question: one pass per question: the four answer letters are one token each after the shared prompt, so
                `loglikelihoods` scores them from one pass (batch size 1);
- batched:      that, with `--batch-size` prompts per pass (left-padded, longest first).
Runs are interleaved and the median of `--rounds` rounds is reported. The weights are random (speed does not depend on
them); the tokenizer is trained here on the embedded corpus's validation split unless `--tokenizer` names one.
`--clock cpu` divides by process CPU time, which on a machine shared with other jobs measures the work done.

    python bench/eval_throughput.py [--ceval-dir ../shared/fixtures/ceval] [--shots 0] [--rounds 3] [--threads 2]
"""

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.evaluation.benchmarks import LETTERS, TARGET_DELIMITER, load_local
from tinyllm_hf.evaluation.engine import loglikelihoods
from tinyllm_hf.evaluation.mc import evaluate_multiple_choice, ppl_prompts
from tinyllm_hf.inference.runtime import TransformersRuntime

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DEFAULT_CEVAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ceval"


def load_tokenizer(path: str | None):
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from tinyllm_hf.data.corpus import load_corpus
    from tinyllm_hf.tokenizer.train import train_tokenizer

    return train_tokenizer(load_corpus("default", split="validation")["text"], vocab_size=8192)


def per_option(model, tokenizer, prompts) -> None:
    """The naive baseline: every (prompt, option) pair in its own forward pass."""
    for prompt in prompts:
        for letter in LETTERS:
            loglikelihoods(model, tokenizer, [(prompt.text, TARGET_DELIMITER + letter)], batch_size=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ceval-dir", default=str(DEFAULT_CEVAL), help="C-Eval folder (official layout)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--tokenizer", default=None, help="a trained tokenizer folder (default: train one here)")
    parser.add_argument("--preset", default="16m")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each subject")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)

    bench = load_local("ceval", args.ceval_dir, args.split)
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    config = TinyllmConfig.from_preset(args.preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = TinyllmForCausalLM(config).eval()
    runtime = TransformersRuntime(model, tokenizer)

    bench.questions = {s: qs[: args.limit] for s, qs in bench.questions.items()}
    questions = [q for qs in bench.questions.values() for q in qs]
    prompts = ppl_prompts(bench, questions, args.shots, tokenizer, config.max_position_embeddings)
    runs = {
        "per option": lambda: per_option(model, tokenizer, prompts),
        "per question": lambda: evaluate_multiple_choice(runtime, bench, "ppl", args.shots, 1, progress=False),
        f"batched ({args.batch_size})": lambda: evaluate_multiple_choice(
            runtime, bench, "ppl", args.shots, args.batch_size, progress=False
        ),
    }
    times = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is discarded
        for name, run in runs.items():
            start = clock()
            run()
            if round_index:
                times[name].append(clock() - start)

    mean_tokens = statistics.mean(len(tokenizer(p.text).input_ids) for p in prompts)
    date = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    print(f"\n## Evaluation throughput: C-Eval ppl mode, {args.preset} preset on CPU ({date})\n")
    print(
        f"`python bench/eval_throughput.py --limit {args.limit} --shots {args.shots} --batch-size {args.batch_size} --rounds {args.rounds} "
        f"--threads {args.threads} --clock {args.clock}`: {cpu}, {args.threads} threads, torch {torch.__version__}; "
        f"{len(questions)} C-Eval {args.split} questions, {args.shots}-shot, {mean_tokens:.0f} prompt tokens on average "
        f"(vocab {len(tokenizer)}, {model.num_parameters() / 1e6:.1f}M parameters, random weights); "
        f"median of {args.rounds} interleaved rounds, {args.clock} clock.\n"
    )
    print("| scoring | questions/s | speed-up over per option |")
    print("|---|---|---|")
    base = statistics.median(times["per option"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {len(questions) / median:.1f} | {base / median:.2f}x |")
    batched, single = (statistics.median(times[k]) for k in (f"batched ({args.batch_size})", "per question"))
    print(f"\nBatched vs one by one (per question): {single / batched:.2f}x.")


if __name__ == "__main__":
    main()
