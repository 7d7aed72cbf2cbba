"""Held-out sentiment of a model before and after SFT: the evidence in docs/results.md (SFT section).

    python bench/sft_sentiment.py --model outputs/pretrain-quickstart --model outputs/sft-quickstart --n 200

For each model, on the first N held-out sentiment questions of the default SFT set (items never trained on):
- gen_accuracy: the greedy reply, normalised, equals the label (正面/负面): the task evaluator's exact check;
- label_accuracy: the label with the higher log-likelihood after the chat prompt is right (chance: 50%; this scores a
  base model fairly, since it never learned to answer in the chat format);
- stopped_at_eos: share of greedy replies that end with <|endoftext|> within max_new_tokens.
Also printed: the majority-label share of the N questions (what always answering one label would score).
"""

import argparse
import json
from collections import Counter

import torch

from tinyllm_hf.evaluation.cli import load_model
from tinyllm_hf.evaluation.engine import loglikelihoods, pad_id
from tinyllm_hf.inference.runtime import TransformersRuntime, left_pad
from tinyllm_hf.evaluation.tasks import evaluate_tasks
from tinyllm_hf.tasks import heldout_task_records

LABELS = ("正面", "负面")


@torch.inference_mode()
def stopped_at_eos(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[bool]:
    stops = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p).input_ids for p in prompts[start : start + batch_size]]
        input_ids, mask, _ = left_pad(rows, pad_id(tokenizer))
        # repetition_penalty 1.0: plain greedy, not the SFT model's sampling defaults from its generation_config.json
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=1.0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_id(tokenizer))
        stops += [(row[input_ids.shape[1]:] == tokenizer.eos_token_id).any().item() for row in out]
    return stops


def measure(model_dir: str, records: list[dict], max_new_tokens: int) -> dict:
    model, tokenizer = load_model(model_dir, device="cpu")
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
               for r in records]
    gold = [r["messages"][-1]["content"] for r in records]
    gen = evaluate_tasks(TransformersRuntime(model, tokenizer), records, max_new_tokens=max_new_tokens, progress=False)
    scores = loglikelihoods(model, tokenizer, [(p, label) for p in prompts for label in LABELS])
    picked = [LABELS[max(range(len(LABELS)), key=lambda j: scores[i * len(LABELS) + j])] for i in range(len(prompts))]
    stops = stopped_at_eos(model, tokenizer, prompts, max_new_tokens)
    return {
        "model": model_dir,
        "n": len(records),
        "gen_accuracy": gen["accuracy"],
        "label_accuracy": sum(p == g for p, g in zip(picked, gold)) / len(gold),
        "label_picked": dict(Counter(picked)),
        "stopped_at_eos": sum(stops) / len(stops),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="model folder (repeat for several)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    records = heldout_task_records(["sentiment"], {"sentiment": args.n})
    majority = Counter(r["messages"][-1]["content"] for r in records).most_common(1)[0]
    print(f"{len(records)} held-out sentiment questions; majority label {majority[0]}: {majority[1] / len(records):.3f}")
    results = []
    for model_dir in args.model:
        result = measure(model_dir, records, args.max_new_tokens)
        print(json.dumps(result, ensure_ascii=False), flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"majority_share": majority[1] / len(records), "results": results}, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main()
