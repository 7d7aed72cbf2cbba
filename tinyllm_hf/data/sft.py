"""Instruction data for supervised fine-tuning, always as conversational `messages`.

Two kinds of source:

- **Your own data** (`load_sft_dataset`): a local .jsonl/.json file or folder, or a Hugging Face dataset name, in any of
  the common formats, each row normalised to `{"messages": [{"role", "content"}, ...]}`:

      TRL / OpenAI   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
      ShareGPT       {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
      Alpaca         {"instruction": ..., "input": ..., "output": ...}
      question/answer {"question": ..., "answer": ...}        (the reference project's JSONL)

  A row that is not valid (bad JSON, no known format, roles out of order, empty text, a conversation that does not end
  with the assistant) is reported with its line number (row number for Hub datasets). `malformed="error"` stops at the
  first one; `malformed="skip"` drops them and logs how many and where. Rows are never dropped silently.

- **The embedded default set** (`build_default_sft`): questions with checkable answers built from the corpus packages'
  structured records (`tinyllm_hf.data.records`): what an idiom means, where it comes from, how to use it; what a word or
  character means; the second half of a 歇后语; whether a review is positive or negative; the person, place and
  organisation names in a People's Daily sentence; word segmentation of a sentence; and a small identity set. Items are
  split by `records.split_of(item id)`, so an idiom or review used in training never appears in the held-out set, which
  `heldout_task_records` turns into task records for `tinyllm eval --tasks tasks`.

Question wording varies between a few phrasings per task, chosen from the item id, so a build is identical on every run.
"""

import argparse
import json
import logging
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets

from tinyllm_hf.data.corpus import is_local_source, local_files, stable_fraction
from tinyllm_hf.data.records import record_id, split_records
from tinyllm_hf.options import count, parse_key_values

logger = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "qa")
MALFORMED_POLICIES = ("error", "skip")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names seen in the wild -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
LOCAL_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED = 10  # malformed rows listed by line in a skip warning (the count is always complete)


class MalformedRowError(ValueError):
    """A row of an instruction dataset that cannot be turned into a valid conversation."""


# --------------------------------------------------------------------------------------------------------------------
# One row -> messages
# --------------------------------------------------------------------------------------------------------------------


