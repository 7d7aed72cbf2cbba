"""Forward+backward and generation throughput of TinyllmForCausalLM against transformers' LlamaForCausalLM.

Both models have the same config and the same weights (converted with tinyllm_hf.modeling.convert); runs are
interleaved in one process and the median of several rounds is compared, so machine noise hits both sides alike.
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
    for round_index in range(rounds + 1):  # round 0 warms up both models and is discarded
        # Alternate which model goes first, so neither always inherits a cache the other warmed (or trashed).
        order = list(models.items()) if round_index % 2 == 0 else list(models.items())[::-1]
        for name, model in order:
            model.train()
            tps = train_step_tokens_per_s(model, ids, optimizers[name])
            model.eval()
            gps = generate_tokens_per_s(model, prompt, new_tokens)
            if round_index:
                train[name].append(tps)
                gen[name].append(gps)
    result = {"preset": preset, "params": ours.num_parameters()}
    for kind, samples in (("train", train), ("generate", gen)):
        ours_median, llama_median = statistics.median(samples["tinyllm"]), statistics.median(samples["llama"])
        result[kind] = (ours_median, llama_median, ours_median / llama_median)
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
    print("| preset | params | train tok/s ours | train tok/s Llama | ratio | generate tok/s ours | "
          "generate tok/s Llama | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench_preset(preset, args.vocab_size, args.batch, args.seq, args.rounds, args.new_tokens)
        (t_ours, t_llama, t_ratio), (g_ours, g_llama, g_ratio) = r["train"], r["generate"]
        print(f"| {preset} | {r['params'] / 1e6:.2f}M | {t_ours:,.0f} | {t_llama:,.0f} | {t_ratio:.3f} | "
              f"{g_ours:,.0f} | {g_llama:,.0f} | {g_ratio:.3f} |")


if __name__ == "__main__":
    main()
