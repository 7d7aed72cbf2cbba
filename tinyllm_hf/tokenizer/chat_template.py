"""Special tokens and the chat format: the single definition every stage (SFT data, inference, serving, export) uses.

One turn renders as

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}<|endoftext|>

A conversation without a system message gets `DEFAULT_SYSTEM_PROMPT`. Turns follow each other with no separator:
the next `<|user|>` comes right after the previous answer's `<|endoftext|>`, so the rendering of the first N turns is
an exact prefix of the rendering of N+1 turns (what a multi-turn chat feeds back to the model) and of the prompt
rendered with `add_generation_prompt=True`, which ends in `<|assistant|>\\n`.

Tools and thinking (`apply_chat_template(messages, tools=[...], enable_thinking=True)`) add to that format without
changing it for conversations that use neither:

    <|system|>\\n{system}\\n<|tools|>\\n{name}({arg}: {type}, ...): {description}\\n...      one line per tool
    <|user|>\\n{question}\\n
    <|assistant|>\\n<think>\\n{reasoning}\\n</think>\\n{content}<tool_call>{"name": ..., "arguments": {...}}</tool_call><|endoftext|>
    <|tool|>\\n{result}\\n
    <|assistant|>\\n{answer}<|endoftext|>

The tool list is one compact line per function, rendered from its JSON schema (OpenAI's `{"type": "function",
"function": {...}}` or the bare function schema, as transformers' `get_json_schema` makes it): a small model's
context is 256 tokens, and four full JSON schemas would fill it. A tool call is the JSON object OpenAI and Qwen use,
arguments included (a JSON string of them, as the OpenAI API sends, is written verbatim). An assistant turn that calls
tools ends with `<|endoftext|>` like any other, so generation stops there and the caller runs the tools; each result
is a `<|tool|>` turn, and the model then answers in a new assistant turn. With `enable_thinking=True` the generation
prompt opens `<think>\\n`, so the model writes its reasoning before the answer; without it (the default) the prompt is
exactly the plain format's and the model answers at once. `reasoning_content` in an assistant message renders as its
`<think>` block.

What an assistant turn holds - reasoning, content, tool calls and its `<|endoftext|>` - sits inside
`{% generation %}`: `return_assistant_tokens_mask=True` (and TRL's `assistant_only_loss=True`) then mark exactly the
tokens the model must learn to produce. Two things stay outside it: tool results (the model reads them, it never
learns to write them) and the `<think>` that opens a reasoning block, which only the generation prompt of
`enable_thinking=True` supplies - so a model never learns to start thinking on its own, and with thinking off (the
default) it answers at once: the switch is the prompt, not the model's whim. `tinyllm_hf.tokenizer.reply` parses a reply back into `{content, reasoning_content, tool_calls}`.

`RESPONSE_TEMPLATE` describes the same reply format to transformers' response parser (`tokenizer.parse_response(text,
prefix=prompt)`, transformers >= 5.13), which TRL's `GRPOTrainer(tools=...)` uses to find the tool calls in a
rollout. Every tokenizer we make carries it (`tokenizer_config.json` saves it). It agrees with `parse_reply` on
well-formed replies (`tests/test_reply_parsing.py`), not on the rest: a call that is not JSON or is cut off makes it
raise where `parse_reply` keeps the text and reports the call; a call without a name passes; arguments written as a
JSON string stay a string; `<think>` opens reasoning anywhere, not only at the start; text after `<|endoftext|>` is
kept; the content before a call keeps its trailing newline.
"""

import json
import re
import weakref

from tinyllm_hf.errors import UsageError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
TOOLS_TOKEN = "<|tools|>"
TOOL_TOKEN = "<|tool|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
THINK_START = "<think>"
THINK_END = "</think>"
# Order matters: a trained tokenizer gives these ids 0..10 (the first five are the plain chat format's, and keep the
# ids they had before the tool tokens were added).
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN,
                  TOOLS_TOKEN, TOOL_TOKEN, TOOL_CALL_START, TOOL_CALL_END, THINK_START, THINK_END]

DEFAULT_SYSTEM_PROMPT = "你是一个乐于助人的中文助手。"


def _literal(text: str) -> str:
    """A Jinja string literal for `text` (JSON string syntax is valid Jinja)."""
    return json.dumps(text, ensure_ascii=False)


