"""Constrained decoding: OpenAI's `response_format` (JSON mode and JSON schemas) as a token mask.

    grammar = Grammar(runtime.grammar_tokenizer, json_grammar(schema))   # once per request, checked
    mask = grammar.matcher()                                            # once per sequence (each choice its own)
    logits = mask.apply(logits); token = sample(logits); mask.advance(token); mask.complete -> the reply is whole

The grammar engine is llguidance (the Rust library behind vLLM's and SGLang's `guidance` backend and llama.cpp's
`LLGUIDANCE` build): a wheel for every Python 3.9+ (abi3) with no dependencies, so it neither builds in CI nor pulls
another torch. (xgrammar needs triton and apache-tvm-ffi; outlines pulls its own stack.) It reads the model's
tokenizer once per loaded model (`runtime.grammar_tokenizer`: byte-level BPE from tokenizer.json, or a GGUF file's
vocabulary through llama.cpp) and computes, at each step, the bitmask of the tokens that keep the text a prefix of
something the grammar accepts; EOS is allowed only where the text is complete.

JSON is written compactly with Python's separators (`", "`, `": "`) and no other whitespace: a free-whitespace grammar
lets a model spend its whole budget on newlines (a known failure of JSON modes), and these are the separators
`json.dumps` gives the training data.
"""

import json

import numpy as np
import torch

from tinyllm_hf.errors import GenerationError, MissingDependencyError, UsageError
from tinyllm_hf.inference.model_files import importable

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's json_object: any object


def _one_line(message: str) -> str:
    """llguidance's error, on one line (a regex error spans several, with a ^^^ marker line)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip().strip("^"))


def _llguidance():
    if not importable("llguidance"):
        raise MissingDependencyError('constrained decoding (response_format) needs llguidance: '
                                     'pip install "tinyllm-hf[serve]"')
    import llguidance

    return llguidance


def json_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON text that `schema` (a JSON schema) accepts; unchecked (see `Grammar`)."""
    return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)


def hf_grammar_tokenizer(tokenizer, vocab_size: int, eos_token_ids):
    """llguidance's view of a transformers (fast) tokenizer, for logits of `vocab_size` entries. ~1 s for a large
    vocabulary: runtimes build it once (`grammar_tokenizer`)."""
    import llguidance.hf

    _llguidance()
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))


def llama_cpp_grammar_tokenizer(llm):
    """llguidance's view of a llama.cpp model's vocabulary (`llama_cpp.Llama`)."""
    _llguidance()
    import llama_cpp
    import llguidance.llamacpp

    return llguidance.llamacpp.lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(llm.model))


class Grammar:
    """A grammar compiled for one tokenizer; raises UsageError (llguidance's reason, one line) when the grammar is
    one it cannot enforce: an unsupported JSON schema keyword, a bad pattern, a dangling $ref. Immutable: shared by
    the choices of a request, each taking its own `matcher()`."""

    def __init__(self, tokenizer, grammar: str):
        llguidance = _llguidance()
        self._initial = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._initial.is_error():
            raise UsageError(_one_line(self._initial.get_error()))
        self.vocab_size = tokenizer.vocab_size

    def matcher(self) -> "TokenMask":
        return TokenMask(self._initial.deep_copy(), self.vocab_size)


class TokenMask:
    """One sequence's place in its grammar: the mask of its next token, advanced with each token sampled."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (vocab,) with every token the grammar forbids next at -inf (a new tensor)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self._vocab_size].view(bool)
        forbidden = torch.ones(logits.shape[-1], dtype=torch.bool)
        forbidden[:self._vocab_size] = torch.from_numpy(~allowed)
        return logits.masked_fill(forbidden, float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GenerationError(f"token {token} breaks the response_format grammar: "
                                  f"{_one_line(self._matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """Whether the text is whole: the grammar takes no more tokens (EOS aside)."""
        return self._matcher.is_stopped()
