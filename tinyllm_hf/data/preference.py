"""Preference data (prompt, chosen, rejected) for DPO and reward models, always conversational.

- **Your own data** (`load_preference_dataset`): a local .jsonl/.json file or folder, or a Hugging Face dataset name,
  with `prompt`, `chosen`, `rejected`, each either a string or a list of chat messages (TRL's standard and
  conversational preference formats). Rows are validated; a malformed row is reported with its line number and either
  stops the load (`malformed="error"`) or is skipped and counted (`malformed="skip"`), never dropped silently.

- **The embedded default set** (`build_default_preferences`): for the checkable SFT tasks, the chosen answer is the
  correct one and the rejected answer a plausible wrong one: the flipped sentiment label, or the explanation,
  definition or 歇后语 answer of another entry. Prompts are built by the SFT builders themselves, so a preference pair
  asks exactly what SFT taught and evaluation checks. Items are split by `records.split_of`, as in SFT: an idiom held
  out of SFT is held out here too.
"""

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

from tinyllm_hf.data import sft
from tinyllm_hf.data.corpus import stable_fraction
from tinyllm_hf.data.records import load_records, split_of

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
    if malformed not in sft.MALFORMED_POLICIES:
        raise ValueError(f"malformed must be one of {', '.join(sft.MALFORMED_POLICIES)}, not {malformed!r}")
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.endswith(sft.LOCAL_SUFFIXES):
        rows = (item for file in sft.local_files(path) for item in sft._local_rows(file))
    else:
        rows = sft._hub_rows(source, config, split)
    kept, bad = [], []
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            kept.append(to_preference(row))
        except sft.MalformedRowError as err:
            if malformed == "error":
                raise sft.MalformedRowError(f"{where}: {err} (pass --malformed skip to skip such rows)") from None
            bad.append(f"{where}: {err}")
    if bad:
        sft.logger.warning(f"{source}: skipped {len(bad)} malformed of {len(bad) + len(kept)} rows:\n  "
                           + "\n  ".join(bad[:sft.MAX_REPORTED]))
    if not kept:
        raise ValueError(f"{source}: no valid preference pairs ({len(bad)} malformed rows)")
    return datasets.Dataset.from_list(kept)


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
    if split not in sft.SPLITS:
        raise ValueError(f"split must be one of {', '.join(sft.SPLITS)}, not {split!r}")
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown preference task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    sizes = sizes or {}
    rows = []
    for task in tasks:
        kind = TASKS[task][0]
        records = [r for r in load_records(kind) if split_of(r["id"]) == split]
        pairs = list(_pairs(task, records))
        rows += pairs[: sizes.get(task, len(pairs))]
    if not rows:
        raise ValueError(f"no {split} preference pairs for tasks {', '.join(tasks)}")
    # Shuffled before building the Dataset: Dataset.shuffle + flatten_indices rewrites nested columns very slowly.
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)
