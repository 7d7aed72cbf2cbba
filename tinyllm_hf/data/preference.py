"""Your own preference data (prompt, chosen, rejected) for DPO and reward models, and your own prompts for on-policy RL
(GRPO, RLOO); always conversational. The embedded default sets are built from the task registry
(`tinyllm_hf.tasks.build_default_preferences`, `build_prompt_dataset`).

- **Preference pairs** (`load_preference_dataset`): a local .jsonl/.json file or folder, or a Hugging Face dataset name,
  with `prompt`, `chosen`, `rejected`, each either a string or a list of chat messages (TRL's standard and
  conversational preference formats). Rows are validated; a malformed row is reported with its line number and either
  stops the load (`malformed="error"`) or is skipped and counted (`malformed="skip"`), never dropped silently. An
  optional `margin` (a number >= 0: how much higher the reward model should score the chosen answer) is kept for the
  reward stage, which trains with it; it must then be on every pair.

- **RL prompts** (`load_prompt_dataset`): `prompt` (a string or messages ending with the user) and, for the
  correctness reward (`tinyllm_hf.trainers.rewards`), the reference `answer` and the `task` it is scored as.
"""

import math

import datasets

from tinyllm_hf.data import sft
from tinyllm_hf.errors import UsageError

FIELDS = ("prompt", "chosen", "rejected")


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
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in row:
        margin = row["margin"]
        # A negative margin would teach the reward model that the rejected answer may score higher.
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise sft.MalformedRowError(f"margin must be a number >= 0, got {margin!r}")
        pair["margin"] = float(margin)
    return pair


def load_preference_dataset(source: str, malformed: str = "error", split: str = "train",
                            config: str | None = None) -> datasets.Dataset:
    """Preference pairs from a local .jsonl/.json file or folder, or a Hub dataset, as conversational columns."""
    rows = sft.read_rows(source, split, config, what="preference data")
    pairs = sft.convert_rows(rows, to_preference, malformed, source, "preference pairs")
    with_margin = sum("margin" in pair for pair in pairs)
    if 0 < with_margin < len(pairs):
        raise UsageError(f"{source}: {with_margin} of {len(pairs)} pairs have a margin; give it on every pair or none")
    return datasets.Dataset.from_list(pairs)


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