def detect_format(row: dict) -> str:
    """The format of one row, from its keys."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "question" in row and "answer" in row:
        return "qa"
    raise MalformedRowError(
        f"no known format: expected 'messages', 'conversations', 'instruction'+'output' or 'question'+'answer' "
        f"(keys: {', '.join(map(str, row)) or 'none'})"
    )


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise MalformedRowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_messages(row: dict) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise MalformedRowError(f"'messages' must be a list, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MalformedRowError(f"message {i} must be an object with 'role' and 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _from_sharegpt(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise MalformedRowError(f"'conversations' must be a list, got {type(turns).__name__}")
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MalformedRowError(f"conversation turn {i} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise MalformedRowError(f"conversation turn {i}: unknown speaker {turn['from']!r}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _from_alpaca(row: dict) -> list[dict]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


def _from_qa(row: dict) -> list[dict]:
    return [{"role": "user", "content": _text(row, "question")}, {"role": "assistant", "content": _text(row, "answer")}]


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "qa": _from_qa,
}


def validate_messages(messages: list[dict]) -> list[dict]:
    """Check that `messages` is what the tinyllm chat format renders and trains on: an optional leading system
    message, then user and assistant turns alternating, ending with the assistant; every content a non-empty string."""
    if not messages:
        raise MalformedRowError("the conversation is empty")
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise MalformedRowError(f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise MalformedRowError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
        if not message["content"].strip():
            raise MalformedRowError(f"message {i} ({message['role']}): content is empty")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise MalformedRowError(f"message {i}: expected role {expected!r}, got {messages[i]['role']!r}")
    if messages[-1]["role"] != "assistant":
        raise MalformedRowError("the conversation must end with an assistant message")
    return messages


def to_messages(row, fmt: str = "auto") -> list[dict]:
    """Normalise one row of any supported format to validated chat messages (MalformedRowError says why not)."""
    if not isinstance(row, dict):
        raise MalformedRowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown instruction format {fmt!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    try:
        messages = CONVERTERS[fmt](row)
    except KeyError as err:
        raise MalformedRowError(f"missing field {err.args[0]!r} for format {fmt!r}") from None
    return validate_messages(messages)


# --------------------------------------------------------------------------------------------------------------------
# Files and Hub datasets -> Dataset of messages
# --------------------------------------------------------------------------------------------------------------------


def read_local_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed row or the MalformedRowError of a line that is not JSON) for each record of a .jsonl file, or
    (where, row) for each element of a .json list; `where` is `file:line` or `file[index]`, for error messages."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"{path}:{lineno}", MalformedRowError(f"not valid JSON ({err.msg})")
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a .json data file must hold a list of rows")
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def read_hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a split of a Hugging Face dataset; ValueError saying why when it cannot load."""
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, gated repository...: say what the argument could have meant
        raise ValueError(
            f"{name!r} is not 'default' nor an existing local path, and loading it as a Hugging Face dataset failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    for index, row in enumerate(dataset):
        yield f"{name} row {index}", row


def read_rows(source: str, split: str = "train", config: str | None = None,
              what: str = "instruction data") -> Iterator[tuple[str, object]]:
    """(where, row) of every record of a local .jsonl/.json file or folder, or of a Hugging Face dataset split: the
    raw rows behind the SFT, preference and RL-prompt loaders."""
    if is_local_source(source, LOCAL_SUFFIXES):
        path = Path(source).expanduser()
        return (item for file in local_files(path, LOCAL_SUFFIXES, what) for item in read_local_rows(file))
    return read_hub_rows(source, config, split)


def convert_rows(rows: Iterable[tuple[str, object]], convert: Callable[[object], dict], malformed: str = "error",
                 source: str = "data", what: str = "conversations") -> list[dict]:
    """`convert(row)` for every row; a row that is not valid (an exception in `rows`, or `convert` raising
    MalformedRowError) raises naming where it is (`malformed="error"`) or is counted and logged (`"skip"`)."""
    if malformed not in MALFORMED_POLICIES:
        raise ValueError(f"malformed must be one of {', '.join(MALFORMED_POLICIES)}, not {malformed!r}")
    kept, bad = [], []
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            kept.append(convert(row))
        except MalformedRowError as err:
            if malformed == "error":
                raise MalformedRowError(f"{where}: {err} (pass --malformed skip to skip such rows)") from None
            bad.append(f"{where}: {err}")
    if bad:
        shown = "\n  ".join(bad[:MAX_REPORTED]) + ("\n  ..." if len(bad) > MAX_REPORTED else "")
        logger.warning(f"{source}: skipped {len(bad)} malformed of {len(bad) + len(kept)} rows:\n  {shown}")
    if not kept:
        raise ValueError(f"{source}: no valid {what} ({len(bad)} malformed rows)")
    return kept


def load_sft_dataset(source: str, fmt: str = "auto", malformed: str = "error", split: str = "train",
                     config: str | None = None) -> datasets.Dataset:
    """Instruction data from a local .jsonl/.json file or folder, or a Hugging Face dataset name, as a Dataset with a
    `messages` column (see the module docstring for the formats)."""
    rows = convert_rows(read_rows(source, split, config), lambda row: {"messages": to_messages(row, fmt)}, malformed,
                        source)
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------------------------
# The embedded default SFT set
# --------------------------------------------------------------------------------------------------------------------

SENTIMENT_LABELS = {"pos": "正面", "neg": "负面"}
ENTITY_NAMES = {"person": "人名", "place": "地名", "organization": "机构名"}
NONE_ANSWER = "无"
# Long reviews and sentences would not fit the small models' 256-token context next to the question.
MAX_REVIEW_CHARS = 150
MAX_SENTENCE_CHARS = 80
MIN_SENTENCE_CHARS = 8
MAX_SENSES = 3  # senses of a character kept in its answer

IDENTITY_ANSWER = (
    "我是 tinyllm，一个用 Hugging Face 工具链从零训练的小型中文语言模型。我会解释成语和词语、补全歇后语、"
    "判断评论的情感、找出句子里的人名地名和机构名，也会给句子分词。我的知识很有限，回答可能出错。"
)
# (question, answer) pairs; answers about the model itself, consistent with the default system prompt.
IDENTITY_QA = [
    ("你是谁？", IDENTITY_ANSWER),
    ("请介绍一下你自己。", IDENTITY_ANSWER),
    ("你叫什么名字？", "我叫 tinyllm，是一个小型的中文语言模型。"),
    ("你能做什么？", IDENTITY_ANSWER),
    ("你是人吗？", "不是，我是 tinyllm，一个小型的中文语言模型，由程序训练出来。"),
    ("你是谁开发的？", "我是 tinyllm 项目从零训练的模型，训练用的是 Hugging Face 的 transformers、TRL 等开源工具。"),
    ("你的回答可靠吗？", "不一定。我是一个很小的模型，知识有限，重要的事情请核对可靠的资料。"),
    ("Who are you?", "我是 tinyllm，一个小型的中文语言模型，主要用中文回答问题。"),
    ("你好", "你好！我是 tinyllm，有什么可以帮你的吗？"),
    ("你好！你是什么模型？", "你好！我是 tinyllm，一个从零训练的小型中文语言模型。"),
    ("谢谢你", "不客气！还有什么问题可以继续问我。"),
    ("再见", "再见，祝你愉快！"),
]

_QUESTIONS = {
    "idiom_meaning": ["成语「{word}」是什么意思？", "请解释成语「{word}」。", "「{word}」这个成语怎么理解？"],
    "idiom_origin": ["成语「{word}」出自哪里？", "「{word}」这个成语的出处是什么？"],
    "idiom_usage": ["请用成语「{word}」造一个句子。", "成语「{word}」怎么用？举个例子。"],
    "word_definition": ["词语「{word}」是什么意思？", "请解释「{word}」这个词。"],
    "char_definition": ["汉字「{char}」怎么读？是什么意思？", "「{char}」这个字读什么，有什么意思？"],
    "xiehouyu": ["歇后语「{riddle}——」的下半句是什么？", "补全歇后语：{riddle}——"],
    "sentiment": [
        "判断下面这条评论的情感是正面还是负面，只回答“正面”或“负面”。\n评论：{text}",
        "这条评论是正面的还是负面的？只回答“正面”或“负面”。\n{text}",
    ],
    "entities": ["找出下面句子中的人名、地名和机构名。\n句子：{text}", "请列出这句话里的人名、地名、机构名：{text}"],
    "segmentation": ["请对下面的句子分词，词语之间用空格隔开。\n{text}", "给这句话分词（用空格分隔）：{text}"],
}
_FOLLOW_UP_ORIGIN = ["它出自哪里？", "这个成语的出处呢？"]


def _pick(options: list[str], item_id: str, salt: str) -> str:
    return options[int(stable_fraction(item_id, f"sft-wording-{salt}:") * len(options))]


def _chat(*turns: str) -> list[dict]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def _ask(task: str, record: dict, answer: str) -> list[dict]:
    return _chat(_pick(_QUESTIONS[task], record["id"], task).format(**record), answer)


def idiom_meaning(r):
    return _ask("idiom_meaning", r, r["explanation"]) if r["explanation"] else None


def idiom_origin(r):
    return _ask("idiom_origin", r, r["derivation"]) if r["derivation"] else None


def idiom_usage(r):
    if not r["example"]:
        return None
    source = f"（{r['example_source']}）" if r["example_source"] else ""
    return _ask("idiom_usage", r, f"例如：{r['example']}{source}")


def idiom_dialogue(r):
    """Two turns about one idiom: the second question refers back to the first ("它"), so it needs the history."""
    if not (r["explanation"] and r["derivation"]):
        return None
    question = _pick(_QUESTIONS["idiom_meaning"], r["id"], "idiom_meaning").format(**r)
    return _chat(question, r["explanation"], _pick(_FOLLOW_UP_ORIGIN, r["id"], "follow-up"), r["derivation"])


def word_definition(r):
    return _ask("word_definition", r, r["definition"].strip()) if r["definition"].strip() else None


def char_definition(r):
    if not r["readings"] or not r["readings"][0]["senses"]:
        return None
    reading = r["readings"][0]
    senses = [re.sub(r"\s+", "", sense) for sense in reading["senses"][:MAX_SENSES]]
    return _ask("char_definition", r, f"「{r['char']}」读 {reading['pinyin']}，意思是：{''.join(senses)}")


def xiehouyu(r):
    return _ask("xiehouyu", r, r["answer"])


def sentiment(r):
    if len(r["text"]) > MAX_REVIEW_CHARS:
        return None
    return _ask("sentiment", r, SENTIMENT_LABELS[r["label"]])


def _usable_sentence(r) -> bool:
    return MIN_SENTENCE_CHARS <= len(r["text"]) <= MAX_SENTENCE_CHARS


def entities_answer(entities: list[dict]) -> str:
    """'人名：江泽民；地名：无；机构名：中共中央' (each name once, in order of appearance)."""
    parts = []
    for label, name in ENTITY_NAMES.items():
        found = list(dict.fromkeys(e["text"] for e in entities if e["label"] == label))
        parts.append(f"{name}：{'、'.join(found) or NONE_ANSWER}")
    return "；".join(parts)


def entities(r):
    # Only sentences that name something: most sentences name nothing, and "无" everywhere teaches little.
    if not _usable_sentence(r) or not r["entities"]:
        return None
    return _ask("entities", r, entities_answer(r["entities"]))


def segmentation(r):
    words = [w for w in r["words"] if w.strip()]
    if not _usable_sentence(r) or len(words) < 2:
        return None
    return _ask("segmentation", r, " ".join(words))


# task -> (record kind, builder). A builder returns the conversation for a record, or None to leave the record out.
TASKS: dict[str, tuple[str, Callable[[dict], list[dict] | None]]] = {
    "idiom_meaning": ("idioms", idiom_meaning),
    "idiom_origin": ("idioms", idiom_origin),
    "idiom_usage": ("idioms", idiom_usage),
    "idiom_dialogue": ("idioms", idiom_dialogue),
    "word_definition": ("words", word_definition),
    "char_definition": ("chars", char_definition),
    "xiehouyu": ("xiehouyu", xiehouyu),
    "sentiment": ("reviews", sentiment),
    "entities": ("ner_sentences", entities),
    "segmentation": ("ner_sentences", segmentation),
    "identity": ("identity", None),
}
SPLITS = ("train", "heldout")


def parse_task_sizes(text: str | dict | None) -> dict[str, int]:
    """'sentiment=6000,xiehouyu=500' (or a dict) -> {task: count}; every name checked against TASKS."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        sizes = dict(text)
    else:
        sizes = parse_key_values(text, "task sizes", "task=count", count)
    unknown = sorted(set(sizes) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown SFT task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return sizes


def _identity_rows() -> list[dict]:
    return [{"id": record_id("identity", question), "task": "identity", "messages": _chat(question, answer)}
            for question, answer in IDENTITY_QA]


def _task_rows(task: str, records: list[dict]) -> list[dict]:
    _, build = TASKS[task]
    rows = []
    for record in records:
        messages = build(record)
        if messages is not None:
            rows.append({"id": record["id"], "task": task, "messages": messages})
    return rows


def _take(rows: list[dict], count: int | None, task: str, repeat: bool) -> list[dict]:
    """`count` rows in a fixed pseudo-random order (all when None); with `repeat`, cycle when more are asked for."""
    rows = sorted(rows, key=lambda row: stable_fraction(row["id"], f"sft-order-{task}:"))
    if count is None:
        return rows
    if repeat and rows and count > len(rows):
        return [rows[i % len(rows)] for i in range(count)]
    return rows[:count]


def build_default_sft(split: str = "train", tasks: Iterable[str] | None = None, sizes: dict[str, int] | None = None,
                      seed: int = 0) -> datasets.Dataset:
    """The embedded SFT set: columns `id` (the record's), `task` and `messages`, shuffled with `seed`.

    split: "train" or "heldout" (records.split_of decides for each item; identity questions are always "train").
    tasks: task names (default: all of TASKS). sizes: {task: number of conversations}; a task not named keeps all of
    its conversations. In the train split, identity (and any task) is repeated to reach a size larger than it is.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    tasks = list(TASKS) if tasks is None else list(tasks)
    sizes = parse_task_sizes(sizes)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown SFT task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    records: dict[str, list[dict]] = {}  # kind -> this split's records, read once for all tasks of the kind
    rows = []
    for task in tasks:
        kind = TASKS[task][0]
        if task == "identity":
            task_rows = _identity_rows() if split == "train" else []
        else:
            if kind not in records:
                records[kind] = split_records(kind, split)
            task_rows = _task_rows(task, records[kind])
        rows += _take(task_rows, sizes.get(task), task, repeat=split == "train")
    if not rows:
        raise ValueError(f"no {split} conversations for tasks {', '.join(tasks)}")
    # Shuffled here, before Arrow: a shuffled Dataset would need a slow flatten_indices to stay contiguous.
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)


def heldout_task_records(tasks: Iterable[str] | None = None, sizes: dict[str, int] | None = None) -> list[dict]:
    """Held-out conversations as task records for `tinyllm_hf.evaluation.tasks.evaluate_tasks` (and
    `tinyllm eval --tasks tasks --tasks-file`): the final assistant message is the reference answer, checked exactly
    after normalisation (so "正面。" counts as "正面")."""
    tasks = [t for t in (tasks or TASKS) if t != "identity"]
    heldout = build_default_sft("heldout", tasks, sizes)
    order = sorted(range(len(heldout)), key=lambda i: (tasks.index(heldout[i]["task"]), heldout[i]["id"]))
    return [{"id": heldout[i]["id"], "task": heldout[i]["task"], "messages": heldout[i]["messages"], "checker": "exact"}
            for i in order]


def write_task_file(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m tinyllm_hf.data.sft`: write the default set's train or held-out conversations to JSONL."""
    p = argparse.ArgumentParser(prog="python -m tinyllm_hf.data.sft", description=main.__doc__)
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)} (default: all)")
    p.add_argument("--sizes", default=None, help="conversations per task, e.g. sentiment=500,xiehouyu=200")
    p.add_argument("--as-task-records", action="store_true", help="held-out split in the task-evaluation format")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    try:
        if args.as_task_records:
            rows = heldout_task_records(tasks, args.sizes)
        else:
            rows = build_default_sft(args.split, tasks, args.sizes).to_list()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = write_task_file(rows, args.output)
    print(f"{len(rows)} conversations written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