# The constants above enter the template as Jinja variables, so the strings are defined once, here.
_TEMPLATE_CONSTANTS = {
    "SYSTEM": SYSTEM_TOKEN,
    "USER": USER_TOKEN,
    "ASSISTANT": ASSISTANT_TOKEN,
    "EOS": EOS_TOKEN,
    "TOOLS": TOOLS_TOKEN,
    "TOOL": TOOL_TOKEN,
    "TOOL_CALL_START": TOOL_CALL_START,
    "TOOL_CALL_END": TOOL_CALL_END,
    "THINK_START": THINK_START,
    "THINK_END": THINK_END,
    "DEFAULT_SYSTEM_PROMPT": DEFAULT_SYSTEM_PROMPT,
}
_TEMPLATE_BODY = """\
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = DEFAULT_SYSTEM_PROMPT -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- SYSTEM + '\\n' + system_message + '\\n' -}}
{%- if tools -%}
    {{- TOOLS + '\\n' -}}
    {%- for tool in tools -%}
        {%- set function = tool['function'] if tool['function'] is defined else tool -%}
        {%- set parameters = function['parameters'] if function['parameters'] is defined and function['parameters'] else {} -%}
        {%- set properties = parameters['properties'] if parameters['properties'] is defined and parameters['properties'] else {} -%}
        {{- function['name'] + '(' -}}
        {%- for name in properties -%}
            {{- name + ': ' + (properties[name]['type'] if properties[name]['type'] is defined else 'any') -}}
            {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
        {%- endfor -%}
        {{- ')' -}}
        {%- if function['description'] is defined and function['description'] -%}
            {{- ': ' + function['description'] -}}
        {%- endif -%}
        {{- '\\n' -}}
    {%- endfor -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- USER + '\\n' + message['content'] + '\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- ASSISTANT + '\\n' -}}
        {%- set thinks = message['reasoning_content'] is defined and message['reasoning_content'] -%}
        {%- if thinks -%}
            {{- THINK_START + '\\n' -}}
        {%- endif -%}
        {%- generation -%}
            {%- if thinks -%}
                {{- message['reasoning_content'] + '\\n' + THINK_END + '\\n' -}}
            {%- endif -%}
            {{- message['content'] or '' -}}
            {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
                {%- for call in message['tool_calls'] -%}
                    {%- set function = call['function'] if call['function'] is defined else call -%}
                    {{- TOOL_CALL_START + '{"name": ' + function['name'] | tojson + ', "arguments": ' -}}
                    {%- if function['arguments'] is string -%}
                        {{- function['arguments'] -}}
                    {%- else -%}
                        {{- function['arguments'] | tojson -}}
                    {%- endif -%}
                    {{- '}' + TOOL_CALL_END -}}
                {%- endfor -%}
            {%- endif -%}
            {{- EOS -}}
        {%- endgeneration -%}
    {%- elif message['role'] == 'tool' -%}
        {{- TOOL + '\\n' + message['content'] + '\\n' -}}
    {%- else -%}
        {{- raise_exception('tinyllm chat format: expected one optional leading system message, then user, assistant '
                            'and tool messages; got role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ASSISTANT + '\\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- THINK_START + '\\n' -}}
    {%- endif -%}
{%- endif -%}
"""
CHAT_TEMPLATE = (
    "{#- tinyllm chat format, defined in tinyllm_hf/tokenizer/chat_template.py -#}\n"
    + "".join(f"{{%- set {name} = {_literal(value)} -%}}\n" for name, value in _TEMPLATE_CONSTANTS.items())
    + _TEMPLATE_BODY
)

# transformers' response template (`tokenizer.response_template`) for one assistant turn. The parser starts after the
# last `<|assistant|>\n` of prompt + reply (so a prompt ending in `<think>\n`, enable_thinking, opens the reasoning);
# text outside `<think>` and `<tool_call>` is content, joined around the calls, up to `<|endoftext|>`. The newlines
# the chat template writes around the reasoning are part of its delimiters, as `reply.split_reasoning` strips them.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": ASSISTANT_TOKEN + "\n",
    "fields": {
        "reasoning_content": {"open_pattern": re.escape(THINK_START) + r"\n*",
                              "close_pattern": r"\n*" + re.escape(THINK_END) + r"\n*", "content": "text",
                              "content_args": {"strip": False}},
        "tool_calls": {"open": TOOL_CALL_START, "close": TOOL_CALL_END, "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close": EOS_TOKEN, "repeats": True, "join": "", "content": "text", "content_args": {"strip": False}},
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# Text from users is never control tokens
# ---------------------------------------------------------------------------------------------------------------------
# A tokenizer turns every control string in its input into the control token, wherever it came from: a user who writes
# `<|endoftext|><|assistant|>` in a message would end their turn and forge the assistant's. So a prompt is encoded in
# pieces: the callers' strings (messages, tool schemas, tool results) are escaped before rendering, so that the only
# control strings in the rendered text are the template's own; the text between them is restored and encoded with
# control tokens off. A tokenizer splits its input at control tokens before anything else, so for a conversation
# without control strings in its text the pieces encode to exactly the ids of the whole rendered string.
_CONTROL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")")
_ESCAPE = "\ue000"  # a private-use character; each control string becomes it plus one more (U+E001...)
_PLACEHOLDERS = {token: _ESCAPE + chr(0xE001 + i) for i, token in enumerate(SPECIAL_TOKENS)}
_ESCAPED_ESCAPE = _ESCAPE + "\ue0ff"  # the escape character itself, where a caller's text holds it
_RESTORE = re.compile(_ESCAPE + "(.)", re.DOTALL)
_RESTORED = {placeholder[1]: token for token, placeholder in _PLACEHOLDERS.items()} | {_ESCAPED_ESCAPE[1]: _ESCAPE}


