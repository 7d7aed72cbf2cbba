"""Held-out accuracy of chat models on the checkable tasks, for the Alignment section of docs/results.md.

    python bench/alignment_eval.py --model sft=runs/alignment/sft --model dpo=runs/alignment/dpo \
        --sizes sentiment=200,idiom_meaning=30,word_definition=30,xiehouyu=30 --json runs/alignment/eval.json

Every model answers the same held-out questions (items no alignment or SFT stage trained on) greedily; answers are
checked with `tinyllm_hf.evaluation.tasks.evaluate_tasks` (exact match after normalisation). Also reported: the share
of replies that end with the end-of-turn token before the token limit (the chat format survived), the most frequent
sentiment replies (the held-out reviews are not balanced), the majority label's share, and the training time of each
model's stage from its train_results.json.
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tinyllm_hf  # noqa: F401  (registers the tinyllm model type)
from tinyllm_hf.evaluation.engine import pad_id
from tinyllm_hf.evaluation.tasks import evaluate_tasks
from tinyllm_hf.inference.runtime import TransformersRuntime, left_pad
from tinyllm_hf.options import parse_key_values
from tinyllm_hf.tasks import PREFERENCE_TASKS, heldout_task_records, normalize, parse_task_sizes


@torch.inference_mode()
def reply_stats(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 32) -> dict:
    """Share of greedy replies that end with the end-of-turn token within max_new_tokens, and how often each sentiment
    label is answered (a model that always says one label scores the majority share)."""
    stopped, labels = 0, Counter()
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        rows = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for r in batch]
        input_ids, mask, _ = left_pad(rows, pad_id(tokenizer))
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer))
        new = out[:, input_ids.shape[1]:]
        stopped += (new == tokenizer.eos_token_id).any(dim=1).sum().item()
        for record, ids in zip(batch, new):
            if record["task"] == "sentiment":
                labels[normalize(tokenizer.decode(ids, skip_special_tokens=True))] += 1
    return {"stopped_at_eos": stopped / len(records), "sentiment_replies": dict(labels.most_common(3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="name=path, repeatable")
    parser.add_argument("--sizes", default="sentiment=200,idiom_meaning=30,word_definition=30,xiehouyu=30")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = parse_task_sizes(args.sizes)
    records = heldout_task_records([t for t in PREFERENCE_TASKS if t in sizes], sizes)
    gold = Counter(r["messages"][-1]["content"] for r in records if r["task"] == "sentiment")
    results = {"sizes": sizes, "max_new_tokens": args.max_new_tokens, "sentiment_labels": dict(gold),
               "sentiment_majority_share": max(gold.values()) / sum(gold.values()) if gold else None, "models": {}}
    models = {}
    for spec in args.model:
        models.update(parse_key_values(spec, "--model", "name=path"))
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        start = time.perf_counter()
        scores = evaluate_tasks(TransformersRuntime(model, tokenizer), records, max_new_tokens=args.max_new_tokens,
                                progress=False)
        entry = {
            "path": path,
            "accuracy": scores["accuracy"],
            "per_task": {task: e["accuracy"] for task, e in scores["per_task"].items()},
            **reply_stats(model, tokenizer, records, args.max_new_tokens),
            "eval_seconds": round(time.perf_counter() - start, 1),
        }
        train_results = Path(path) / "train_results.json"
        if train_results.is_file():
            entry["train_runtime_s"] = json.loads(train_results.read_text())["train_runtime"]
        results["models"][name] = entry
        print(name, json.dumps(entry, ensure_ascii=False), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
