"""The default runtimes against the alternatives, side by side in one run: single-stream decode and time to first token
of a checkpoint on every runtime (and the one `--backend auto` chooses for one stream, what `tinyllm chat` runs by
default), then `tinyllm serve` with its default backend under 1 and 8 concurrent clients.

    python bench/decode_speed.py --model runs/quickstart/sft [--threads 1] [--rounds 3] [--tokens 128]
    python bench/decode_speed.py --model runs/quickstart/sft --serve-clients ""    # decode only

Each runtime gets the same prompts: a short chat prompt, decoded for `--tokens` greedy tokens with EOS ignored (tok/s;
best of `--rounds`, in rotating order), and a 200-token prompt, timed from the call to its first new token (prefill
included; median of `--rounds`). The runtimes: transformers fp32, ONNX Runtime fp32 and llama.cpp f16, from the same
cached exports `--backend auto` uses (`TINYLLM_CACHE`). The serving part is bench/serve_load.py's load test (every
answer checked against its solo answer; lost and mixed answers counted) on `tinyllm serve --backend auto
--max-batch-size 8` in this process. Prints markdown tables and the three numbers the goals are stated in: default
single-stream decode / llama.cpp f16, 8 clients / 1 client, time to first token of the 200-token prompt. Exits 1 if
any answer under load was lost or mixed.
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
    parser.add_argument("--serve-clients", default="1,8", help="client counts of the serving test (\"\": skip it)")
    parser.add_argument("--serve-requests", type=int, default=4, help="requests per client")
    parser.add_argument("--serve-max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8, help="as `tinyllm serve --max-batch-size`")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    log = io.StringIO()
    default = choose_runtime(args.model, streams=1, threads=args.threads, log=log)
    choice = log.getvalue().strip()
    reference = TransformersRuntime.from_pretrained(args.model)
    folder = runtime_choice.cache_root() / checkpoint_fingerprint(Path(args.model))
    runtimes = {"transformers fp32": reference}
    for backend, label in (("onnx", "onnx fp32"), ("llamacpp", "llama.cpp f16")):
        missing = runtime_choice.unavailable_backends()[backend]
        if missing is None:
            export = runtime_choice.cached_export(backend, Path(args.model), folder)
            runtimes[label] = runtime_choice.load_export(backend, export, args.threads)
        else:
            print(f"{label}: {missing}", file=sys.stderr)
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
    default_backend = default.backend
    default_name = next(name for name, runtime in runtimes.items() if runtime.backend == default_backend)
    del runtimes, reference, default  # the serving test loads its own
    serving = serve_load_test(args) if args.serve_clients else None

    print("\nsummary:")
    if "llamacpp" in best:
        print(f"- default single-stream decode ({default_name}) vs llama.cpp f16: "
              f"{best[default_backend] / best['llamacpp']:.2f}x")
    else:
        print("- default single-stream decode vs llama.cpp f16: not measured (llama-cpp-python is not installed)")
    print(f"- time to first token, {LONG_PROMPT_TOKENS}-token prompt, default runtime: "
          f"{1000 * statistics.median(ttft[default_name]):.1f} ms")
    if serving is None:
        return 0
    backend, results = serving
    by_clients = {r["clients"]: r for r in results}
    most = max(by_clients)
    problems = sum(len(r["problems"]) for r in results)
    if 1 in by_clients and most > 1:
        print(f"- {most} clients vs 1 client through tinyllm serve ({backend}): "
              f"{by_clients[most]['speedup_vs_1_client']:.2f}x, {problems} lost or mixed answers")
    return 1 if problems else 0


def serve_load_test(args) -> tuple[str, list[dict]]:
    """bench/serve_load.py's load test on `tinyllm serve --backend auto` (the default) started in this process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_load
    from serve_fixtures import run_uvicorn  # tests/, put on the path by serve_load

    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.runtime import load_backend
    from tinyllm_hf.inference.server import build_app

    runtime = load_backend("auto", args.model, threads=args.threads, streams=args.max_batch_size)
    engine = Engine(runtime, max_batch_size=args.max_batch_size)
    counts = [int(n) for n in args.serve_clients.split(",")]
    try:
        with run_uvicorn(build_app(engine, Path(args.model).name)) as url:
            results = serve_load.run(url, counts, args.serve_requests, args.serve_max_tokens)
    finally:
        engine.close()
    backend = f"auto -> {runtime.backend}, --max-batch-size {args.max_batch_size}"
    print(f"\ntinyllm serve ({backend}), {args.serve_requests} greedy /v1/completions of up to "
          f"{args.serve_max_tokens} tokens per client:\n")
    print("| clients | completion tok/s | vs 1 client | p50 s | p95 s | lost or mixed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_1_client']} | {r['p50_s']} | {r['p95_s']} "
              f"| {len(r['problems'])} |")
        for problem in r["problems"]:
            print(f"  {problem}", file=sys.stderr)
    return backend, results


if __name__ == "__main__":
    sys.exit(main())
