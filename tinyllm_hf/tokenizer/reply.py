"""A model's reply, parsed back into a message: `{"role", "content", "reasoning_content", "tool_calls"}`.

The inverse of the chat template (`chat_template.py`) for one assistant turn: the text the model generated, with its
control tokens kept (`<think>`, `<tool_call>`, `<|endoftext|>`), becomes the message the template would render as
that text. Every stage that reads a reply - the tool loop, the server, evaluation, RL rewards - parses it here.

A reply the model got wrong is never dropped: a tool call whose JSON does not parse, is cut off by the token budget,
or lacks a name stays in `content` as the model wrote it, and is listed in `invalid_tool_calls` with the reason, so
callers can report it (and a conversation keeps every token the model produced).
"""

import json
import re

from tinyllm_hf.tokenizer.chat_template import EOS_TOKEN, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

_TOOL_CALL = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.DOTALL)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, rest) of a reply. `thinking`: the prompt opened `<think>` (enable_thinking), so the reply starts
    inside the reasoning; a reply may also open `<think>` itself. An unclosed reasoning block (cut off by the budget)
    is all reasoning."""
    stripped = text.lstrip("\n")
    if not thinking and stripped.startswith(THINK_START):
        text, thinking = stripped[len(THINK_START):], True
    if not thinking:
        return None, text
    reasoning, closed, rest = text.partition(THINK_END)
    return reasoning.strip("\n"), rest.lstrip("\n") if closed else ""


def parse_tool_call(body: str) -> tuple[dict | None, str | None]:
    """({"name", "arguments"}, None) for the JSON between `<tool_call>` and `</tool_call>`, or (None, why not)."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return None, f"the tool call is not valid JSON ({err.msg} at character {err.pos})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None, "the tool call has no function name"
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # arguments as a JSON string, as the OpenAI API writes them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, f"the arguments of {call['name']} are not a JSON object"
    if not isinstance(arguments, dict):
        return None, f"the arguments of {call['name']} are not a JSON object"
    return {"name": call["name"], "arguments": arguments}, None


def parse_reply(text: str, thinking: bool = False) -> dict:
    """The assistant message a generated `text` (control tokens kept) stands for.

    Returns {"role": "assistant", "content": str, "reasoning_content": str | None, "tool_calls": [{"type":
    "function", "function": {"name", "arguments": dict}}], "invalid_tool_calls": [{"text", "error"}]}; content is the
    text outside the reasoning and the valid tool calls, stripped of the trailing `<|endoftext|>`."""
    text = text.split(EOS_TOKEN, 1)[0]
    reasoning, rest = split_reasoning(text, thinking)
    tool_calls, invalid, kept, end = [], [], [], 0
    for match in _TOOL_CALL.finditer(rest):
        kept.append(rest[end:match.start()])
        end = match.end()
        closed = match.group(0).endswith(TOOL_CALL_END)
        call, error = parse_tool_call(match.group(1)) if closed else (None, "the tool call was cut off before "
                                                                       f"{TOOL_CALL_END}")
        if call is None:
            invalid.append({"text": match.group(0), "error": error})
            kept.append(match.group(0))
        else:
            tool_calls.append({"type": "function", "function": call})
    kept.append(rest[end:])
    return {"role": "assistant", "content": "".join(kept).strip() if tool_calls else "".join(kept),
            "reasoning_content": reasoning, "tool_calls": tool_calls, "invalid_tool_calls": invalid}


def as_message(reply: dict) -> dict:
    """The message of a parsed reply for the conversation history: role, content, and reasoning_content / tool_calls
    only when present (a plain reply is the plain `{"role", "content"}` the template renders byte-identically)."""
    message = {"role": "assistant", "content": reply["content"]}
    if reply.get("reasoning_content"):
        message["reasoning_content"] = reply["reasoning_content"]
    if reply.get("tool_calls"):
        message["tool_calls"] = reply["tool_calls"]
    return message
