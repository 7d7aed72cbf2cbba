r"""C-Eval / CMMLU ppl-mode throughput (questions/s) of a Tinyllm preset on CPU: batched against one by one.

Three ways to score the same questions, with the same prompts and the same results:
- per option:   one forward pass per (question, option): 4 passes per question, the naive way;
- per question: one pass per question: the four answer letters are one token each after the shared prompt, so
                `loglikelihoods` scores them from one pass (batch size 1);
- batched:      that, with `--batch-size` prompts per pass (left-padded, longest first).
Runs are interleaved and the median of `--rounds` rounds is reported. The weights are random (speed does not depend on
them); the tokenizer is trained here on the embedded corpus's validation split unless `--tokenizer` names one.
`--clock cpu` divides by process CPU time, which on a machine shared with other jobs measures the work done.
`--replicate-to N` cycles the questions (subject by subject) up to N in all, e.g. 11582 for the size of the full CMMLU
test split when only a few subjects are at hand; the two one-by-one baselines then score the first
`--baseline-questions` of them (their rate, questions/s, is what is compared).

    python bench/eval_throughput.py [--benchmark ceval] [--data-dir ../shared/fixtures/ceval] [--shots 0] [--rounds 3]
    python bench/eval_throughput.py --benchmark cmmlu --replicate-to 11582 --preset tiny --rounds 1 --clock cpu
"""

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.evaluation.benchmarks import BENCHMARKS, DEFAULT_SPLIT, LETTERS, TARGET_DELIMITER, Benchmark, load_local
from tinyllm_hf.evaluation.engine import loglikelihoods
from tinyllm_hf.evaluation.mc import evaluate_multiple_choice, ppl_prompts
from tinyllm_hf.inference.runtime import TransformersRuntime

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


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


def replicate(bench: Benchmark, total: int) -> None:
    """Cycle each subject's questions (in turn, subject by subject) until the benchmark holds `total` questions."""
    pools = {subject: list(questions) for subject, questions in bench.questions.items()}
    grown = {subject: [] for subject in pools}
    subjects = list(pools)
    for i in range(total):
        subject = subjects[i % len(subjects)]
        pool = pools[subject]
        grown[subject].append(pool[len(grown[subject]) % len(pool)])
    bench.questions = grown


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="ceval")
    parser.add_argument("--data-dir", default=None, help="the benchmark's folder, official layout (default: the shared "
                        "fixtures)")
    parser.add_argument("--split", default=None, help="default: C-Eval val, CMMLU test")
    parser.add_argument("--replicate-to", type=int, default=None, help="cycle the questions up to this many in all")
    parser.add_argument("--baseline-questions", type=int, default=None,
                        help="score only the first N questions in the one-by-one baselines (default: all)")
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

    split = args.split or DEFAULT_SPLIT[args.benchmark]
    bench = load_local(args.benchmark, args.data_dir or FIXTURES / args.benchmark, split)
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    config = TinyllmConfig.from_preset(args.preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = TinyllmForCausalLM(config).eval()
    runtime = TransformersRuntime(model, tokenizer)

    bench.questions = {s: qs[: args.limit] for s, qs in bench.questions.items()}
    if args.replicate_to:
        replicate(bench, args.replicate_to)
    questions = [q for qs in bench.questions.values() for q in qs]
    prompts = ppl_prompts(bench, questions, args.shots, tokenizer, config.max_position_embeddings)
    baseline_n = min(args.baseline_questions or len(questions), len(questions))
    baseline = Benchmark(bench.name, bench.split, {}, bench.dev, bench.subject_names, bench.categories)
    for q in questions[:baseline_n]:
        baseline.questions.setdefault(q.subject, []).append(q)
    counts = {"per option": baseline_n, "per question": baseline_n, f"batched ({args.batch_size})": len(questions)}
    runs = {
        "per option": lambda: per_option(model, tokenizer, prompts[:baseline_n]),
        "per question": lambda: evaluate_multiple_choice(runtime, baseline, "ppl", args.shots, 1, progress=False),
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
    title = {"ceval": "C-Eval", "cmmlu": "CMMLU"}[args.benchmark]
    print(f"\n## Evaluation throughput: {title} ppl mode, {args.preset} preset on CPU ({date})\n")
    print(
        f"`python bench/eval_throughput.py --benchmark {args.benchmark} --preset {args.preset} --limit {args.limit} "
        f"--replicate-to {args.replicate_to} --baseline-questions {args.baseline_questions} --shots {args.shots} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --threads {args.threads} --clock {args.clock}`: {cpu}, "
        f"{args.threads} threads, torch {torch.__version__}; {len(questions)} {title} {split} questions "
        f"({baseline_n} in the one-by-one baselines), {args.shots}-shot, {mean_tokens:.0f} prompt tokens on average "
        f"(vocab {len(tokenizer)}, {model.num_parameters() / 1e6:.1f}M parameters, random weights); "
        f"median of {args.rounds} interleaved rounds, {args.clock} clock.\n"
    )
    print("| scoring | questions | questions/s | speed-up over per option |")
    print("|---|---|---|---|")
    rate = {name: counts[name] / statistics.median(samples) for name, samples in times.items()}
    for name in times:
        print(f"| {name} | {counts[name]:,} | {rate[name]:.1f} | {rate[name] / rate['per option']:.2f}x |")
    batched = rate[f"batched ({args.batch_size})"]
    print(f"\nBatched vs one by one (per question): {batched / rate['per question']:.2f}x; all {len(questions):,} "
          f"questions batched in {len(questions) / batched:.0f} s.")


if __name__ == "__main__":
    main()
