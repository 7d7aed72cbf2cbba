"""Dense vs Mixture-of-Experts Tinyllm at equal ACTIVE parameters, on the quickstart corpus, on CPU.

    python bench/moe_compare.py --steps 150 --out outputs/bench-moe          # the four training runs (minutes each)
    python bench/moe_compare.py --dense-overhead c2a7b9c                     # dense speed before/after the MoE code

Every variant trains on the same batches (same seed, same order) with a plain AdamW loop, so the validation losses are
at equal training tokens. Reported per variant: parameters (total / active per token), validation loss (language-model
loss only), training tokens/s (median step), and expert load as max/mean tokens per expert (worst MoE layer) over the
last training steps and on the validation set. Variants: dense `tiny`; `moe-tiny` with the switch balancing loss;
`moe-tiny` without any balancing; `moe-tiny` with DeepSeek-V3's auxiliary-loss-free bias instead.
"""

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM

VARIANTS = {
    "dense tiny": dict(preset="tiny"),
    "moe-tiny, aux loss 0.01": dict(preset="moe-tiny", router_aux_loss_coef=0.01),
    "moe-tiny, no balancing": dict(preset="moe-tiny", router_aux_loss_coef=0.0),
    "moe-tiny, aux-free bias 1e-3": dict(preset="moe-tiny", router_aux_loss_coef=0.0, router_bias_update_rate=1e-3),
}


def token_streams(tokenizer_dir: Path | None, out: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, validation tokens, vocab size) of the default corpus, documents joined by EOS."""
    from transformers import AutoTokenizer

    from tinyllm_hf.data.corpus import load_corpus
    from tinyllm_hf.tokenizer.train import train_tokenizer

    corpus = load_corpus("default")
    if tokenizer_dir is None:
        tokenizer_dir = out / "tokenizer"
        if not tokenizer_dir.exists():
            train_tokenizer(corpus["train"]["text"], output_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    streams = []
    for split in ("train", "validation"):
        ids = tokenizer(list(corpus[split]["text"]), add_special_tokens=False).input_ids
        streams.append(np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int64))
    return streams[0], streams[1], len(tokenizer)


def active_parameters(model: TinyllmForCausalLM) -> int:
    """Parameters one token uses: all but the routed experts it is not sent to (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    idle = config.num_experts - config.num_experts_per_tok if config.num_experts else 0
    return total - len(model.routers()) * idle * 3 * config.hidden_size * (config.moe_intermediate_size or 0)


def max_over_mean(counts: torch.Tensor) -> float:
    """Busiest expert / mean expert, for the worst MoE layer; counts: (moe_layers, experts)."""
    return (counts.max(-1).values / counts.mean(-1)).max().item()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, float | None]:
    model.eval()
    losses, counts = [], 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        out = model(batch, labels=batch, output_router_logits=bool(model.config.num_experts))
        # With router logits requested the loss includes the balancing terms: take the language-model loss alone.
        lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        losses.append(lm_loss.item())
        if model.config.num_experts:
            counts = counts + out.expert_counts
    model.train()
    return statistics.fmean(losses), (max_over_mean(counts) if model.config.num_experts else None)


def train_variant(name, spec, train_ids, val_blocks, vocab_size, args) -> dict:
    torch.manual_seed(args.seed)
    fields = {k: v for k, v in spec.items() if k != "preset"}
    config = TinyllmConfig.from_preset(spec["preset"], vocab_size=vocab_size, **fields)
    model = TinyllmForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    rng = np.random.default_rng(args.seed)  # the same batches for every variant
    step_times, recent_counts = [], 0
    for step in range(args.steps):
        starts = rng.integers(0, len(train_ids) - args.block_size, args.batch_size)
        batch = torch.from_numpy(np.stack([train_ids[s:s + args.block_size] for s in starts]))
        began = time.perf_counter()
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step_times.append(time.perf_counter() - began)
        if config.num_experts and step >= args.steps - args.load_window:
            recent_counts = recent_counts + out.expert_counts
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  [{name}] step {step}: loss {out.loss.item():.3f}", flush=True)
    val_loss, val_balance = evaluate(model, val_blocks, args.batch_size)
    tokens_per_step = args.batch_size * args.block_size
    return {
        "variant": name,
        "total_params": sum(p.numel() for p in model.parameters()),
        "active_params": active_parameters(model),
        "train_tokens": args.steps * tokens_per_step,
        "val_loss": round(val_loss, 4),
        "tokens_per_s": round(tokens_per_step / statistics.median(step_times[5:])),
        "train_load_max_over_mean": round(max_over_mean(recent_counts), 3) if config.num_experts else None,
        "val_load_max_over_mean": round(val_balance, 3) if val_balance is not None else None,
    }