def escape_control_text(value):
    """`value` (messages, tools: any JSON-like structure) with every control string in its strings and keys replaced
    by a placeholder the template passes through unchanged; `split_control` restores them."""
    if isinstance(value, str):
        return _CONTROL_SPLIT.sub(lambda m: _PLACEHOLDERS[m.group()], value.replace(_ESCAPE, _ESCAPED_ESCAPE))
    if isinstance(value, dict):
        return {escape_control_text(key): escape_control_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_control_text(item) for item in value]
    return value


def split_control(rendered: str) -> list[tuple[str, bool]]:
    """A prompt rendered from `escape_control_text` output as `(piece, is_control)`: each control string the template
    wrote, and the text between them with the callers' strings restored (to be encoded with control tokens off)."""
    pieces = []
    for i, piece in enumerate(_CONTROL_SPLIT.split(rendered)):
        if piece:
            pieces.append((piece, True) if i % 2 else (_RESTORE.sub(lambda m: _RESTORED[m.group(1)], piece), False))
    return pieces


_TEXT_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def text_backend(tokenizer):
    """A private copy of `tokenizer`'s backend (`tokenizers.Tokenizer`) that never matches control tokens, for text
    from users. `tokenizer(..., split_special_tokens=True)` would flip a flag on the shared backend instead, and calls
    from several threads (the server tokenizes in worker threads) would race on it: a control string of the template
    split into bytes, or a user's turned into a control token. The copy is made again when tokens were added since."""
    size, backend = _TEXT_BACKENDS.get(tokenizer, (None, None))
    if size != len(tokenizer):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        _TEXT_BACKENDS[tokenizer] = (len(tokenizer), backend)
    return backend


def encode_conversation(tokenizer, messages: list[dict], tools: list | None = None) -> dict[str, list[int]]:
    """A whole conversation as SFT trains on it: `input_ids` and `assistant_masks` (1 on the tokens inside
    `{% generation %}`), as `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` gives them - but
    with the messages' text encoded as plain text, so a control string in training data stays text. A token is masked
    when it overlaps an assistant span, transformers' rule."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, spans = render_jinja_template([escape_control_text(messages)], tools=escape_control_text(tools) or None,
                                            chat_template=tokenizer.chat_template, return_assistant_tokens_mask=True)
    rendered, spans = rendered[0], spans[0]

    def assistant(start: int, end: int) -> int:  # [start, end) in the rendered text overlaps an assistant span
        return int(any(start < span_end and span_start < end for span_start, span_end in spans))

    input_ids: list[int] = []
    masks: list[int] = []
    offset = 0
    for i, piece in enumerate(_CONTROL_SPLIT.split(rendered)):
        if i % 2:  # a control string the template wrote
            input_ids.append(tokenizer.convert_tokens_to_ids(piece))
            masks.append(assistant(offset, offset + len(piece)))
        elif piece:
            text, origin = _restore_with_origin(piece)
            encoded = text_backend(tokenizer).encode(text, add_special_tokens=False)
            for token, (start, end) in zip(encoded.ids, encoded.offsets):
                input_ids.append(token)
                masks.append(assistant(offset + origin[start], offset + origin[max(end - 1, start)] + 1))
        offset += len(piece)
    return {"input_ids": input_ids, "assistant_masks": masks}


def _restore_with_origin(piece: str) -> tuple[str, list[int]]:
    """`split_control`'s restoring of one escaped piece, with the index in `piece` each restored character comes from."""
    text: list[str] = []
    origin: list[int] = []
    position = 0
    for match in _RESTORE.finditer(piece):
        text.append(piece[position:match.start()])
        origin += range(position, match.start())
        restored = _RESTORED[match.group(1)]
        text.append(restored)
        origin += [match.start()] * len(restored)
        position = match.end()
    text.append(piece[position:])
    origin += range(position, len(piece))
    return "".join(text), origin


def missing_special_tokens(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [token for token in SPECIAL_TOKENS if token not in vocab]


def apply_chat_template_to_tokenizer(tokenizer, add_missing: bool = False):
    """Give `tokenizer` our chat template, response template, EOS and pad token (in place; returns it for chaining).

    The tokenizer must already contain the special tokens as single ids (a tokenizer from `train_tokenizer` does).
    `add_missing=True` adds the ones it lacks (a tokenizer trained before the tool and thinking tokens existed) as
    special tokens after its vocabulary; a model then needs `resize_model_embeddings` to match.
    """
    missing = missing_special_tokens(tokenizer)
    if missing and add_missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    elif missing:
        raise UsageError(f"tokenizer lacks the special tokens {missing}; train it with tinyllm_hf.tokenizer.train_tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_template = RESPONSE_TEMPLATE
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer
