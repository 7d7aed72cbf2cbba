"""Preference data (prompt, chosen, rejected) for DPO and reward models, and prompts with checkable answers for
on-policy RL (GRPO, RLOO); always conversational.

- **Your own data** (`load_preference_dataset`): a local .jsonl/.json file or folder, or a Hugging Face dataset name,
  with `prompt`, `chosen`, `rejected`, each either a string or a list of chat messages (TRL's standard and
  conversational preference formats). Rows are validated; a malformed row is reported with its line number and either
  stops the load (`malformed="error"`) or is skipped and counted (`malformed="skip"`), never dropped silently.

- **The embedded default set** (`build_default_preferences`): for the checkable SFT tasks, the chosen answer is the
  correct one and the rejected answer a plausible wrong one: the flipped sentiment label, or the explanation,
  definition or 歇后语 answer of another entry. Prompts are built by the SFT builders themselves, so a preference pair
  asks exactly what SFT taught and evaluation checks. Items are split by `records.split_of`, as in SFT: an idiom held
  out of SFT is held out here too.

- **RL prompts** (`build_prompt_dataset`): the same checkable tasks as prompts only, with the reference `answer` and the
  `task` kept as columns for the reward functions (`tinyllm_hf.trainers.rewards`), split by item in the same way.
"""

import random
from collections.abc import Iterable, Iterator

import datasets

from tinyllm_hf.data import sft
from tinyllm_hf.data.corpus import stable_fraction
from tinyllm_hf.data.records import split_records
from tinyllm_hf.errors import UsageError

FIELDS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------------------------------------------------
# Your own preference data
# --------------------------------------------------------------------------------------------------------------------


def _as_messages(value, field: str, role_of_last: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise sft.MalformedRowError(f"{field} is empty")
        return [{"role": role_of_last, "content": value}]
    if not isinstance(value, list) or not value:
        raise sft.MalformedRowError(f"{field} must be a non-empty string or list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise sft.MalformedRowError(f"{field}[{i}] must be a message with role and content")
        if message["role"] not in sft.ROLES:
            raise sft.MalformedRowError(f"{field}[{i}]: role {message['role']!r} is not one of {', '.join(sft.ROLES)}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise sft.MalformedRowError(f"{field}[{i}] ({message['role']}): content is empty")
    if value[-1]["role"] != role_of_last:
        raise sft.MalformedRowError(f"{field} must end with a {role_of_last} message")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_preference(row) -> dict:
    """One row -> {"prompt": [messages ending with the user], "chosen": [assistant], "rejected": [assistant]}."""
    if not isinstance(row, dict):
        raise sft.MalformedRowError(f"expected a JSON object, got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise sft.MalformedRowError(f"missing field(s) {', '.join(missing)} (need prompt, chosen, rejected)")
    prompt = _as_messages(row["prompt"], "prompt", "user")
    chosen = _as_messages(row["chosen"], "chosen", "assistant")
    rejected = _as_messages(row["rejected"], "rejected", "assistant")
    if chosen == rejected:
        raise sft.MalformedRowError("chosen and rejected are identical")
    sft.validate_messages(prompt + chosen)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preference_dataset(source: str, malformed: str = "error", split: str = "train",
                            config: str | None = None) -> datasets.Dataset:
    """Preference pairs from a local .jsonl/.json file or folder, or a Hub dataset, as conversational columns."""
    rows = sft.read_rows(source, split, config, what="preference data")
    return datasets.Dataset.from_list(sft.convert_rows(rows, to_preference, malformed, source, "preference pairs"))


def to_prompt(row) -> dict:
    """One RL prompt row -> {"prompt": [messages ending with the user], "answer": str, "task": str}.

    `answer` (the reference reply) and `task` are optional; without them only rewards that need neither apply."""
    if not isinstance(row, dict):
        raise sft.MalformedRowError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise sft.MalformedRowError("missing field prompt")
    prompt = _as_messages(row["prompt"], "prompt", "user")
    # A prompt is a conversation up to (not including) the reply: valid once any reply is appended.
    sft.validate_messages(prompt + [{"role": "assistant", "content": "-"}])
    for name in ("answer", "task"):
        if not isinstance(row.get(name, ""), str):
            raise sft.MalformedRowError(f"{name} must be a string")
    return {"prompt": prompt, "answer": row.get("answer", ""), "task": row.get("task", "default")}


def load_prompt_dataset(source: str, malformed: str = "error", split: str = "train",
                        config: str | None = None) -> datasets.Dataset:
    """RL prompts (`prompt`, optional `answer` and `task`) from a local .jsonl/.json file or folder, or a Hub dataset."""
    rows = sft.read_rows(source, split, config, what="prompt data")
    return datasets.Dataset.from_list(sft.convert_rows(rows, to_prompt, malformed, source, "prompts"))


# --------------------------------------------------------------------------------------------------------------------
# The embedded default preference set
# --------------------------------------------------------------------------------------------------------------------

FLIPPED_SENTIMENT = {"pos": "neg", "neg": "pos"}

# task -> (record kind, the record field holding the answer). The wrong answer of a sentiment pair flips the label;
# for the other tasks it is the same field of another entry, so it reads like a real answer but answers something else.
TASKS = {
    "sentiment": ("reviews", "label"),
    "idiom_meaning": ("idioms", "explanation"),
    "word_definition": ("words", "definition"),
    "xiehouyu": ("xiehouyu", "answer"),
}


def _check_split_and_tasks(split: str, tasks: Iterable[str] | None) -> list[str]:
    if split not in sft.SPLITS:
        raise UsageError(f"split must be one of {', '.join(sft.SPLITS)}, not {split!r}")
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; the checkable tasks are {', '.join(TASKS)}")
    return tasks


def _pairs(task: str, records: list[dict]) -> Iterator[dict]:
    kind, field = TASKS[task]
    build = sft.TASKS[task][1]
    # A fixed pseudo-random order; each entry's distractor is its successor in that order.
    ordered = sorted(records, key=lambda r: stable_fraction(r["id"], f"preference-{task}:"))
    for i, record in enumerate(ordered):
        if task == "sentiment":
            wrong_value = FLIPPED_SENTIMENT[record[field]]
        else:
            wrong_value = ordered[(i + 1) % len(ordered)][field]
            if not wrong_value or wrong_value == record[field]:
                continue
        chosen, rejected = build(record), build({**record, field: wrong_value})
        if chosen is None or rejected is None or chosen[-1] == rejected[-1]:
            continue
        yield {"id": record["id"], "task": task, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def build_default_preferences(split: str = "train", tasks: Iterable[str] | None = None,
                              sizes: dict[str, int] | None = None, seed: int = 0) -> datasets.Dataset:
    """The embedded preference set: columns id, task, prompt, chosen, rejected (conversational), shuffled with `seed`.

    split: "train" or "heldout", decided per item by `records.split_of` exactly as for SFT.
    sizes: {task: number of pairs}; a task not named keeps all its pairs.
    """
    tasks = _check_split_and_tasks(split, tasks)
    sizes = sizes or {}
    rows = []
    for task in tasks:
        pairs = list(_pairs(task, split_records(TASKS[task][0], split)))
        rows += pairs[: sizes.get(task, len(pairs))]
    if not rows:
        raise UsageError(f"no {split} preference pairs for tasks {', '.join(tasks)}")
    # Shuffled before building the Dataset: Dataset.shuffle + flatten_indices rewrites nested columns very slowly.
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------------------------
# Prompts with checkable answers for on-policy RL
# --------------------------------------------------------------------------------------------------------------------


def build_prompt_dataset(split: str = "train", tasks: Iterable[str] | None = None,
                         sizes: dict[str, int] | None = None, seed: int = 0) -> datasets.Dataset:
    """Columns id, task, prompt (messages ending with the user's question) and answer (the reference reply), for the
    checkable tasks, shuffled with `seed`. The prompts are exactly the SFT questions of the same items.

    split: "train" or "heldout" (`records.split_of`, as for SFT). sizes: {task: number of prompts}; default all.
    """
    tasks = _check_split_and_tasks(split, tasks)
    sizes = sizes or {}
    rows = []
    for task in tasks:
        build = sft.TASKS[task][1]
        records = sorted(split_records(TASKS[task][0], split), key=lambda r: stable_fraction(r["id"], f"rl-{task}:"))
        task_rows = []
        for record in records:
            conversation = build(record)
            if conversation is not None:
                task_rows.append({"id": record["id"], "task": task, "prompt": conversation[:-1],
                                  "answer": conversation[-1]["content"]})
            if len(task_rows) == sizes.get(task):
                break
        rows += task_rows
    if not rows:
        raise UsageError(f"no {split} prompts for tasks {', '.join(tasks)}")
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)
