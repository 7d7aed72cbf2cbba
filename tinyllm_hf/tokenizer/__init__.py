"""Byte-level BPE tokenizers for Chinese: training, the chat format, vocabulary extension (`tinyllm tokenizer`)."""

from tinyllm_hf.tokenizer.chat_template import (
    ASSISTANT_TOKEN,
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    PAD_TOKEN,
    RESPONSE_TEMPLATE,
    SPECIAL_TOKENS,
    SYSTEM_TOKEN,
    USER_TOKEN,
    apply_chat_template_to_tokenizer,
)
from tinyllm_hf.tokenizer.extend import extend_tokenizer, resize_model_embeddings
from tinyllm_hf.tokenizer.train import DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE, save_tokenizer, train_tokenizer

__all__ = [
    "ASSISTANT_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_MAX_LENGTH",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RESPONSE_TEMPLATE",
    "SPECIAL_TOKENS",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "apply_chat_template_to_tokenizer",
    "extend_tokenizer",
    "resize_model_embeddings",
    "save_tokenizer",
    "train_tokenizer",
]
