"""Accuracy on checkable generation tasks (held-out sentiment, idiom, definition, name questions from the task registry,
`tinyllm_hf.tasks.heldout_task_records`, or records of your own).

A record is a dict:
    task      name to report under, e.g. "sentiment"
    messages  chat messages to continue (a trailing assistant message is the reference answer), or
    prompt    a raw prompt string (for base models)
    answer    the reference, a string or a list of accepted strings (optional when messages end with the assistant)
    checker   "exact" (the normalised reply equals an answer; default) or "contains" (the reply contains an answer):
              `tinyllm_hf.tasks.CHECKERS`, the checks the tasks' answers are judged by
    tool_call the call a right first reply makes when tools are on, {"name", "arguments"} (optional; the embedded
              held-out records of tasks with a tool have it)
The model answers each record greedily; results are reported per task and overall. With a `Toolbox` (`tinyllm eval
--tools on`), chat records run through the tool loop (`inference/tool_loop.py`): the model is shown the tools, its
calls run, and the final answer is judged. Tool-call validity is then reported too: of the records with a
`tool_call`, the share whose first reply makes exactly one call that parses, names that tool and passes those
arguments.
Repetition is reported too (`repetition`: distinct-n, the repeated 4-gram rate and the share of replies in a loop, as
`evaluation/repetition.py` defines them), over the final replies.
"""

import json
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.evaluation.engine import greedy_generate
from tinyllm_hf.evaluation.repetition import repetition_metrics
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
    toolbox=None,
) -> dict:
    """Accuracy of `runtime` (any runtime of `inference/runtime.py`) on `examples`; each reply is `max_new_tokens`
    long at most (None: the rest of the context after its prompt). `toolbox` (an `inference.tool_loop.Toolbox`):
    answer chat records with tools (each round's reply gets the same budget)."""
    prepared = [prepare(r, i) for i, r in enumerate(examples)]
    needs_chat = any(isinstance(query, list) for query, *_ in prepared)
    if needs_chat and not runtime.chat_template:
        raise UsageError("task records with 'messages' need a tokenizer with a chat template")
    first_replies: dict[int, dict] = {}
    if toolbox is None:
        prompts = [runtime.render_chat(query) if isinstance(query, list) else query for query, *_ in prepared]
        replies = greedy_generate(runtime, prompts, max_new_tokens, batch_size, progress)
    else:
        replies, first_replies = answer_with_tools(runtime, prepared, toolbox, max_new_tokens, batch_size, progress)
    per_task: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    for (_, answers, task, checker), reply in zip(prepared, replies):
        per_task[task]["n"] += 1
        per_task[task]["correct"] += CHECKERS[checker](reply, answers)
    for entry in per_task.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    n, correct = len(prepared), sum(e["correct"] for e in per_task.values())
    results = {
        "mode": "gen",
        "shots": 0,
        "tools": toolbox is not None,
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "per_task": dict(sorted(per_task.items())),
        "repetition": repetition_metrics(replies),
    }
    if toolbox is not None:
        results["tool_calls"] = tool_call_validity(examples, first_replies)
    return results


def answer_with_tools(runtime, prepared, toolbox, max_new_tokens, batch_size, progress) -> tuple[list[str], dict]:
    """(final reply text of each record, {record index: its first parsed reply}) through the tool loop; raw-prompt
    records are answered without tools."""
    from tinyllm_hf.inference.runtime import SamplingParams
    from tinyllm_hf.inference.tool_loop import DoneEvent, tool_loop

    chats = [i for i, (query, *_) in enumerate(prepared) if isinstance(query, list)]
    raw = sorted(set(range(len(prepared))) - set(chats))
    replies = [""] * len(prepared)
    for i, reply in zip(raw, greedy_generate(runtime, [prepared[i][0] for i in raw], max_new_tokens, batch_size)):
        replies[i] = reply
    greedy = [SamplingParams(max_tokens=1, temperature=0.0) for _ in chats]
    first: dict[int, dict] = {}
    bar = tqdm(total=len(chats), desc="generate with tools", disable=not progress, leave=False)
    for event in tool_loop(runtime, [prepared[i][0] for i in chats], toolbox, greedy, max_new_tokens,
                           batch_size=batch_size):
        if isinstance(event, DoneEvent):
            replies[chats[event.row]] = event.content
            first[chats[event.row]] = event.first_reply
            bar.update()
    bar.close()
    return replies, first


def tool_call_validity(examples: list[dict], first_replies: dict[int, dict]) -> dict:
    """Of the records with an expected `tool_call`: how many first replies made it exactly (one call, parsed, that
    tool, those arguments), how many called a tool at all, and how many wrote a call that did not parse."""
    n = valid = called = malformed = 0
    for i, record in enumerate(examples):
        expected = record.get("tool_call")
        if expected is None or i not in first_replies:
            continue
        reply = first_replies[i]
        n += 1
        called += bool(reply["tool_calls"] or reply["invalid_tool_calls"])
        malformed += bool(reply["invalid_tool_calls"])
        calls = [call["function"] for call in reply["tool_calls"]]
        valid += calls == [{"name": expected["name"], "arguments": expected["arguments"]}]
    return {"n": n, "valid": valid, "validity": valid / n if n else None, "called": called, "malformed": malformed}
