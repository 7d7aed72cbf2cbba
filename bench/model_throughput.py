"""Forward+backward and generation throughput of TinyllmForCausalLM against transformers' LlamaForCausalLM.

Both models have the same config and the same weights (converted with tinyllm_hf.modeling.convert); runs are
interleaved in one process; the ratio is the median over rounds of the ratio within each round (with its interquartile
range), so machine noise and drift hit both sides alike.
`--clock cpu` divides by the process's CPU time instead of wall time: on a machine shared with other jobs that
measures the work each model does rather than how much of the CPU it happened to get.

    python bench/model_throughput.py [--presets tiny 16m] [--rounds 7] [--threads 2]
"""

import argparse
import platform
import statistics
import time

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]

from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
from tinyllm_hf.modeling.convert import tinyllm_to_llama_model


def train_step_tokens_per_s(model, ids, optimizer) -> float:
    start = clock()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ids.numel() / (clock() - start)


@torch.no_grad()
def generate_tokens_per_s(model, prompt, new_tokens) -> float:
    start = clock()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - prompt.shape[1]) * out.shape[0] / (clock() - start)


def bench_preset(preset: str, vocab_size: int, batch: int, seq: int, rounds: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    ours = TinyllmForCausalLM(TinyllmConfig.from_preset(preset, vocab_size=vocab_size, pad_token_id=0))
    llama = tinyllm_to_llama_model(ours)
    models = {"tinyllm": ours, "llama": llama}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    ids = torch.randint(1, vocab_size, (batch, seq))
    prompt = torch.randint(1, vocab_size, (1, 16))
    train = {name: [] for name in models}
    gen = {name: [] for name in models}
    # Training rounds first, then generation rounds: a generation timed right after a training step of the same
    # model would inherit that step's freed memory and cold caches, so each phase measures only itself.
    for phase, samples in (("train", train), ("generate", gen)):
        for round_index in range(rounds + 1):  # round 0 warms up both models and is discarded
            # Alternate which model goes first, so neither always inherits a cache the other warmed (or trashed).
            order = list(models.items()) if round_index % 2 == 0 else list(models.items())[::-1]
            for name, model in order:
                if phase == "train":
                    model.train()
                    speed = train_step_tokens_per_s(model, ids, optimizers[name])
                else:
                    model.eval()
                    speed = generate_tokens_per_s(model, prompt, new_tokens)
                if round_index:
                    samples[name].append(speed)
    result = {"preset": preset, "params": ours.num_parameters()}
    for kind, samples in (("train", train), ("generate", gen)):
        # The ratio is taken within each round (the two runs are seconds apart), then the median over rounds: the
        # machine's speed drifts by more than the difference between the models, and pairing cancels the drift.
        ratios = [a / b for a, b in zip(samples["tinyllm"], samples["llama"])]
        low, _, high = statistics.quantiles(ratios, n=4)
        result[kind] = (statistics.median(samples["tinyllm"]), statistics.median(samples["llama"]),
                        statistics.median(ratios), low, high)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "16m"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"batch {args.batch} x seq {args.seq}, {args.rounds} interleaved rounds, medians, {args.clock} clock")
    print("| preset | params | train tok/s ours | train tok/s Llama | ratio (IQR) | generate tok/s ours | "
          "generate tok/s Llama | ratio (IQR) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench_preset(preset, args.vocab_size, args.batch, args.seq, args.rounds, args.new_tokens)
        cells = [f"{ours:,.0f} | {llama:,.0f} | {ratio:.3f} ({low:.3f}-{high:.3f})"
                 for ours, llama, ratio, low, high in (r["train"], r["generate"])]
        print(f"| {preset} | {r['params'] / 1e6:.2f}M | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
