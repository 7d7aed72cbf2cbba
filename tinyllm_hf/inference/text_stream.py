"""The text layer above the token-id engine, shared by every front end: detokenising, stop strings, streaming.

The engine (`engine.py`) and the runtimes know token ids only. A `TextStream` listens to one sequence's tokens and
hands its sink `Delta`s of new text: never the beginning of a stop string before it is known not to complete, never
half a UTF-8 character, and on the last delta the finish reason. A stop string found in the text ends the sequence.
"""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Delta:
    """What a sink receives: new text of one sequence, and on its last delta the finish reason."""

    text: str
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    completion_tokens: int = 0
    error: str | None = None


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
    `on_progress` when the sequence goes on, `on_finish` once at the end."""

    def __init__(self, decode_text: Callable[[list[int]], str], stops: tuple[str, ...], sink: Callable[[Delta], None]):
        self.decode_text, self.stops, self.sink = decode_text, tuple(stops), sink
        self.text = ""
        self.sent = 0  # characters of `text` already streamed

    def on_token(self, generated: list[int]) -> bool:
        self.text = self.decode_text(generated)
        stop_at = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if stop_at >= 0:
            self.text = self.text[:stop_at]
            return True
        return False

    def on_progress(self, generated: list[int]) -> None:
        ready = len(self.text) - held_back(self.text, self.stops)
        if ready > self.sent:
            self.sink(Delta(self.text[self.sent:ready], None, len(generated)))
            self.sent = ready

    def on_finish(self, generated: list[int], reason: str, error: str | None) -> None:
        # A normal end sends the rest of the text; an abort (cancelled, timeout, error) only says why.
        rest = self.text[self.sent:] if reason in ("stop", "length") else ""
        self.sink(Delta(rest, reason, len(generated), error))
