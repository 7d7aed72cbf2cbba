"""The text layer above the token-id engine, shared by every front end: detokenising, stop strings, streaming.

The engine (`engine.py`) and the runtimes know token ids only. A `TextStream` listens to one sequence's tokens and
hands its sink `Delta`s of new text: never the beginning of a stop string before it is known not to complete, never
half a UTF-8 character, and on the last delta the finish reason. A stop string found in the text ends the sequence.
A reply that ends inside a character (cut by max_tokens) ends without it, as vLLM's detokenizer ends it: the text
never ends in a U+FFFD the model did not write, and the incomplete bytes stay in the last token's logprob `bytes`.
A sequence that asked for logprobs gets them on the delta that carries its tokens' text (held back with it).

A front end that streams a reply with tool calls or reasoning puts a `ReplyStream` above those deltas (their text
decoded with the control tokens kept, `runtime.decode_raw`): it turns them into deltas of the parsed message's fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # runtime.py imports torch, which `tinyllm serve --help` must not load
    from tinyllm_hf.inference.runtime import TokenLogprob


@dataclasses.dataclass
class Delta:
    """What a sink receives: new text of one sequence, and on its last delta the finish reason."""

    text: str
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of the tokens this delta's text ends
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, before any text, if the sequence asked


def incomplete_utf8_tail(data: bytes) -> int:
    """How many trailing bytes of `data` begin a UTF-8 character that is not complete (0 if none)."""
    for size in range(1, min(4, len(data)) + 1):
        byte = data[-size]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the character's first byte says its length
            length = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return size if size < length else 0
    return 0


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` must wait: an incomplete UTF-8 character (decoded as U+FFFD) or the
    beginning of a stop string, which must never be streamed before we know whether it completes."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold


class TextStream:
    """The engine's listener for one sequence: `on_token` after each new token (True: a stop string ended the text),
    `on_progress` when the sequence goes on, `on_finish` once at the end, `on_prompt_logprobs` if it asked for them.
    `token_bytes(id) -> bytes` is the runtime's: it tells an incomplete character at the end from a U+FFFD the model
    wrote."""

    def __init__(self, decode_text: Callable[[list[int]], str], stops: tuple[str, ...], sink: Callable[[Delta], None],
                 token_bytes: Callable[[int], bytes], end_after: tuple[str, ...] = ()):
        self.decode_text, self.stops, self.sink, self.token_bytes = decode_text, tuple(stops), sink, token_bytes
        self.end_after = tuple(end_after)  # strings the text ends after, kept (SamplingParams.end_after)
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.stopped = False  # a stop string (or an end_after string) ended the text
        self.logprobs: list[TokenLogprob] = []  # of the tokens whose text is not streamed yet

    def on_token(self, generated: list[int], logprob: TokenLogprob | None = None) -> bool:
        if logprob is not None:
            self.logprobs.append(logprob)
        self.text = self.decode_text(generated)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        cuts += [i + len(s) for i, s in ((self.text.find(s), s) for s in self.end_after) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            return True
        return False

    def on_progress(self, generated: list[int]) -> None:
        ready = len(self.text) - held_back(self.text, self.stops)
        if ready > self.sent:
            self.sink(Delta(self.text[self.sent:ready], None, len(generated), logprobs=self.logprobs))
            self.sent, self.logprobs = ready, []

    def on_prompt_logprobs(self, generated: list[int], logprobs: list[TokenLogprob | None]) -> None:
        self.sink(Delta("", None, 0, prompt_logprobs=logprobs))

    def on_finish(self, generated: list[int], reason: str, error: str | None,
                  logprob: TokenLogprob | None = None) -> None:
        # A normal end sends the rest of the text, less a character the last tokens left incomplete (decoded as one
        # U+FFFD); an abort (cancelled, timeout, error) only says why.
        if reason not in ("stop", "length"):
            self.sink(Delta("", reason, len(generated), error))
            return
        text = self.text
        if not self.stopped and text.endswith("\ufffd"):
            if incomplete_utf8_tail(b"".join(map(self.token_bytes, generated[-4:]))):
                text = text[:-1]
        logprobs = self.logprobs + ([logprob] if logprob is not None else [])
        self.sink(Delta(text[self.sent:], reason, len(generated), error, logprobs=logprobs))


def _growth(sent: str, value: str) -> str:
    """What `value` adds to the `sent` text of the same field. Parsing strips a reply's content once it holds a tool
    call, so the two are compared without their leading whitespace (trailing whitespace is never sent early)."""
    if not sent:
        return value
    head, body = sent.lstrip(), value.lstrip()
    return body[len(head):] if body.startswith(head) else ""


class ReplyStream:
    """One streamed reply as deltas of the message it parses to. `parse(text) -> {"content", "reasoning_content",
    "tool_calls"}` (`tokenizer.reply.parse_reply`, or a variant of it) is the only parser: every `feed` re-parses the
    text so far (a reply is at most one context of tokens) and returns what content and reasoning gained since the
    last delta, and the tool calls completed since. Text that could still change its meaning waits: a tool call until
    its `</tool_call>` (unclosed at the end, it stays in the content, as `parse_reply` keeps it), the beginning of a
    marker, and trailing whitespace (stripped once a call follows). `prefix`: text the reply starts with that the
    model did not generate (a forced tool call's opening). With `final` everything left is sent. The deltas add up to
    the parsed message, except leading whitespace streamed before a call is known to follow (the parse strips it)."""

    FIELDS = ("reasoning_content", "content")

    def __init__(self, parse: Callable[[str], dict], prefix: str = "", tool_calls: bool = True):
        # Imported here: the tokenizer package loads torch, and `tinyllm serve --help` imports this module.
        from tinyllm_hf.tokenizer.chat_template import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

        self.parse, self.text, self.tool_calls = parse, prefix, tool_calls
        self.call_start, self.call_end = TOOL_CALL_START, TOOL_CALL_END
        self.markers = (THINK_START, THINK_END) + ((TOOL_CALL_START,) if tool_calls else ())
        self.sent = dict.fromkeys(self.FIELDS, "")
        self.calls_sent = 0

    def settled(self) -> str:
        """The part of the text whose parse cannot change as more text comes."""
        start = self.text.rfind(self.call_start)
        if self.tool_calls and start > self.text.rfind(self.call_end):
            return self.text[:start]
        return self.text[:len(self.text) - held_back(self.text, self.markers)]

    def feed(self, text: str, final: bool = False) -> tuple[dict[str, str], list[dict]]:
        """({field: new text} for the fields that grew, the tool calls completed since the last call)."""
        self.text += text
        reply = self.parse(self.text if final else self.settled())
        grown = {}
        for field in self.FIELDS:
            value = reply.get(field) or ""
            new = _growth(self.sent[field], value if final else value.rstrip())
            if new:
                grown[field] = new
                self.sent[field] += new
        calls = reply.get("tool_calls", [])[self.calls_sent:]
        self.calls_sent += len(calls)
        return grown, calls
