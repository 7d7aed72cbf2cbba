"""Special tokens and the chat format: the single definition every stage (SFT data, inference, serving, export) uses.

One turn renders as

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}<|endoftext|>

A conversation without a system message gets `DEFAULT_SYSTEM_PROMPT`. Turns follow each other with no separator:
the next `<|user|>` comes right after the previous answer's `<|endoftext|>`, so the rendering of the first N turns is
an exact prefix of the rendering of N+1 turns (what a multi-turn chat feeds back to the model) and of the prompt
rendered with `add_generation_prompt=True`, which ends in `<|assistant|>\\n`.

The answer and its `<|endoftext|>` sit inside `{% generation %}`: `return_assistant_tokens_mask=True` (and TRL's
`assistant_only_loss=True`) then mark exactly the tokens the model must learn to produce, the stop token included.
"""

import json

from tinyllm_hf.errors import UsageError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
# Order matters: a trained tokenizer gives these ids 0..4.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

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
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- USER + '\\n' + message['content'] + '\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- ASSISTANT + '\\n' -}}
        {%- generation -%}
            {{- message['content'] + EOS -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('tinyllm chat format: expected one optional leading system message, then user and '
                            'assistant messages; got role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ASSISTANT + '\\n' -}}
{%- endif -%}
"""
CHAT_TEMPLATE = (
    "{#- tinyllm chat format, defined in tinyllm_hf/tokenizer/chat_template.py -#}\n"
    + "".join(f"{{%- set {name} = {_literal(value)} -%}}\n" for name, value in _TEMPLATE_CONSTANTS.items())
    + _TEMPLATE_BODY
)


def apply_chat_template_to_tokenizer(tokenizer):
    """Give `tokenizer` our chat template, EOS and pad token (in place; returns it for chaining).

    The tokenizer must already contain the special tokens as single ids (a tokenizer from `train_tokenizer` does).
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise UsageError(f"tokenizer lacks the special tokens {missing}; train it with tinyllm_hf.tokenizer.train_tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer
