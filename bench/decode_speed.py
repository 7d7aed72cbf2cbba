"""Single-stream decode speed and time to first token of a checkpoint on every runtime, side by side in one process,
and the runtime `--backend auto` chooses for one stream (what `tinyllm chat` runs by default).

    python bench/decode_speed.py --model runs/quickstart/sft [--threads 1] [--rounds 3] [--tokens 128]

Each runtime gets the same prompts: a short chat prompt, decoded for `--tokens` greedy tokens with EOS ignored (tok/s;
best of `--rounds`, in rotating order), and a 200-token prompt, timed from the call to its first new token (prefill
included; median of `--rounds`). The runtimes: transformers fp32, ONNX Runtime fp32 and llama.cpp f16, from the same
cached exports `--backend auto` uses (`TINYLLM_CACHE`). Prints a markdown table and the ratio of the default to
llama.cpp f16.
"""

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tinyllm_hf.inference import runtime_choice
from tinyllm_hf.inference.model_files import missing_runtime
from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime, stream
from tinyllm_hf.inference.runtime_choice import checkpoint_fingerprint, choose_runtime

LONG_PROMPT_TOKENS = 200


def decode_rate(runtime, prompt: list[int], tokens: int) -> float:
    started = time.perf_counter()
    produced = sum(1 for _ in stream(runtime, prompt, SamplingParams(tokens, temperature=0.0), eos_token_ids=()))
    return produced / (time.perf_counter() - started)


def first_token_seconds(runtime, prompt: list[int]) -> float:
    started = time.perf_counter()
    next(stream(runtime, prompt, SamplingParams(1, temperature=0.0), eos_token_ids=()))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a float32 checkpoint folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    log = io.StringIO()
    default = choose_runtime(args.model, streams=1, threads=args.threads, log=log)
    choice = log.getvalue().strip()
    reference = TransformersRuntime.from_pretrained(args.model)
    folder = runtime_choice.cache_root() / checkpoint_fingerprint(Path(args.model))
    runtimes = {"transformers fp32": reference}
    for backend, label in (("onnx", "onnx fp32"), ("llamacpp", "llama.cpp f16")):
        if runtime_choice.unavailable_backends()[backend] is None:
            runtimes[label] = runtime_choice.load_export(backend, runtime_choice.cached_export(backend, args.model, folder),
                                                    args.threads)
        else:
            print(f"{label}: {missing_runtime('onnx' if backend == 'onnx' else 'gguf')}", file=sys.stderr)
    short = reference.encode_chat([{"role": "user", "content": "你好，请介绍一下你自己。"}])
    filler = reference.encode_text("房间干净，服务也很热情，早餐种类很多，下次还会再来。" * 20)
    long = reference.encode_chat([{"role": "user", "content": ""}])
    long = filler[:LONG_PROMPT_TOKENS - len(long)] + long  # a 200-token prompt
    long = long[:LONG_PROMPT_TOKENS]

    rates = {name: [] for name in runtimes}
    ttft = {name: [] for name in runtimes}
    names = list(runtimes)
    for name in names:  # warm-up: first-call costs are not decode speed
        decode_rate(runtimes[name], short, 8)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(decode_rate(runtimes[name], short, args.tokens))
            ttft[name].append(first_token_seconds(runtimes[name], long))

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), torch {torch.__version__}; model {args.model}")
    print(choice)
    print("\n| runtime | decode tok/s (1 stream, best of %d) | time to first token, %d-token prompt (median) |"
          % (args.rounds, LONG_PROMPT_TOKENS))
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {max(rates[name]):.0f} | {1000 * statistics.median(ttft[name]):.1f} ms |")
    best = {runtime.backend: max(rates[name]) for name, runtime in runtimes.items()}
    if "llamacpp" in best:
        print(f"\ndefault ({default.backend}) vs llama.cpp f16, single-stream decode: "
              f"{best[default.backend] / best['llamacpp']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
