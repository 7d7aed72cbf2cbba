"""Your own instruction data for supervised fine-tuning, as conversational `messages` (the embedded default set is
built from the task registry: `tinyllm_hf.tasks.build_default_sft`).

`load_sft_dataset` reads a local .jsonl/.json file or folder, or a Hugging Face dataset name, in any of the common
formats, each row normalised to `{"messages": [{"role", "content"}, ...]}`:

    TRL / OpenAI   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    ShareGPT       {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
    Alpaca         {"instruction": ..., "input": ..., "output": ...}
    question/answer {"question": ..., "answer": ...}        (the reference project's JSONL)

Tool use: a `messages` row may hold assistant turns with OpenAI `tool_calls` (arguments an object or a JSON string;
the content may then be empty), `role: "tool"` results after them, `reasoning_content`, and a `tools` field (OpenAI
function schemas, a list or a JSON string of one); a ShareGPT row may hold `function_call` / `observation` turns and
a `tools` field, as LLaMA-Factory's sharegpt format has them. Each call must be followed by its result; the schemas
are checked as the chat template renders them.

A row that is not valid (bad JSON, no known format, roles out of order, empty text, a conversation that does not end
with the assistant) is reported with its line number (row number for Hub datasets). `malformed="error"` stops at the
first one; `malformed="skip"` drops them and logs how many and where. Rows are never dropped silently. The same raw-row
readers (`read_rows`, `convert_rows`) serve the preference and RL-prompt loaders (`tinyllm_hf.data.preference`).
"""

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets

from tinyllm_hf.data.corpus import is_local_source, local_files
from tinyllm_hf.data.on_disk import embedded_signature, files_signature
from tinyllm_hf.errors import MalformedRowError, UsageError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "qa")
MALFORMED_POLICIES = ("error", "skip")
ROLES = ("system", "user", "assistant", "tool")
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
    "function_call": "assistant",  # LLaMA-Factory: the value is the call's JSON ({"name", "arguments"}, or a list)
    "observation": "tool",
}
LOCAL_SUFFIXES = (".jsonl", ".json")
# The Arrow type of a `messages` column, tool calls and reasoning included (arguments as a JSON string, so calls with
# different argument names share it): sources are cast to it before they are concatenated.
MESSAGES_FEATURE = datasets.List({
    "role": datasets.Value("string"),
    "content": datasets.Value("string"),
    "tool_calls": datasets.List({"type": datasets.Value("string"),
                                 "function": {"name": datasets.Value("string"), "arguments": datasets.Value("string")}}),
    "reasoning_content": datasets.Value("string"),
})
MAX_REPORTED = 10  # malformed rows listed by line in a skip warning (the count is always complete)


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


