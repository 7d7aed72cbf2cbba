"""Accuracy on checkable generation tasks (held-out sentiment, idiom, definition, name questions from the task registry,
`tinyllm_hf.tasks.heldout_task_records`, or records of your own).

A record is a dict:
    task      name to report under, e.g. "sentiment"
    messages  chat messages to continue (a trailing assistant message is the reference answer), or
    prompt    a raw prompt string (for base models)
    answer    the reference, a string or a list of accepted strings (optional when messages end with the assistant)
    checker   "exact" (the normalised reply equals an answer; default) or "contains" (the reply contains an answer):
              `tinyllm_hf.tasks.CHECKERS`, the checks the tasks' answers are judged by
The model answers each record greedily; results are reported per task and overall.
"""

import json
from collections import defaultdict
from pathlib import Path

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.evaluation.engine import greedy_generate
from tinyllm_hf.tasks import CHECKERS


def prepare(record: dict, index: int = 0) -> tuple[list[dict] | str, list[str], str, str]:
    """(messages or prompt, accepted answers, task, checker) of one record, validated."""
    where = f"task record {index}"
    checker = record.get("checker", "exact")
    if checker not in CHECKERS:
        raise UsageError(f"{where}: checker must be one of {', '.join(CHECKERS)}, not {checker!r}")
    answer = record.get("answer")
    if "messages" in record:
        messages = list(record["messages"])
        if messages and messages[-1].get("role") == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
        query = messages
    elif "prompt" in record:
        query = record["prompt"]
    else:
        raise UsageError(f"{where}: needs 'messages' or 'prompt'")
    if answer is None:
        raise UsageError(f"{where}: needs 'answer' (or a final assistant message)")
    answers = [answer] if isinstance(answer, str) else list(answer)
    return query, answers, record.get("task", "default"), checker


def load_examples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"task file not found: {path}")
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def evaluate_tasks(
    runtime,
    examples: list[dict],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Accuracy of `runtime` (any runtime of `inference/runtime.py`) on `examples`; each reply is `max_new_tokens`
    long at most (None: the rest of the context after its prompt)."""
    prepared = [prepare(r, i) for i, r in enumerate(examples)]
    needs_chat = any(isinstance(query, list) for query, *_ in prepared)
    if needs_chat and not runtime.chat_template:
        raise UsageError("task records with 'messages' need a tokenizer with a chat template")
    prompts = [runtime.render_chat(query) if isinstance(query, list) else query for query, *_ in prepared]
    replies = greedy_generate(runtime, prompts, max_new_tokens, batch_size, progress)
    per_task: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    for (_, answers, task, checker), reply in zip(prepared, replies):
        per_task[task]["n"] += 1
        per_task[task]["correct"] += CHECKERS[checker](reply, answers)
    for entry in per_task.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    n, correct = len(prepared), sum(e["correct"] for e in per_task.values())
    return {
        "mode": "gen",
        "shots": 0,
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "per_task": dict(sorted(per_task.items())),
    }
