"""Which generation defaults an SFT model should ship with: repetition and held-out accuracy under a grid of settings.

    OMP_NUM_THREADS=1 python bench/generation_defaults.py --model outputs/sft-quickstart --json gen_defaults.json

The same held-out questions of the task registry (items no stage trained on; `--per-task` of each task with held-out
items, taken as the drift table takes them) are answered under each setting of `SETTINGS` with transformers'
`generate`, which is what `generation_config.json` configures (and vLLM and the Ollama export read). Printed per
setting: the share of replies in a loop, distinct-2, the repeated 4-gram rate (all three as
`tinyllm_hf.evaluation.repetition` defines them), the share of replies that ran out of tokens without ending, and
held-out accuracy (the task's checker, as `tinyllm eval --tasks tasks` judges) with the answers gained and lost
against greedy decoding. Sampled settings run once per seed (`--seeds`) and report the mean over seeds. The SFT
stage's `GENERATION_DEFAULTS` (tinyllm_hf/trainers/sft.py) were chosen from this table (docs/sft.md).
"""

import argparse
import json
import os
import statistics
import time

import torch

from tinyllm_hf.evaluation.cli import load_model
from tinyllm_hf.evaluation.engine import pad_id
from tinyllm_hf.evaluation.repetition import repetition_metrics
from tinyllm_hf.export.drift import load_questions, question_prompts, DriftSettings
from tinyllm_hf.inference.runtime import left_pad
from tinyllm_hf.report import cpu_name
from tinyllm_hf.tasks import CHECKERS, HELDOUT_TASKS

# What each setting does not name is switched off, never left to the model's own generation_config.json (transformers
# fills what a call leaves unset from it, and an SFT model's holds the defaults this bench chooses).
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50}
SETTINGS = {
    "greedy": GREEDY,
    "greedy, repetition_penalty 1.1": {**GREEDY, "repetition_penalty": 1.1},
    "greedy, repetition_penalty 1.2": {**GREEDY, "repetition_penalty": 1.2},
    "greedy, repetition_penalty 1.3": {**GREEDY, "repetition_penalty": 1.3},
    "greedy, no_repeat_ngram_size 3": {**GREEDY, "no_repeat_ngram_size": 3},
    "greedy, no_repeat_ngram_size 4": {**GREEDY, "no_repeat_ngram_size": 4},
    "greedy, repetition_penalty 1.1, no_repeat_ngram_size 4": {**GREEDY, "repetition_penalty": 1.1,
                                                              "no_repeat_ngram_size": 4},
    "t 0.7, top_p 0.9, top_k 50": SAMPLED,
    "t 0.7, top_p 0.9, top_k 50, repetition_penalty 1.1": {**SAMPLED, "repetition_penalty": 1.1},
    "t 0.7, top_p 0.9, top_k 50, repetition_penalty 1.2": {**SAMPLED, "repetition_penalty": 1.2},
}
BASELINE = "greedy"  # the setting the others' gained / lost answers are counted against


@torch.inference_mode()
def replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, setting: dict, batch_size: int):
    """(reply text, whether it ran out of tokens before its EOS) per prompt, under one `generate` setting."""
    out = []
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    for start in range(0, len(prompts), batch_size):
        input_ids, mask, _ = left_pad(prompts[start : start + batch_size], pad)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos, pad_token_id=pad, **{**NEUTRAL, **setting})
        for row in generated[:, input_ids.shape[1]:].tolist():
            ended = eos in row
            out.append((tokenizer.decode(row[: row.index(eos)] if ended else row, skip_special_tokens=True), not ended))
    return out


def measure(model, tokenizer, questions, setting: dict, seed: int, max_new_tokens: int, batch_size: int) -> dict:
    torch.manual_seed(seed)
    answered = replies(model, tokenizer, [ids for ids, *_ in questions], max_new_tokens, setting, batch_size)
    texts = [text for text, _ in answered]
    right = [int(CHECKERS[checker](text, answers)) for text, (_, answers, _, checker) in zip(texts, questions)]
    per_task: dict[str, int] = {}
    for ok, (_, _, task, _) in zip(right, questions):
        per_task[task] = per_task.get(task, 0) + ok
    return {**repetition_metrics(texts), "out_of_tokens": sum(cut for _, cut in answered) / len(answered),
            "correct": sum(right), "accuracy": sum(right) / len(questions), "per_task_correct": per_task,
            "right": right, "replies": texts}


def summary(runs: list[dict], baseline: list[int]) -> dict:
    """Means over seeds, with the answers right here and wrong under the baseline (gained) and the reverse (lost):
    the paired difference, which says more about noise than two accuracies do."""
    keys = ("loop_share", "distinct_2", "repeated_4gram_rate", "out_of_tokens", "accuracy", "correct")
    mean = {key: statistics.mean(run[key] for run in runs) for key in keys}
    mean["gained"] = statistics.mean(sum(a > b for a, b in zip(run["right"], baseline)) for run in runs)
    mean["lost"] = statistics.mean(sum(a < b for a, b in zip(run["right"], baseline)) for run in runs)
    return mean


def to_markdown(result: dict) -> str:
    lines = [f"| setting | loops | distinct-2 | repeated 4-grams | out of tokens | held-out accuracy | vs {BASELINE}: "
             "gained / lost |", "|---|---|---|---|---|---|---|"]
    n = result["questions"]
    for name, entry in result["settings"].items():
        m = entry["mean"]
        lines.append(f"| {name} | {100 * m['loop_share']:.1f}% | {m['distinct_2']:.3f} | "
                     f"{100 * m['repeated_4gram_rate']:.1f}% | {100 * m['out_of_tokens']:.1f}% | "
                     f"{100 * m['accuracy']:.1f}% ({m['correct']:g}/{n}) | +{m['gained']:g} / -{m['lost']:g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an SFT model folder (with its tokenizer)")
    p.add_argument("--per-task", type=int, default=20, help="held-out questions of each task with held-out items")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seeds", type=int, default=2, help="runs of each sampled setting (greedy ones run once)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, help="write every number (per seed and per task too) and every reply here")
    args = p.parse_args()
    start = time.time()
    model, tokenizer = load_model(args.model, device="cpu")
    context = model.config.max_position_embeddings
    records = load_questions(DriftSettings(tasks=args.per_task * len(HELDOUT_TASKS)))
    questions = question_prompts(tokenizer, records, context - args.max_new_tokens)
    result = {"model": args.model, "questions": len(questions), "max_new_tokens": args.max_new_tokens,
              "machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "settings": {}}
    baseline: list[int] = []
    for name in [BASELINE, *(name for name in SETTINGS if name != BASELINE)]:
        setting = SETTINGS[name]
        seeds = range(args.seeds if setting["do_sample"] else 1)
        runs = [measure(model, tokenizer, questions, setting, seed, args.max_new_tokens, args.batch_size)
                for seed in seeds]
        if name == BASELINE:
            baseline = runs[0]["right"]
        result["settings"][name] = {"generate": setting, "runs": runs, "mean": summary(runs, baseline)}
        print(f"[{time.time() - start:.0f} s] {name}: {json.dumps(result['settings'][name]['mean'])}", flush=True)
    result["wall_time_s"] = time.time() - start
    print(f"\n{len(questions)} held-out questions ({args.per_task} of each of {len(HELDOUT_TASKS)} tasks), at most "
          f"{args.max_new_tokens} new tokens, {args.model}; {result['machine']}\n")
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main()
