"""The tool loop: generate, parse the reply, run the tools it calls, feed the results back, until the model answers.

    toolbox = Toolbox.builtin()          # the dictionary lookups and the calculator of `tinyllm_hf.tasks.tools`
    for event in tool_loop(runtime, [messages], toolbox, [params]):
        ...                               # TokenEvent / ToolEvent / DoneEvent, tagged with the conversation's row

One loop serves every front end that runs tools itself: `tinyllm chat` and the web demo (one conversation, streamed:
they show the tokens and each call), generation-mode evaluation and the report's sample chats (many conversations,
batched; they read the `DoneEvent`s). `tinyllm serve` does not run it: an API client executes its own tools, as with
OpenAI, and the server only renders and parses (`tokenizer.reply`).

Each round renders the conversation with the tools' schemas, generates until `<|endoftext|>` (a batch of conversations
at once, with `runtime.stream_batch`, or whatever `generate_round` the caller passes: the web demo passes its serving
engine's `Engine.stream_batch`, so a demo's users share one decode batch), and parses the reply. Valid calls run
(`Toolbox.call`: a known name, arguments that fit its schema, a time limit) and their results, or a sentence saying
why a call could not run, join the conversation as `tool` messages; a conversation stops when a reply calls no tool,
after `max_rounds` rounds of calls, when its prompt no longer fits the context, or when the whole loop has run
`max_seconds` (interactive front ends set it: rounds, tokens and each call are bounded, their sum is not otherwise).
Nothing the model wrote is dropped: a malformed call stays in the assistant message's content.
"""

import concurrent.futures
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator

from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.runtime import SamplingParams, stream_batch
from tinyllm_hf.tokenizer.reply import as_message, parse_reply

DEFAULT_MAX_ROUNDS = 3  # rounds of tool calls before the loop stops a conversation
DEFAULT_TOOL_TIMEOUT = 5.0  # seconds one call may run
DEFAULT_REPLY_SECONDS = 120.0  # seconds a whole reply (every round and call) may take in chat and the demo
MAX_RESULT_CHARS = 2000  # a longer result is cut (a small model's whole context is 256 tokens)

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def check_arguments(schema: dict, arguments: dict) -> str | None:
    """Why `arguments` do not fit the function `schema` (OpenAI / `get_json_schema` form), or None when they do."""
    parameters = schema.get("parameters") or {}
    properties = parameters.get("properties") or {}
    missing = [name for name in parameters.get("required", []) if name not in arguments]
    if missing:
        return f"缺少参数 {', '.join(missing)}"
    unknown = [name for name in arguments if name not in properties]
    if unknown:
        return f"未知参数 {', '.join(unknown)}（可用：{', '.join(properties) or '无'}）"
    for name, value in arguments.items():
        expected = _JSON_TYPES.get(properties[name].get("type"))
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)):
            return f"参数 {name} 应为 {properties[name]['type']}，收到 {type(value).__name__}"
    return None


