"""Held-out accuracy of chat models on the dictionary tasks with the built-in tools on: the SFT model against the
tool-use GRPO model (`recipes/grpo/tools-quickstart.yaml`).

    python bench/tool_grpo_eval.py --model sft=outputs/sft-quickstart --model grpo=outputs/grpo-tools-quickstart \
        --sizes idiom_meaning=50,word_definition=50,xiehouyu=50 --json outputs/tool_grpo_eval.json

Every model answers the same held-out questions (items no SFT or RL stage trained on) greedily through the tool loop
(`inference.tool_loop.run_tool_loop`, `Toolbox.builtin()`, the loop `tinyllm chat` runs), once with the tools offered
and once without; the final answer is checked by the task's checker (`evaluation.tasks.prepare`, `tasks.CHECKERS`).
Also reported per model: the share of questions with at least one call, the share of calls that ran (no error), and
how the conversations ended (finish reasons).
"""

import argparse
import json
import time
from collections import Counter, defaultdict

import torch

from tinyllm_hf.evaluation.tasks import prepare
from tinyllm_hf.inference.runtime import SamplingParams, load_runtime
from tinyllm_hf.inference.tool_loop import Toolbox, run_tool_loop
from tinyllm_hf.options import parse_key_values
from tinyllm_hf.tasks import CHECKERS, heldout_task_records, parse_task_sizes

TOOL_TASKS = ("idiom_meaning", "word_definition", "xiehouyu")


def score(runtime, prepared: list, toolbox: Toolbox | None, max_new_tokens: int) -> dict:
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0)] * len(prepared)
    done = run_tool_loop(runtime, [query for query, *_ in prepared], toolbox, params, max_tokens=max_new_tokens,
                         max_rounds=1)
    per_task = defaultdict(lambda: {"n": 0, "correct": 0})
    calls = [call for event in done for call in event.calls]
    for (_, answers, task, checker), event in zip(prepared, done):
        per_task[task]["n"] += 1
        per_task[task]["correct"] += CHECKERS[checker](event.content, answers)
    correct = sum(entry["correct"] for entry in per_task.values())
    return {
        "accuracy": correct / len(prepared),
        "per_task": {task: entry["correct"] / entry["n"] for task, entry in sorted(per_task.items())},
        "called_a_tool": sum(bool(event.calls) for event in done) / len(prepared),
        "calls_that_ran": sum(call.error is None for call in calls) / len(calls) if calls else None,
        "finish_reasons": dict(Counter(event.finish_reason for event in done)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="name=path, repeatable")
    parser.add_argument("--sizes", default="idiom_meaning=50,word_definition=50,xiehouyu=50")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply (each round)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = parse_task_sizes(args.sizes)
    prepared = [prepare(r, i) for i, r in enumerate(heldout_task_records([t for t in TOOL_TASKS if t in sizes], sizes))]
    models = {}
    for spec in args.model:
        models.update(parse_key_values(spec, "--model", "name=path"))
    results = {"sizes": sizes, "max_new_tokens": args.max_new_tokens, "models": {}}
    for name, path in models.items():
        runtime = load_runtime(path)
        start = time.perf_counter()
        results["models"][name] = {"path": path,
                                   "tools": score(runtime, prepared, Toolbox.builtin(), args.max_new_tokens),
                                   "no_tools": score(runtime, prepared, None, args.max_new_tokens),
                                   "eval_seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps(results["models"][name], ensure_ascii=False))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main()
