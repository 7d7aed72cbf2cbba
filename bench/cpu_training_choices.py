"""What each CPU-specific choice of the model (`modeling_tinyllm.py`, `loss_tinyllm.py`) gains per training step,
measured against switching it off.

As shipped, the pretraining Trainer calls the model with `skip_logits=True` on a CPU: the loss comes straight from the
hidden states (`LinearCrossEntropy`). Switched off:
- `logits`: the vocab projection makes full logits and Tinyllm's chunked cross-entropy reads them (`causal_lm_loss`);
- `logits + hf-loss`: full logits and transformers' `ForCausalLMLoss`, as Llama trains;
- `bf16-attention`: under bf16 autocast, attention in bf16 instead of fp32 (`attention_in_fp32` returns False).

Every variant trains its own copy of the same model (same weights, same batch) with fused AdamW, forward+backward+step
timed; the variants run in interleaved rounds with rotating order, and the speed-up is the median over rounds of the
ratio within each round (switched off / as shipped, > 1 means the shipped choice is faster), with its interquartile
range.

    python bench/cpu_training_choices.py [--presets tiny 16m] [--rounds 9] [--steps 2] [--threads 2]
"""

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from unittest import mock

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.modeling import loss_tinyllm, modeling_tinyllm


def transformers_loss(logits, labels, **kwargs):
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], **kwargs)


SHIPPED = {"skip_logits": True}
# (precision, switched-off choice) -> (forward keyword arguments, (module, name, stand-in) patched while it trains)
VARIANTS = {
    ("fp32", "as shipped"): (SHIPPED, None),
    ("fp32", "logits"): ({}, None),
    ("fp32", "logits + hf-loss"): ({}, (loss_tinyllm, "causal_lm_loss", transformers_loss)),
    ("bf16 autocast", "as shipped"): (SHIPPED, None),
    ("bf16 autocast", "logits"): ({}, None),
    ("bf16 autocast", "logits + hf-loss"): ({}, (loss_tinyllm, "causal_lm_loss", transformers_loss)),
    ("bf16 autocast", "bf16-attention"): (SHIPPED, (modeling_tinyllm, "attention_in_fp32", lambda query: False)),
}


def step_seconds(model, optimizer, ids, precision: str, forward_kwargs: dict, patch, steps: int) -> float:
    with mock.patch.object(*patch) if patch else contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
                loss = model(ids, labels=ids, **forward_kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps


def bench_preset(preset: str, vocab_size: int, tokens_per_step: int, rounds: int, steps: int) -> list[tuple]:
    torch.manual_seed(0)
    config = TinyllmConfig.from_preset(preset, vocab_size=vocab_size)
    reference = TinyllmForCausalLM(config)
    seq = config.max_position_embeddings
    ids = torch.randint(0, vocab_size, (max(tokens_per_step // seq, 1), seq))
    models, optimizers = {}, {}
    for variant in VARIANTS:
        models[variant] = TinyllmForCausalLM(config).train()
        models[variant].load_state_dict(reference.state_dict())
        optimizers[variant] = torch.optim.AdamW(models[variant].parameters(), lr=1e-4, fused=True)
    seconds = {variant: [] for variant in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(rounds + 1):  # round 0 warms every variant up and is discarded
        shift = round_index % len(names)
        for variant in names[shift:] + names[:shift]:
            took = step_seconds(models[variant], optimizers[variant], ids, variant[0], *VARIANTS[variant], steps)
            if round_index:
                seconds[variant].append(took)
    rows = []
    for precision, choice in VARIANTS:
        shipped = seconds[(precision, "as shipped")]
        ratios = [off / on for off, on in zip(seconds[(precision, choice)], shipped)]
        low, _, high = statistics.quantiles(ratios, n=4)
        rows.append((preset, precision, choice, statistics.median(seconds[(precision, choice)]),
                     statistics.median(ratios), low, high))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "16m"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.tokens_per_step} tokens/step, {args.rounds} rounds x {args.steps} steps")
    print("| preset | precision | variant | median step (s) | shipped is faster by (IQR) |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        for preset_name, precision, choice, step, ratio, low, high in bench_preset(
            preset, args.vocab_size, args.tokens_per_step, args.rounds, args.steps
        ):
            speedup = "—" if choice == "as shipped" else f"{ratio:.3f}x ({low:.3f}-{high:.3f})"
            print(f"| {preset_name} | {precision} | {choice} | {step:.3f} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