def check_tool_schemas(tools: list) -> list[dict]:
    """Tools in the OpenAI form ({"type": "function", "function": {"name", "description", "parameters"}}), each
    checked; a Python function is turned into one with transformers' `get_json_schema`. Raises UsageError naming the
    first bad entry."""
    from transformers.utils import get_json_schema

    if not isinstance(tools, list):
        raise UsageError(f"tools must be a list of function schemas, not {type(tools).__name__}")
    checked = []
    for i, tool in enumerate(tools):
        if callable(tool):
            tool = get_json_schema(tool)
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UsageError(f"tools[{i}] must be an object with type 'function' and a 'function' object")
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not function["name"].replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"tools[{i}].function.name must be a name of letters, digits, _ and -")
        if "description" in function and not isinstance(function["description"], str):
            raise UsageError(f"tools[{i}].function.description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object" \
                or not isinstance(parameters.get("properties", {}), dict) \
                or not all(isinstance(p, dict) for p in parameters.get("properties", {}).values()):
            raise UsageError(f"tools[{i}].function.parameters must be a JSON schema of type 'object' with 'properties'")
        if not isinstance(parameters.get("required", []), list):
            raise UsageError(f"tools[{i}].function.parameters.required must be a list of parameter names")
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    names = [tool["function"]["name"] for tool in checked]
    if len(set(names)) < len(names):
        raise UsageError(f"tools name a function twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return checked


@dataclasses.dataclass
class Toolbox:
    """Functions the loop may call, by name, with the schemas the model is shown."""

    functions: dict[str, Callable[..., object]]
    timeout: float = DEFAULT_TOOL_TIMEOUT

    def __post_init__(self):
        self.schemas = check_tool_schemas(list(self.functions.values()))
        self._schema = {tool["function"]["name"]: tool["function"] for tool in self.schemas}

    @classmethod
    def builtin(cls, timeout: float = DEFAULT_TOOL_TIMEOUT) -> "Toolbox":
        from tinyllm_hf.tasks.tools import BUILTIN_TOOLS

        return cls(dict(BUILTIN_TOOLS), timeout)

    def refusal(self, name: str, arguments) -> tuple[str, str] | None:
        """(text the model reads, error) when the call cannot run - an unknown tool, or arguments that do not fit its
        schema - else None. The RL reward for valid calls asks this too."""
        if name not in self.functions:
            return f"错误：没有名为 {name} 的工具（可用：{', '.join(self.functions)}）。", "unknown tool"
        problem = (check_arguments(self._schema[name], arguments) if isinstance(arguments, dict)
                   else "参数应为 JSON 对象")
        return (f"错误：{name} 的参数不对：{problem}。", "bad arguments") if problem else None

    def call(self, name: str, arguments: dict) -> tuple[str, str | None]:
        """(result text, error or None). Every failure - unknown tool, arguments that do not fit, an exception, a
        call past the time limit - is a result the model reads, never an exception."""
        refused = self.refusal(name, arguments)
        if refused:
            return refused
        # A worker thread bounds the wait; a call that overruns keeps its thread until it returns (Python threads
        # cannot be killed), so tools should be bounded themselves, as the built-in ones are.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            result = pool.submit(self.functions[name], **arguments).result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            return f"错误：{name} 超过 {self.timeout:g} 秒没有返回。", "timeout"
        except Exception as err:  # a tool's own failure is a result the model (and the user) can read
            return f"错误：{name} 出错：{type(err).__name__}: {err}。", "tool raised"
        finally:
            pool.shutdown(wait=False)
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        return text[:MAX_RESULT_CHARS], None

    def as_functions(self) -> list[Callable[..., str]]:
        """The tools for a caller that runs them itself, as TRL's `GRPOTrainer(tools=...)` does: each keeps its
        function's name, signature and docstring (so `get_json_schema` gives the same schema) but runs through `call`,
        so a bad call during RL rollouts returns the same error text the model reads at inference."""

        def bound(name: str, function: Callable[..., object]) -> Callable[..., str]:
            @functools.wraps(function)
            def run(**arguments) -> str:
                return self.call(name, arguments)[0]

            return run

        return [bound(name, function) for name, function in self.functions.items()]


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenEvent:
    row: int
    token: int


@dataclasses.dataclass
class ToolEvent:
    """One call the model made and what it got back (`error`: why the call could not run, else None)."""

    row: int
    name: str
    arguments: dict
    result: str
    error: str | None


@dataclasses.dataclass
class DoneEvent:
    """A conversation is over. `messages`: the ones the loop added (assistant turns with tool calls, tool results,
    the final answer); `reply`: the last parsed reply; finish_reason: "stop" (answered), "length" (the last reply
    hit its token budget), "tool_rounds" (still calling tools after max_rounds), "context" (the conversation
    outgrew the model's context before an answer) or "time" (max_seconds ran out before an answer)."""

    row: int
    messages: list[dict]
    reply: dict
    finish_reason: str
    calls: list[ToolEvent]
    first_reply: dict | None = None  # the parsed reply of the first round (what a tool-call check judges)

    @property
    def content(self) -> str:
        return self.reply["content"]


def _budget(runtime, prompt_ids: list[int], max_tokens: int | None) -> int:
    room = runtime.context_length - len(prompt_ids)
    return room if max_tokens is None else min(max_tokens, room)


def tool_loop(runtime, conversations: list[list[dict]], toolbox: Toolbox | None, params: list[SamplingParams],
              max_tokens: int | None = None, max_rounds: int = DEFAULT_MAX_ROUNDS, enable_thinking: bool = False,
              batch_size: int | None = None, generate_round: Callable | None = None,
              max_seconds: float | None = None) -> Iterator[TokenEvent | ToolEvent | DoneEvent]:
    """Answer each conversation (messages ending with the user's turn), running `toolbox`'s tools as the model calls
    them (`toolbox=None`: no tools are offered, one round). `params[i]` samples conversation i (its max_tokens is
    replaced by each round's budget: `max_tokens`, or the rest of the context when None). Yields every token, every
    call and one DoneEvent per conversation; conversations are generated together in batches of `batch_size`
    (default: the runtime's `max_batch_size`). `generate_round(prompts, params)` generates one round for a batch of
    prompt ids and yields `(row, token)`, the EOS that ends a row included, as `runtime.stream_batch` does (the
    default: `stream_batch` on `runtime`). `max_seconds`: a wall-clock limit for the whole loop, checked between
    tokens and after each round's calls; a conversation still going then ends with finish_reason "time", keeping
    what it generated."""
    if max_rounds < 0:
        raise UsageError(f"max_rounds must be 0 or more, not {max_rounds}")
    if max_seconds is not None and not max_seconds > 0:
        raise UsageError(f"max_seconds must be a positive number of seconds, not {max_seconds}")
    deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    tools = toolbox.schemas if toolbox else None
    generate_round = generate_round or functools.partial(stream_batch, runtime)
    batch_size = min(batch_size or runtime.max_batch_size, runtime.max_batch_size)
    history = [list(messages) for messages in conversations]
    added: list[list[dict]] = [[] for _ in conversations]
    calls: list[list[ToolEvent]] = [[] for _ in conversations]
    first: dict[int, dict] = {}
    active = list(range(len(conversations)))
    for round_index in range(max_rounds + 1):
        prompts, ready = {}, []
        for row in active:
            ids = runtime.encode_chat(history[row], tools, enable_thinking)
            if _budget(runtime, ids, max_tokens) < 1:
                reply = parse_reply("")
                yield DoneEvent(row, added[row], reply, "context", calls[row], first.get(row, reply))
                continue
            prompts[row] = ids
            ready.append(row)
        next_active = []
        for start in range(0, len(ready), batch_size):
            rows = ready[start:start + batch_size]
            round_params = [dataclasses.replace(params[row], max_tokens=_budget(runtime, prompts[row], max_tokens))
                            for row in rows]
            new: dict[int, list[int]] = {row: [] for row in rows}
            timed_out = False
            round_tokens = generate_round([prompts[row] for row in rows], round_params)
            try:
                for j, token in round_tokens:
                    new[rows[j]].append(token)
                    yield TokenEvent(rows[j], token)
                    if out_of_time():
                        timed_out = True
                        break
            finally:
                round_tokens.close()  # an engine's round cancels its sequences
            for row in rows:
                tokens = new[row]
                ended = bool(tokens) and tokens[-1] in runtime.eos_token_ids
                reply = parse_reply(runtime.decode_raw(tokens), thinking=enable_thinking)
                first.setdefault(row, reply)
                message = as_message(reply)
                history[row].append(message)
                added[row].append(message)
                if timed_out and not ended:  # cut mid-reply: its calls, if any, may be incomplete and do not run
                    yield DoneEvent(row, added[row], reply, "time", calls[row], first[row])
                    continue
                if not reply["tool_calls"] or toolbox is None:
                    yield DoneEvent(row, added[row], reply, "stop" if ended else "length", calls[row], first[row])
                    continue
                for call in reply["tool_calls"]:
                    function = call["function"]
                    result, error = toolbox.call(function["name"], function["arguments"])
                    event = ToolEvent(row, function["name"], function["arguments"], result, error)
                    calls[row].append(event)
                    yield event
                    tool_message = {"role": "tool", "name": function["name"], "content": result}
                    history[row].append(tool_message)
                    added[row].append(tool_message)
                if round_index == max_rounds:
                    yield DoneEvent(row, added[row], reply, "tool_rounds", calls[row], first[row])
                elif out_of_time():
                    yield DoneEvent(row, added[row], reply, "time", calls[row], first[row])
                else:
                    next_active.append(row)
        active = next_active
        if not active:
            return


def run_tool_loop(runtime, conversations: list[list[dict]], toolbox: Toolbox | None, params: list[SamplingParams],
                  **kwargs) -> list[DoneEvent]:
    """Every conversation's DoneEvent, in the conversations' order (see `tool_loop`)."""
    done: dict[int, DoneEvent] = {}
    for event in tool_loop(runtime, conversations, toolbox, params, **kwargs):
        if isinstance(event, DoneEvent):
            done[event.row] = event
    return [done[row] for row in range(len(conversations))]