def compare(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids, vocab_size = token_streams(Path(args.tokenizer) if args.tokenizer else None, out)
    n_val = min(args.val_blocks, len(val_ids) // args.block_size)
    val_blocks = torch.from_numpy(val_ids[: n_val * args.block_size].reshape(n_val, args.block_size))
    print(f"{len(train_ids):,} train tokens, {n_val} validation blocks of {args.block_size}, vocab {vocab_size}, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    results = []
    for name in args.variants or VARIANTS:
        results.append(train_variant(name, VARIANTS[name], train_ids, val_blocks, vocab_size, args))
        print(json.dumps(results[-1]), flush=True)
        (out / "moe_compare.json").write_text(json.dumps(results, indent=2))
    print(markdown_table(results))


def markdown_table(results: list[dict]) -> str:
    rows = ["| variant | params total / active | val loss | train tokens/s | max/mean load, last steps | max/mean load, validation |",
            "|---|---|---|---|---|---|"]
    for r in results:
        def load(key):
            return "—" if r[key] is None else f"{r[key]:.2f}"

        rows.append(f"| {r['variant']} | {r['total_params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | "
                    f"{r['val_loss']:.3f} | {r['tokens_per_s']:,} | {load('train_load_max_over_mean')} | "
                    f"{load('val_load_max_over_mean')} |")
    return "\n".join(rows)


def modeling_at(revision: str, tmp: Path):
    """The modeling package as it was at git `revision`, imported under another name."""
    package = tmp / "tinyllm_modeling_at_rev"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_tinyllm.py", "modeling_tinyllm.py"):
        source = subprocess.run(["git", "show", f"{revision}:tinyllm_hf/modeling/{name}"], capture_output=True,
                                text=True, check=True).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("tinyllm_modeling_at_rev.modeling_tinyllm")


def dense_overhead(args) -> None:
    """Forward+backward time of the dense `tiny` model with the current code and with the code at a git revision,
    interleaved so machine load affects both alike."""
    with tempfile.TemporaryDirectory() as tmp:
        old = modeling_at(args.dense_overhead, Path(tmp))
        models = {}
        for label, model_cls, config_cls in (("before", old.TinyllmForCausalLM, old.TinyllmConfig),
                                            ("after", TinyllmForCausalLM, TinyllmConfig)):
            torch.manual_seed(0)
            models[label] = model_cls(config_cls(**{**dict(vocab_size=8192), **_tiny_fields()})).train()
        batch = torch.randint(0, 8192, (args.batch_size, args.block_size))
        times = {label: [] for label in models}
        for repeat in range(args.repeats):
            order = list(models.items())
            for label, model in order if repeat % 2 else order[::-1]:  # alternate who runs first
                began = time.perf_counter()
                model(batch, labels=batch).loss.backward()
                times[label].append(time.perf_counter() - began)
                model.zero_grad(set_to_none=True)
        for label, values in times.items():
            print(f"{label} ({args.dense_overhead if label == 'before' else 'working tree'}): median "
                  f"{statistics.median(values) * 1000:.1f} ms, min {min(values) * 1000:.1f} ms per fwd+bwd "
                  f"({args.batch_size}x{args.block_size} tokens, {args.repeats} repeats)")


def _tiny_fields() -> dict:
    from tinyllm_hf.modeling.configuration_tinyllm import PRESETS

    return PRESETS["tiny"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val_blocks", type=int, default=96)
    parser.add_argument("--load_window", type=int, default=25, help="last training steps whose expert load is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train one on the corpus into --out)")
    parser.add_argument("--out", default="outputs/bench-moe")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    parser.add_argument("--dense-overhead", dest="dense_overhead", metavar="GIT_REV",
                        help="instead of training: time the dense model at GIT_REV against the working tree")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dense_overhead(args) if args.dense_overhead else compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
