"""A runtime whose replies are written in advance, so tests can check what the tool loop, chat, evaluation and the
server make of replies a trained model writes (tool calls, reasoning, malformed calls)."""

import torch

from tinyllm_hf.inference.runtime import _TokenizerText


def by_question(script: dict[str, list[str]]):
    """A script from {text of the conversation: replies of successive rounds}: a prompt is answered with the replies
    of the first key it contains, the round being the number of tool results already in the prompt."""
    def reply(prompt: str) -> str:
        replies = next(replies for key, replies in script.items() if key in prompt)
        return replies[min(prompt.count("<|tool|>"), len(replies) - 1)]

    return reply


class ScriptedRuntime(_TokenizerText):
    """A real runtime's tokenizer and chat template (`base`: a runtime, or a tokenizer) with a scripted model: each
    prompt is answered with `script(prompt_text)` (a callable, or a dict for `by_question`; tests may swap it between
    requests), control tokens written out, then EOS - one token per decode step whatever the sampling settings.
    `prompts` keeps every prompt it was given, as text."""

    def __init__(self, base, script, max_batch_size: int = 8, context_length: int | None = None):
        self._runtime = base if hasattr(base, "render_chat") else None
        self.tokenizer = base.tokenizer if self._runtime is not None else base
        self.script = by_question(script) if isinstance(script, dict) else script
        self.max_batch_size = max_batch_size
        self.context_length = context_length or (self._runtime.context_length if self._runtime else 4096)
        self.eos_token_ids = {self.tokenizer.eos_token_id}
        self.chat_template = self.tokenizer.chat_template
        self.prompts: list[str] = []

    def __getattr__(self, name):  # anything else the wrapped runtime has
        if self.__dict__.get("_runtime") is None:
            raise AttributeError(name)
        return getattr(self._runtime, name)

    def render_chat(self, messages, tools=None, enable_thinking=False):
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    def _logits(self, queues):
        logits = torch.full((len(queues), len(self.tokenizer)), -1e9)
        for row, queue in enumerate(queues):
            logits[row, queue.pop(0) if queue else self.tokenizer.eos_token_id] = 0.0
        return logits

    def prefill(self, prompts):
        queues = []
        for prompt in prompts:
            self.prompts.append(self.decode_raw(prompt))
            queues.append(self.encode(self.script(self.prompts[-1])) + [self.tokenizer.eos_token_id])
        return queues, self._logits(queues)

    def decode(self, tokens, queues):
        return self._logits(queues)

    def select(self, queues, rows):
        return [queues[r] for r in rows]
