"""Loss by position at 4x a model's trained context: the base model as it is, with YaRN or dynamic NTK applied at
load time (no training), and the model extended by continued pretraining (recipes/pretrain/long-context.yaml).

    python bench/long_context.py --base outputs/pretrain-quickstart --extended outputs/pretrain-long-context \
        --plot docs/long_context.png

The embedded corpus has no validation document near 1,024 tokens (mean ~47, longest ~400 with the quickstart
tokenizer), so the validation split is packed the way pretraining packs it: documents joined with EOS and cut into
blocks of `--context` tokens. The loss at position p is the cross-entropy of token p given tokens 0..p-1 of its block;
beyond the trained context this measures whether the model still works there (what breaks first without scaling),
not how much it gains from distant text, which short documents cannot show. Prints a Markdown table (mean loss and
perplexity per position bucket) and writes the plot.
"""

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

from tinyllm_hf.data.corpus import load_corpus
from tinyllm_hf.data.packing import pack_dataset
from tinyllm_hf.errors import UsageError
from tinyllm_hf.model_utils import get_model, get_tokenizer
from tinyllm_hf.report import cpu_name
from tinyllm_hf.rope_scaling import parse_rope_scaling, trained_context


def position_losses(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean cross-entropy at each predicted position 1..context-1 over `blocks` (n, context): (context - 1,)."""
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            total += losses.sum(0).double()
    return total / len(blocks)


def bucket_means(losses: torch.Tensor, edges: list[int]) -> list[float]:
    """Mean loss of the predicted positions in each [edges[i], edges[i+1]) (position p predicts token p)."""
    positions = torch.arange(1, len(losses) + 1)
    return [float(losses[(positions >= lo) & (positions < hi)].mean()) for lo, hi in zip(edges, edges[1:])]


def plot(curves: dict[str, torch.Tensor], trained: int, path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for name, losses in curves.items():
        usable = len(losses) // smooth * smooth
        means = losses[:usable].reshape(-1, smooth).mean(1)
        ax.plot(torch.arange(len(means)) * smooth + smooth / 2, means, label=name)
    ax.axvline(trained, color="grey", linestyle="--", linewidth=1)
    ax.text(trained, ax.get_ylim()[0], f" trained context ({trained})", va="bottom", color="grey")
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel(f"validation loss (nats/token, mean over {smooth} positions)")
    ax.set_title("Loss by position, packed validation blocks")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the model trained at the short context (its tokenizer inside)")
    parser.add_argument("--extended", default=None, help="the same model after long-context continued pretraining")
    parser.add_argument("--context", type=int, default=1024, help="tokens per validation block")
    parser.add_argument("--scalings", default="yarn,dynamic", help="inference-only scalings of the base model to run")
    parser.add_argument("--blocks", type=int, default=None,
                        help="validation blocks to use, evenly spaced over the split (default: all)")
    parser.add_argument("--bucket", type=int, default=256, help="width of a position bucket in the table")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (e.g. docs/long_context.png)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tokenizer = get_tokenizer(args.base)
    base = get_model(args.base, dtype="float32").eval()
    trained = trained_context(base.config)
    if args.context <= trained:
        raise UsageError(f"--context {args.context} is within the base model's trained context ({trained})")
    factor = args.context / trained
    variants = {f"base (RoPE as trained, {trained} ctx)": base}
    for rope_type in (s.strip() for s in args.scalings.split(",") if s.strip()):
        spec = f"{rope_type}:{factor:g}"
        parse_rope_scaling(spec)
        variants[f"base + {spec} (inference only)"] = get_model(args.base, dtype="float32", rope_scaling=spec).eval()
    if args.extended:
        extended = get_model(args.extended, dtype="float32").eval()
        rope = extended.config.rope_parameters
        variants[f"extended ({rope['rope_type']} x{rope.get('factor', 1):g}, continued pretraining)"] = extended

    corpus = load_corpus("default")
    blocks = torch.tensor(pack_dataset(corpus["validation"], tokenizer, args.context)["input_ids"], dtype=torch.long)
    if args.blocks and args.blocks < len(blocks):
        # Evenly spaced over the split, which is ordered by source: the first blocks would be one source only.
        blocks = blocks[torch.linspace(0, len(blocks) - 1, args.blocks).round().long()]
    print(f"{len(blocks)} validation blocks of {args.context} tokens ({len(corpus['validation'])} documents packed "
          f"with EOS), trained context {trained}, factor {factor:g}", file=sys.stderr)

    edges = list(range(0, args.context, args.bucket)) + [args.context]
    curves, rows = {}, []
    for name, model in variants.items():
        t0 = time.perf_counter()
        curves[name] = position_losses(model, blocks, args.batch_size)
        rows.append((name, bucket_means(curves[name], edges), float(curves[name].mean())))
        print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    header = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    print(f"| model | {' | '.join(header)} | all |")
    print("|---|" + "---:|" * (len(header) + 1))
    for name, means, overall in rows:
        cells = [f"{m:.3f} ({math.exp(m):.0f})" for m in means]
        print(f"| {name} | {' | '.join(cells)} | {overall:.3f} ({math.exp(overall):.0f}) |")
    print("\nloss in nats/token (perplexity); position p predicts token p from tokens 0..p-1 of its block")
    if args.plot:
        plot(curves, trained, args.plot, smooth=32)
        print(f"plot written to {args.plot}")
    print(f"{datetime.date.today()}, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("bench/long_context.py", main))
