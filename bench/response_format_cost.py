"""The cost per token of `response_format` (llguidance's token mask in the sampler), tiny preset, CPU.

Decodes the same prompts with and without a JSON grammar in one process, rounds interleaved, and prints the median
ratio of tokens/s constrained / unconstrained: one sequence alone (every step pays the mask), and a batch of 8 where
one row is constrained (what the other rows of a continuous batch pay). The schema asks for an object with a string of
at least 400 characters, so every row runs its whole budget (equal token counts on both sides) and most steps are
inside a JSON string, where the grammar allows most of the vocabulary: the mask's costliest state. Random weights: the
text is noise, but the grammar's work per token is what a trained model's JSON costs too.

    python bench/response_format_cost.py [--rounds 5] [--tokens 64] [--vocab 6400] [--threads 1]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import review_lines  # noqa: E402

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM  # noqa: E402
from tinyllm_hf.inference.grammar import Grammar, json_grammar  # noqa: E402
from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime, stream_batch  # noqa: E402
from tinyllm_hf.tokenizer.train import train_tokenizer  # noqa: E402

LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 400}}, "required": ["text"]}


def tokens_per_s(runtime, prompts, params) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in stream_batch(runtime, prompts, params, eos_token_ids=()))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/tinyllm-response-format-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = train_tokenizer(review_lines(4000), vocab_size=args.vocab, output_dir=Path(args.workdir) / "tok",
                                overwrite=True)
    torch.manual_seed(0)
    config = TinyllmConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
    runtime = TransformersRuntime(TinyllmForCausalLM(config), tokenizer)
    start = time.perf_counter()
    grammar = Grammar(runtime.grammar_tokenizer, json_grammar(LONG_TEXT))
    setup = time.perf_counter() - start
    prompts = [runtime.encode_chat([{"role": "user", "content": line}]) for line in review_lines(16)[:8]]

    plain = SamplingParams(args.tokens, temperature=1.0, seed=0)
    constrained = SamplingParams(args.tokens, temperature=1.0, seed=0, grammar=grammar)
    cases = {
        "one sequence": ([prompts[0]], [plain], [constrained]),
        "batch of 8, one row constrained": (prompts, [plain] * 8, [constrained] + [plain] * 7),
    }
    print(f"tiny preset, vocab {len(tokenizer)}, {args.tokens} tokens per row, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"tokenizer conversion + grammar compile {setup * 1000:.0f} ms")
    for name, (rows, unconstrained_params, constrained_params) in cases.items():
        ratios, speeds = [], []
        for round_index in range(args.rounds + 1):  # round 0 warms up and is discarded
            order = [("plain", unconstrained_params), ("json", constrained_params)]
            if round_index % 2:
                order.reverse()
            measured = {label: tokens_per_s(runtime, rows, params) for label, params in order}
            if round_index:
                ratios.append(measured["json"] / measured["plain"])
                speeds.append(measured["plain"])
        print(f"{name}: constrained/unconstrained tokens/s = {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}; unconstrained {statistics.median(speeds):.0f} tok/s)")


if __name__ == "__main__":
    main()
