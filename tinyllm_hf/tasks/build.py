"""The embedded data sets, built from the task registry: SFT conversations, preference pairs, RL prompts and held-out
evaluation records. Items are split by `records.split_of(item id)`, so an idiom or review used in training never
appears in any held-out set; wording, order and shuffling depend only on item ids and the seed, so a build is
identical on every run.

    python -m tinyllm_hf.tasks out.jsonl --as-task-records --sizes sentiment=200   # held-out records for `tinyllm eval`
"""

import argparse
import functools
import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets

from tinyllm_hf.data.corpus import stable_fraction
from tinyllm_hf.errors import UsageError
from tinyllm_hf.tasks.common import SPLITS, Task
from tinyllm_hf.tasks.registry import HELDOUT_TASKS, PREFERENCE_TASKS, RL_TASKS, TASKS, check_tasks


def parse_task_sizes(text: str | dict | None) -> dict[str, int]:
    """'sentiment=6000,xiehouyu=500' (or a dict) -> {task: count}; every name checked against TASKS."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        sizes = dict(text)
    else:
        sizes = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not value.strip().isdigit():
                raise UsageError(f"task sizes: expected task=count, got {item!r}")
            sizes[name.strip()] = int(value)
    check_tasks(sizes, tuple(TASKS), "SFT")
    return sizes


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def records_by_kind(tasks: Iterable[str], split: str) -> dict[str, list[dict]]:
    """kind -> `split`'s records, read once for all the tasks of a kind."""
    records = {}
    for name in tasks:
        task = TASKS[name]
        if task.kind not in records:
            records[task.kind] = task.records(split)
    return records


def shuffled_dataset(rows: list[dict], seed: int) -> datasets.Dataset:
    # Shuffled here, before Arrow: a shuffled Dataset would need a slow flatten_indices to stay contiguous.
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------------------------
# SFT conversations
# --------------------------------------------------------------------------------------------------------------------


def take(candidates: Iterable[tuple[str, dict]], converse: Callable[[str, dict], list[dict] | None],
         count: int | None, order: str, repeat: bool) -> list[dict]:
    """Rows {id, task, messages} of `count` (task name, record) candidates in a fixed pseudo-random order (all when
    None); with `repeat`, cycling when more are asked for. `converse(name, record)` makes the messages (None: the
    record has no conversation, skipped). Candidates are put in order first, so only the rows kept are built."""
    candidates = sorted(candidates, key=lambda candidate: stable_fraction(candidate[1]["id"], f"sft-order-{order}:"))
    rows = []
    for name, record in candidates:
        if count is not None and len(rows) == count:
            break
        messages = converse(name, record)
        if messages is not None:
            rows.append({"id": record["id"], "task": name, "messages": messages})
    if repeat and rows and count is not None and count > len(rows):
        return [rows[i % len(rows)] for i in range(count)]
    return rows


def task_conversation(name: str, record: dict) -> list[dict] | None:
    return TASKS[name].conversation(record)


def build_default_sft(split: str = "train", tasks: Iterable[str] | None = None, sizes: dict[str, int] | None = None,
                      seed: int = 0, tool_sizes: dict[str, int] | str | None = None) -> datasets.Dataset:
    """The embedded SFT set: columns `id` (the record's), `task` and `messages` (and `tools`), shuffled with `seed`.

    split: "train" or "heldout" (records.split_of decides for each item; identity questions are always "train").
    tasks: task names (default: all of TASKS). sizes: {task: number of conversations}; a task not named keeps all of
    its conversations. In the train split, identity (and any task) is repeated to reach a size larger than it is.
    tool_sizes: {kind: count} of tool-use conversations (`tinyllm_hf.tasks.tool_use.TOOL_KINDS`), which carry the
    built-in tools' schemas as JSON in a `tools` column (None for the plain conversations; without tool_sizes there
    is no such column). An empty `tasks` list with `tool_sizes` builds tool-use conversations only.
    """
    from tinyllm_hf.tasks.tool_use import build_tool_rows, parse_tool_sizes

    check_split(split)
    tool_sizes = parse_tool_sizes(tool_sizes)
    tasks = check_tasks(tasks, tuple(TASKS), "SFT")
    sizes = parse_task_sizes(sizes)
    records = records_by_kind(tasks, split)
    rows = []
    for name in tasks:
        candidates = [(name, record) for record in records[TASKS[name].kind]]
        rows += take(candidates, task_conversation, sizes.get(name), name, repeat=split == "train")
    if tool_sizes:
        rows = [{**row, "tools": None} for row in rows] + build_tool_rows(split, tool_sizes, seed)
    if not rows:
        raise UsageError(f"no {split} conversations for tasks {', '.join(tasks)}")
    return shuffled_dataset(rows, seed)


