"""A runtime whose replies are written in advance: the tool loop, chat and evaluation tested on exact model output."""

import torch


class ScriptedRuntime:
    """Replies by script, through a real tokenizer: `script` maps a text of the conversation's first user message to
    the replies of successive rounds (control tokens written out, e.g. '<tool_call>{...}</tool_call>'); a round's
    index is the number of tool results already in the prompt. Each reply ends with EOS unless it fills the budget."""

    max_batch_size = 8

    def __init__(self, tokenizer, script: dict[str, list[str]], context_length: int = 4096):
        self.tokenizer, self.script, self.context_length = tokenizer, script, context_length
        self.eos_token_ids = {tokenizer.eos_token_id}
        self.chat_template = tokenizer.chat_template
        self.prompts: list[str] = []  # every prompt rendered, in order

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode_text(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_raw(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages, tools=None, enable_thinking=False):
        prompt = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=enable_thinking)
        self.prompts.append(prompt)
        return prompt

    def _reply_ids(self, prompt_ids):
        prompt = self.decode_raw(prompt_ids)
        key = next(k for k in self.script if k in prompt)
        replies = self.script[key]
        text = replies[min(prompt.count("<|tool|>"), len(replies) - 1)]
        return self.encode(text) + [self.tokenizer.eos_token_id]

    def _logits(self, queues):
        logits = torch.zeros(len(queues), len(self.tokenizer))
        for row, queue in enumerate(queues):
            logits[row, queue.pop(0) if queue else self.tokenizer.eos_token_id] = 1.0
        return logits

    def prefill(self, prompts):
        queues = [self._reply_ids(p) for p in prompts]
        return queues, self._logits(queues)

    def decode(self, tokens, queues):
        return self._logits(queues)

    def select(self, queues, rows):
        return [queues[r] for r in rows]