def _tool_call(i: int, call) -> dict:
    """One call of message `i` as MESSAGES_FEATURE stores it: {"type": "function", "function": {"name", "arguments"}},
    the arguments a JSON object written as a string. Takes OpenAI's form or the bare {"name", "arguments"}."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        shown = json.dumps(call, ensure_ascii=False)[:80]
        raise MalformedRowError(f"message {i}: a tool call needs a function name, got {shown}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise MalformedRowError(f"message {i}: the arguments of tool call {function['name']!r} are not valid JSON "
                                    f"({err.msg})") from None
    if not isinstance(arguments, dict):
        raise MalformedRowError(f"message {i}: the arguments of tool call {function['name']!r} must be a JSON object")
    return {"type": "function", "function": {"name": function["name"],
                                             "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _message(i: int, message) -> dict:
    if not isinstance(message, dict) or "role" not in message or (
            "content" not in message and not message.get("tool_calls")):
        raise MalformedRowError(f"message {i} must be an object with 'role' and 'content'")
    out = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        if not isinstance(message["tool_calls"], list):
            raise MalformedRowError(f"message {i}: 'tool_calls' must be a list")
        out["content"] = out["content"] or ""  # OpenAI sends null content with calls
        out["tool_calls"] = [_tool_call(i, call) for call in message["tool_calls"]]
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    return out


def _from_messages(row: dict) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise MalformedRowError(f"'messages' must be a list, got {type(messages).__name__}")
    return [_message(i, message) for i, message in enumerate(messages)]


def _from_sharegpt(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise MalformedRowError(f"'conversations' must be a list, got {type(turns).__name__}")
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MalformedRowError(f"conversation turn {i} must be an object with 'from' and 'value'")
        speaker = str(turn["from"]).lower()
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise MalformedRowError(f"conversation turn {i}: unknown speaker {turn['from']!r}")
        if speaker == "function_call":
            calls = _calls_of(i, turn["value"])
            out.append(_message(len(out), {"role": "assistant", "content": "", "tool_calls": calls}))
        else:
            out.append({"role": role, "content": turn["value"]})
    return out


def _calls_of(i: int, value) -> list:
    """The calls of a ShareGPT function_call turn: a JSON object or list of them, as a string or parsed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise MalformedRowError(f"conversation turn {i}: the function_call is not valid JSON ({err.msg})") from None
    return value if isinstance(value, list) else [value]


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
    message, then user and assistant turns alternating, ending with the assistant; every content a non-empty string
    (an assistant turn with tool calls may have none). An assistant turn's calls are followed by one `tool` result
    each, then the assistant again."""
    if not messages:
        raise MalformedRowError("the conversation is empty")
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise MalformedRowError(f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise MalformedRowError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
        if not message["content"].strip() and not message.get("tool_calls"):
            raise MalformedRowError(f"message {i} ({message['role']}): content is empty")
        if message.get("tool_calls") and message["role"] != "assistant":
            raise MalformedRowError(f"message {i}: only assistant messages make tool calls, not {message['role']!r}")
    start = 1 if messages[0]["role"] == "system" else 0
    expected, results_due = "user", 0  # results_due: tool results still owed to the last assistant turn's calls
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if results_due:
            if role != "tool":
                raise MalformedRowError(f"message {i}: expected role 'tool' ({results_due} tool call(s) before it "
                                        f"have no result yet), got {role!r}")
            results_due -= 1
            continue
        if role != expected:
            hint = " (a tool result follows an assistant message with tool_calls)" if role == "tool" else ""
            raise MalformedRowError(f"message {i}: expected role {expected!r}, got {role!r}{hint}")
        results_due = len(messages[i].get("tool_calls") or [])
        expected = "user" if role == "assistant" and not results_due else "assistant"
    if results_due:
        raise MalformedRowError(f"the conversation ends before the results of its last {results_due} tool call(s)")
    if messages[-1]["role"] != "assistant":
        raise MalformedRowError("the conversation must end with an assistant message")
    return messages


def to_messages(row, fmt: str = "auto") -> list[dict]:
    """Normalise one row of any supported format to validated chat messages (MalformedRowError says why not)."""
    if not isinstance(row, dict):
        raise MalformedRowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt not in FORMATS:
        raise UsageError(f"unknown instruction format {fmt!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    try:
        messages = CONVERTERS[fmt](row)
    except KeyError as err:
        raise MalformedRowError(f"missing field {err.args[0]!r} for format {fmt!r}") from None
    return validate_messages(messages)


def tools_of(row: dict) -> str | None:
    """A row's `tools` (OpenAI function schemas: a list, or a JSON string of one, as LLaMA-Factory writes it) as the
    JSON string the SFT data stores, checked as the chat template renders them; None without tools."""
    from tinyllm_hf.inference.tool_loop import check_tool_schemas

    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise MalformedRowError(f"'tools' is not valid JSON ({err.msg})") from None
    if isinstance(tools, list):  # LLaMA-Factory lists bare functions ({"name", "description", "parameters"})
        tools = [{"type": "function", "function": tool} if isinstance(tool, dict) and "type" not in tool
                 and "name" in tool else tool for tool in tools]
    try:
        return json.dumps(check_tool_schemas(tools), ensure_ascii=False)
    except (UsageError, ValueError) as err:
        raise MalformedRowError(f"'tools': {err}") from None


def to_conversation(row, fmt: str = "auto") -> dict:
    """One row as SFT data stores it: {"messages": validated messages, "tools": JSON string or None}."""
    messages = to_messages(row, fmt)
    return {"messages": messages, "tools": tools_of(row)}


# --------------------------------------------------------------------------------------------------------------------
# Files and Hub datasets -> Dataset of messages
# --------------------------------------------------------------------------------------------------------------------


def _starts_with_list(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped.startswith("[")
    return True  # an empty file: the list reader names it


def read_local_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed row or the MalformedRowError of a line that is not JSON) for each record of a JSON-lines file, or
    (where, row) for each element of a .json list; `where` is `file:line` or `file[index]`, for error messages.
    A .json file that does not start with `[` is JSON lines, as `datasets` reads it: BelleGroup/train_0.5M_CN
    publishes Belle_open_source_0.5M.json that way."""
    if path.suffix == ".jsonl" or not _starts_with_list(path):
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
        raise UsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path}: a .json data file must hold a list of rows")
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def load_hub_split(name: str, config: str | None, split: str) -> datasets.Dataset:
    """A split of a Hugging Face dataset; UsageError saying why when it cannot load."""
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, gated repository...: say what the argument could have meant
        raise UsageError(
            f"{name!r} is not 'default' nor an existing local path, and loading it as a Hugging Face dataset failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def read_hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a split of a Hugging Face dataset; UsageError saying why when it cannot load."""
    for index, row in enumerate(load_hub_split(name, config, split)):
        yield f"{name} row {index}", row


def read_rows(source: str, split: str = "train", config: str | None = None,
              what: str = "instruction data") -> Iterator[tuple[str, object]]:
    """(where, row) of every record of a local .jsonl/.json file or folder, or of a Hugging Face dataset split: the
    raw rows behind the SFT, preference and RL-prompt loaders."""
    if is_local_source(source, LOCAL_SUFFIXES):
        path = Path(source).expanduser()
        return (item for file in local_files(path, LOCAL_SUFFIXES, what) for item in read_local_rows(file))
    return read_hub_rows(source, config, split)


def source_signature(source: str, split: str = "train", config: str | None = None) -> list[str] | str:
    """What the rows `read_rows(source, split, config)` yields depend on, for keying data built from them
    (`tinyllm_hf.data.on_disk`): a local source's files with their size and mtime; a Hub dataset's name, config,
    split and the fingerprint `datasets` gives the downloaded files (another revision, another fingerprint)."""
    if is_local_source(source, LOCAL_SUFFIXES):
        return files_signature(local_files(Path(source).expanduser(), LOCAL_SUFFIXES, "data"))
    return f"hub|{source}|{config}|{split}|{load_hub_split(source, config, split)._fingerprint}"


def build_inputs(data_args, seed: int, sources: list[str | None]) -> dict:
    """What a fine-tuning stage's data is built from, for `tinyllm_hf.data.on_disk.built_once`: every data argument
    (a dataclass), the seed, and each source's `source_signature` (the embedded set: its packages)."""
    signatures = {source: embedded_signature() if source == "default" else
                  source_signature(source, data_args.dataset_split, data_args.dataset_config)
                  for source in sources if source}
    return {"data_args": dataclasses.asdict(data_args), "seed": seed, "sources": signatures}


def convert_rows(rows: Iterable[tuple[str, object]], convert: Callable[[object], dict], malformed: str = "error",
                 source: str = "data", what: str = "conversations") -> list[dict]:
    """`convert(row)` for every row; a row that is not valid (an exception in `rows`, or `convert` raising
    MalformedRowError) raises naming where it is (`malformed="error"`) or is counted and logged (`"skip"`)."""
    if malformed not in MALFORMED_POLICIES:
        raise UsageError(f"malformed must be one of {', '.join(MALFORMED_POLICIES)}, not {malformed!r}")
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
        raise UsageError(f"{source}: no valid {what} ({len(bad)} malformed rows)")
    return kept


def load_sft_dataset(source: str, fmt: str = "auto", malformed: str = "error", split: str = "train",
                     config: str | None = None) -> datasets.Dataset:
    """Instruction data from a local .jsonl/.json file or folder, or a Hugging Face dataset name, as a Dataset with a
    `messages` column and a `tools` column (JSON, None for a conversation without tools); see the module docstring
    for the formats."""
    rows = convert_rows(read_rows(source, split, config), lambda row: to_conversation(row, fmt), malformed, source)
    # One Arrow type for every row (calls and reasoning included), as the default set has it.
    return datasets.Dataset.from_list(rows, features=datasets.Features(
        {"messages": MESSAGES_FEATURE, "tools": datasets.Value("string")}))