def heldout_task_records(tasks: Iterable[str] | None = None, sizes: dict[str, int] | str | None = None) -> list[dict]:
    """Held-out conversations as task records for `tinyllm_hf.evaluation.tasks.evaluate_tasks` (and
    `tinyllm eval --tasks tasks --tasks-file`): the final assistant message is the reference answer, judged by the
    task's checker (exact after normalisation, so "正面。" counts as "正面"). Ordered by task, then item id."""
    tasks = [t for t in (tasks or TASKS) if t in HELDOUT_TASKS or t not in TASKS]  # an unknown name fails in the build
    heldout = build_default_sft("heldout", tasks, sizes)
    order = sorted(range(len(heldout)), key=lambda i: (tasks.index(heldout[i]["task"]), heldout[i]["id"]))
    # Every right answer of an item counts (a 歇后语's second halves, the dictionary's whole entry).
    answers = {(row["task"], row["id"]): TASKS[row["task"]].accepted_answers(record)
               for row in heldout for record in [heldout_record(row["task"], row["id"])]}
    records = []
    for i in order:
        task, item_id = heldout[i]["task"], heldout[i]["id"]
        record = {"id": item_id, "task": task, "messages": heldout[i]["messages"], "answer": answers[task, item_id],
                  "checker": TASKS[task].checker}
        if TASKS[task].tool is not None:  # what a right first reply calls when tools are on
            record["tool_call"] = {"name": TASKS[task].tool,
                                   "arguments": TASKS[task].tool_arguments(heldout_record(task, item_id))}
        records.append(record)
    return records


def heldout_record(task: str, item_id: str) -> dict:
    return _heldout_records(task)[item_id]


@functools.cache
def _heldout_records(task: str) -> dict[str, dict]:
    return {record["id"]: record for record in TASKS[task].records("heldout")}


def write_task_file(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------------------------------


def preference_pairs(task: Task, records: list[dict]) -> Iterator[dict]:
    """Chosen = the task's answer, rejected = the answer to the record with its distractor's wrong value; the prompt
    is the SFT question itself, so a pair asks exactly what SFT taught and evaluation checks."""
    field, wrong_value = task.distractor.field, task.distractor.wrong_value
    # A fixed pseudo-random order; each entry's distractor comes from its successor in that order.
    ordered = sorted(records, key=lambda r: stable_fraction(r["id"], f"preference-{task.name}:"))
    for i, record in enumerate(ordered):
        wrong = wrong_value(record, ordered[(i + 1) % len(ordered)])
        if not wrong or wrong == record[field]:
            continue
        chosen, rejected = task.conversation(record), task.conversation({**record, field: wrong})
        if chosen is None or rejected is None or chosen[-1] == rejected[-1]:
            continue
        yield {"id": record["id"], "task": task.name, "prompt": chosen[:-1], "chosen": chosen[-1:],
               "rejected": rejected[-1:]}


def build_default_preferences(split: str = "train", tasks: Iterable[str] | None = None,
                              sizes: dict[str, int] | None = None, seed: int = 0) -> datasets.Dataset:
    """The embedded preference set: columns id, task, prompt, chosen, rejected (conversational), shuffled with `seed`.

    split: "train" or "heldout", decided per item by `records.split_of` exactly as for SFT.
    tasks: default all of PREFERENCE_TASKS. sizes: {task: number of pairs}; a task not named keeps all its pairs.
    """
    check_split(split)
    tasks = check_tasks(tasks, PREFERENCE_TASKS, "preference")
    sizes = sizes or {}
    rows = []
    for name in tasks:
        pairs = list(preference_pairs(TASKS[name], TASKS[name].records(split)))
        rows += pairs[: sizes.get(name, len(pairs))]
    if not rows:
        raise UsageError(f"no {split} preference pairs for tasks {', '.join(tasks)}")
    return shuffled_dataset(rows, seed)


# --------------------------------------------------------------------------------------------------------------------
# RL prompts
# --------------------------------------------------------------------------------------------------------------------


def build_prompt_dataset(split: str = "train", tasks: Iterable[str] | None = None,
                         sizes: dict[str, int] | None = None, seed: int = 0) -> datasets.Dataset:
    """Columns id, task, prompt (messages ending with the user's question) and answer (the reference reply), for
    on-policy RL, shuffled with `seed`. The prompts are exactly the SFT questions of the same items; the `task` column
    tells the correctness reward how to score a reply (`Task.reward`).

    split: "train" or "heldout" (`records.split_of`, as for SFT). tasks: default all of RL_TASKS.
    sizes: {task: number of prompts}; default all.
    """
    check_split(split)
    tasks = check_tasks(tasks, RL_TASKS, "RL prompt")
    sizes = sizes or {}
    rows = []
    for name in tasks:
        task = TASKS[name]
        records = sorted(task.records(split), key=lambda r: stable_fraction(r["id"], f"rl-{name}:"))
        task_rows = []
        for record in records:
            conversation = task.conversation(record)
            if conversation is not None:
                task_rows.append({"id": record["id"], "task": name, "prompt": conversation[:-1],
                                  "answer": conversation[-1]["content"]})
            if len(task_rows) == sizes.get(name):
                break
        rows += task_rows
    if not rows:
        raise UsageError(f"no {split} prompts for tasks {', '.join(tasks)}")
    return shuffled_dataset(rows, seed)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m tinyllm_hf.tasks`: write the default SFT set's train or held-out conversations to JSONL."""
    p = argparse.ArgumentParser(prog="python -m tinyllm_hf.tasks", description=main.__doc__)
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)} (default: all)")
    p.add_argument("--sizes", default=None, help="conversations per task, e.g. sentiment=500,xiehouyu=200")
    p.add_argument("--as-task-records", action="store_true", help="held-out split in the task-evaluation format")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    if args.as_task_records:
        rows = heldout_task_records(tasks, args.sizes)
    else:
        rows = build_default_sft(args.split, tasks, args.sizes).to_list()
    path = write_task_file(rows, args.output)
    print(f"{len(rows)} conversations written to {path}")
    return 0
