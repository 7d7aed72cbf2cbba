"""Running a model: one interface over every runtime a tinyllm model can be in, and one sampler.

A runtime works on token ids. Each one has

    context_length, vocab_size, eos_token_ids, max_batch_size, backend (its `tinyllm serve --backend` name),
    prompt_logits (whether prefill can keep every position's logits)
    encode(text) -> ids (control strings become control tokens: for text the program wrote), encode_text(text) ->
    ids (never control tokens: for text from users), decode_text(ids) -> text (control tokens dropped), decode_raw(ids)
    -> text (kept, for `tokenizer.reply.parse_reply`), render_chat(messages, tools, enable_thinking) -> prompt text,
    encode_chat(messages, tools, enable_thinking) -> prompt ids (what every chat front end feeds the model: the
    messages' text never becomes control tokens)    (each with its own tokenizer)
    prefill(prompts, all_logits=False) -> (state, logits)      logits (batch, vocab): the next token of each
                                             prompt; with all_logits (runtimes whose `prompt_logits` is True) (batch,
                                             len, vocab): every position of a batch of one, for prompt logprobs
    token_bytes(id) -> bytes                 what the token adds to the text (part of a character, possibly)
    decode(tokens, state) -> logits          one new token per row of the batch
    select(state, rows) -> state, merge(a, b) -> state     (batched runtimes only: max_batch_size > 1)
    logits(ids) -> (len, vocab) float tensor of every position, e.g. for perplexity
    vocab_size, grammar_tokenizer            the logits' width, and llguidance's view of the tokenizer for
                                             constrained decoding (`grammar.py`), built on first use, once per model

Runtimes: `TransformersRuntime` (any checkpoint `AutoModelForCausalLM` loads, a quanto variant, or a model object
already in memory; batched), `LlamaCppRuntime` (a GGUF file through llama-cpp-python) and `ExportedRuntime` (the ONNX
Runtime / OpenVINO prefill + decode graphs `tinyllm quantize` writes, see `exported_graphs.py`); the last two decode one
sequence at a time. `load_runtime(path)` picks the right one from what the path holds.

`sample_token` is the one sampler (temperature / top_k / top_p / repetition penalty, one seeded `torch.Generator` per
sequence); `stream_batch` is the plain loop over a fixed batch of prompts (prefill, then sample and decode until each
row's EOS or budget) that `stream` / `generate` (one prompt) and batched greedy evaluation run. The continuously
batching engine of `tinyllm serve`, where requests join and leave a running batch, is `engine.py`.
"""

import atexit
import dataclasses
import functools
import json
import re
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tinyllm_hf.errors import MissingDependencyError, MissingFileError, UsageError
from tinyllm_hf.inference.model_files import AUTO_BACKEND, BACKENDS, importable, model_kind, quantize_method
from tinyllm_hf.rope_scaling import model_context, parse_rope_scaling

if TYPE_CHECKING:
    from tinyllm_hf.inference.grammar import Grammar, TokenMask


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


# Temperatures below this are greedy: sampling at temperature -> 0 tends to argmax, and dividing by a tiny temperature
# overflows float32 (logits / 1e-45 are inf: softmax gives NaN and torch.multinomial raises). At 1e-5 the scaled
# logits of any real model stay finite.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclasses.dataclass
class SamplingParams:
    """How one sequence picks its tokens. A temperature of 0 (or below `GREEDY_BELOW_TEMPERATURE`) means greedy;
    `seed=None` draws a fresh random seed. `stop` strings are checked on the text by the layer above the token ids
    (see `engine.py`) and cut from it; an `end_after` string ends the text after its first occurrence, kept (one tool
    call per reply: `</tool_call>`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    repetition_penalty: float = 1.0  # transformers' rule: logits of tokens already in the sequence shrink
    stop: tuple[str, ...] = ()
    end_after: tuple[str, ...] = ()
    seed: int | None = None
    # Not how tokens are picked, but what the engine reports with them (as in vLLM's SamplingParams): None reports
    # nothing; k >= 0 the log-probability of each sampled (prompt) token and the k most likely tokens in its place.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: "Grammar | None" = None  # constrained decoding (grammar.py): each sequence takes its own matcher

    def token_mask(self) -> "TokenMask | None":
        return self.grammar.matcher() if self.grammar is not None else None

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()  # non-deterministic, and leaves torch's global generator alone
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 seen: list[int] | None = None, mask: "TokenMask | None" = None) -> int:
    """One token from the (vocab,) `logits` of one sequence; `seen` are its tokens so far (for the repetition penalty);
    `mask`: the sequence's grammar (`params.token_mask()`), which only tokens it allows pass and which the token
    sampled advances."""
    logits = logits.float().cpu()  # where the (CPU) generator draws
    if mask is not None:
        token = sample_token(mask.apply(logits), params, generator, seen)
        mask.advance(token)
        return token
    if params.repetition_penalty != 1.0 and seen:
        index = torch.tensor(sorted(set(seen)))
        score = logits[index]
        logits = logits.scatter(0, index, torch.where(score < 0, score * params.repetition_penalty,
                                                      score / params.repetition_penalty))
    if params.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(params.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclasses.dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens at its position, as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For (len, vocab) `logits` and the `tokens` (len) that followed each position: each token's log-probability and
    the `top` most likely tokens, under the raw model distribution (log-softmax of the logits before temperature,
    top-p or penalties: what vLLM reports by default and what a log-likelihood is)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(token, logprob, row) for token, logprob, row in zip(tokens, chosen, tops)]


def stream_batch(runtime, prompts: list[list[int]], params: list[SamplingParams],
                 eos_token_ids=None) -> Iterator[tuple[int, int]]:
    """Generate for several prompts as one batch (at most `runtime.max_batch_size`), each with its own `params` and
    generator: yield `(row, token)` for each new token as it is sampled, rows in prompt order within a step. A row
    ends at an EOS token (yielded too, as transformers' `generate` returns it), at its budget, or where its grammar
    (`params.grammar`) is complete, and leaves the batch
    (`runtime.select`) while the others go on. `eos_token_ids`: the tokens that end a sequence (default: the
    runtime's; `()` runs the whole budget)."""
    if len(prompts) > runtime.max_batch_size:
        raise UsageError(f"{len(prompts)} prompts in one batch, but this runtime takes at most {runtime.max_batch_size}")
    for prompt_ids, row_params in zip(prompts, params, strict=True):
        if not prompt_ids:
            raise UsageError("the prompt is empty: it needs at least one token")
        if len(prompt_ids) + row_params.max_tokens > runtime.context_length:
            raise UsageError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({row_params.max_tokens}) exceeds the "
                             f"model's context of {runtime.context_length} tokens")
    eos = runtime.eos_token_ids if eos_token_ids is None else set(eos_token_ids)
    generators = [row_params.generator() for row_params in params]
    masks = [row_params.token_mask() for row_params in params]
    seen = [list(prompt_ids) for prompt_ids in prompts]
    state, logits = runtime.prefill(seen)
    running = list(range(len(prompts)))  # the prompt index of each row of the batch
    while True:
        keep, tokens = [], []
        for j, row in enumerate(running):
            token = sample_token(logits[j], params[row], generators[row], seen[row], masks[row])
            seen[row].append(token)
            yield row, token
            complete = masks[row] is not None and masks[row].complete
            if token not in eos and not complete and len(seen[row]) - len(prompts[row]) < params[row].max_tokens:
                keep.append(j)
                tokens.append(token)
        if not keep:
            return
        if len(keep) < len(running):
            state = runtime.select(state, keep)
        running = [running[j] for j in keep]
        logits = runtime.decode(tokens, state)


def stream(runtime, prompt_ids: list[int], params: SamplingParams, eos_token_ids=None) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are sampled (`stream_batch` with a batch of one)."""
    for _, token in stream_batch(runtime, [prompt_ids], [params], eos_token_ids):
        yield token


def generate(runtime, prompt_ids: list[int], params: SamplingParams, eos_token_ids=None) -> list[int]:
    """All new token ids of one prompt (see `stream`)."""
    return list(stream(runtime, prompt_ids, params, eos_token_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Runtimes
# ---------------------------------------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded rows (positions start at 0 on each first token)."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


@dataclasses.dataclass
class _Batch:
    """KV cache plus a (batch, kv_len) attention mask; rows are left-padded, `positions` is each row's next position."""

    cache: object
    mask: torch.Tensor
    positions: torch.Tensor


def eos_ids(*candidates) -> set[int]:
    """The EOS token ids of the first candidate that names any (an int or a list of them). Id 0 counts: it is
    `<|endoftext|>` in tinyllm's tokenizers."""
    for candidate in candidates:
        ids = set(candidate if isinstance(candidate, list) else [candidate]) - {None}
        if ids:
            return ids
    return set()


class _ChatEncoding:
    """`encode_chat` for a runtime with `render_chat`, `encode` and `encode_text`."""

    def encode_chat(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
                    continuation: str = "") -> list[int]:
        """The ids of the chat prompt for `messages`: the chat template's control strings as control tokens, the
        text of the messages and tools as plain text, even where it spells a control string (`<|assistant|>` written
        by a user is text, not a forged turn). `continuation` is template text to append after the generation prompt
        (the server's forced tool call), with any caller strings in it passed through `escape_control_text`."""
        from tinyllm_hf.tokenizer.chat_template import escape_control_text, split_control

        rendered = self.render_chat(escape_control_text(messages), escape_control_text(tools) or None, enable_thinking)
        ids: list[int] = []
        for piece, control in split_control(rendered + continuation):
            ids += self.encode(piece) if control else self.encode_text(piece)
        return ids


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable character -> the byte it stands for (GPT-2's table, as transformers defines it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class _TokenizerText(_ChatEncoding):
    """Text <-> ids through a transformers tokenizer (`self.tokenizer`), for the runtimes that have one."""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=False).input_ids

    def encode_text(self, text: str) -> list[int]:
        from tinyllm_hf.tokenizer.chat_template import text_backend

        return text_backend(self.tokenizer).encode(text, add_special_tokens=False).ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_raw(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for: decoding it alone would turn part of a character into U+FFFD. Byte-level
        BPE pieces (tinyllm's tokenizers) map back through GPT-2's byte table, byte-fallback pieces `<0xAB>` are
        their byte; control tokens and other pieces are their decoded text."""
        from tokenizers import decoders

        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and token_id not in self.tokenizer.added_tokens_decoder:
            if isinstance(self.tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
                return bytes(_byte_level_table()[char] for char in piece)
            if re.fullmatch("<0x[0-9A-Fa-f]{2}>", piece):
                return bytes([int(piece[3:5], 16)])
        return self.decode_raw([token_id]).encode("utf-8")

    @functools.cached_property
    def grammar_tokenizer(self):
        from tinyllm_hf.inference.grammar import hf_grammar_tokenizer

        return hf_grammar_tokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)


class TransformersRuntime(_TokenizerText):
    """A transformers causal LM (Tinyllm, a merged LoRA, its Llama export, a quanto variant), batched."""

    backend = "transformers"  # its `tinyllm serve --backend` name
    max_batch_size = 64
    prompt_logits = True

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.context_length = model_context(config)  # dynamic NTK runs past max_position_embeddings
        self.vocab_size = config.vocab_size
        self.eos_token_ids = eos_ids(model.generation_config.eos_token_id, config.eos_token_id, tokenizer.eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.chat_template = tokenizer.chat_template
        self.device = model.device

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", device: str | None = None,
                        trust_remote_code: bool = False, rope_scaling: str | None = None):
        from tinyllm_hf.model_utils import get_model, get_tokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise MissingFileError(f"{model_dir / 'config.json'} not found: --model must be a checkpoint directory")
        model = get_model(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, rope_scaling=rope_scaling)
        tokenizer = get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
        return cls(model if device is None else model.to(device), tokenizer)

    @classmethod
    def from_quanto(cls, model_dir: str | Path, trust_remote_code: bool = False):
        """A `tinyllm quantize --method quanto-*` directory: quanto's safetensors + quantization map."""
        from optimum.quanto import requantize
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from tinyllm_hf.model_utils import get_config, get_tokenizer

        model_dir = Path(model_dir)
        config = get_config(str(model_dir), trust_remote_code=trust_remote_code)
        # Built on CPU (not meta) so non-persistent buffers such as RoPE's inv_freq are real; the weights are replaced.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        qmap = json.loads((model_dir / "quantization_map.json").read_text())
        requantize(model, load_file(model_dir / "model.safetensors"), qmap, device=torch.device("cpu"))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # requantize re-creates parameters, untying them
        return cls(model, get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code))

    def render_chat(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=enable_thinking)

    @torch.no_grad()  # not inference_mode: quanto's weights cannot run under it
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([list(ids)], device=self.device)).logits[0].float().cpu()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[_Batch, torch.Tensor]:
        from transformers import DynamicCache

        ids, mask, position_ids = (t.to(self.device) for t in left_pad(prompts, self.pad_token_id))
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=0 if all_logits else 1)  # 0: every position
        return _Batch(out.cache, mask, mask.sum(-1)), out.logits if all_logits else out.logits[:, -1]

    @torch.no_grad()
    def decode(self, tokens: list[int], batch: _Batch) -> torch.Tensor:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(tokens), 1))], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            cache=batch.cache,
            use_cache=True,
        )
        batch.positions = batch.positions + 1
        return out.logits[:, -1]

    def select(self, batch: _Batch, rows: list[int]) -> _Batch:
        """Keep `rows`, then drop the left columns that are now padding in every remaining row."""
        index = torch.tensor(rows, device=self.device)
        mask = batch.mask[index]
        trim = int((mask.sum(0) == 0).long().cumprod(0).sum())
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        return _Batch(batch.cache, mask[:, trim:], batch.positions[index])

    def merge(self, a: _Batch, b: _Batch) -> _Batch:
        """One batch of the rows of `a` then `b`, the shorter one left-padded (zeros in the cache, 0 in the mask)."""
        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers):
            layer_a.keys = torch.cat([pad(layer_a.keys, 2), pad(layer_b.keys, 2)])
            layer_a.values = torch.cat([pad(layer_a.values, 2), pad(layer_b.values, 2)])
        mask = torch.cat([pad(a.mask, 1), pad(b.mask, 1)])
        return _Batch(a.cache, mask, torch.cat([a.positions, b.positions]))


class _SingleSequenceRuntime(_ChatEncoding):
    """Shared parts of the runtimes that decode one sequence at a time (the engine queues instead of batching)."""

    max_batch_size = 1

    def select(self, state, rows):
        raise AssertionError("a single-sequence batch never drops rows while others continue")

    def merge(self, a, b):
        raise AssertionError("a single-sequence runtime never merges batches")

    def render_chat(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.chat_template:
            raise UsageError("this model has no chat template: use /v1/completions with a plain prompt")
        rendered, _ = render_jinja_template([messages], tools=tools or None, chat_template=self.chat_template,
                                            add_generation_prompt=True, enable_thinking=enable_thinking)
        return rendered[0]


def _close_llama(llm_ref) -> None:
    llm = llm_ref()
    if llm is not None:
        llm.close()


class LlamaCppRuntime(_SingleSequenceRuntime):
    """A GGUF file (e.g. from `tinyllm export gguf`) through llama-cpp-python; tokenizer and chat template from the file.

    `n_ctx=0` takes the context the file states; `all_logits=True` keeps the logits of every position (needed by
    `logits(ids)`, e.g. for perplexity; it costs memory, so serving leaves it off)."""

    backend = "llamacpp"  # its `tinyllm serve --backend` name

    def __init__(self, gguf_file: str | Path, n_threads: int | None = None, n_ctx: int = 0, all_logits: bool = False):
        if not importable("llama_cpp"):
            raise MissingDependencyError('running a GGUF file needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"')
        from llama_cpp import Llama

        gguf_file = Path(gguf_file)
        if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
            raise MissingFileError(f"{gguf_file} is not a .gguf file: --backend llamacpp needs --model FILE.gguf")
        batch = {"n_batch": n_ctx} if all_logits and n_ctx else {}  # one pass over a whole perplexity window
        self.llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                         logits_all=all_logits, verbose=False, **batch)
        # llama-cpp-python frees the model in Llama.__del__, which at interpreter exit can run after its library
        # is gone ("'NoneType' object is not callable"): close it at exit instead, unless it was freed before.
        atexit.register(_close_llama, weakref.ref(self.llm))
        self.context_length = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        self.prompt_logits = all_logits  # without it llama.cpp keeps the last position's logits only
        self.eos_token_ids = {self.llm.token_eos()}
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode_text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def decode_raw(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.llm.detokenize([token_id], special=True)

    @functools.cached_property
    def grammar_tokenizer(self):
        from tinyllm_hf.inference.grammar import llama_cpp_grammar_tokenizer

        return llama_cpp_grammar_tokenizer(self.llm)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(self.llm.scores[: len(ids)].copy()).float()

    def _last_logits(self) -> torch.Tensor:
        # Llama.scores stays empty unless logits_all=True (which keeps logits for every position); the last
        # position's logits are all we need, read straight from the context.
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())[None]

    def prefill(self, prompts, all_logits: bool = False):
        (prompt,) = prompts
        self.llm.reset()
        self.llm.eval(prompt)
        if all_logits:
            if not self.prompt_logits:
                raise UsageError("the logits of every prompt position need a LlamaCppRuntime with all_logits=True")
            return None, torch.from_numpy(self.llm.scores[: len(prompt)].copy()).float()[None]
        return None, self._last_logits()

    def decode(self, tokens, state):
        self.llm.eval(tokens)
        return self._last_logits()


class ExportedRuntime(_TokenizerText, _SingleSequenceRuntime):
    """ONNX Runtime or OpenVINO prefill + decode graphs written by `tinyllm quantize` (graph runners in `exported_graphs.py`)."""

    backend = "onnx"  # its `tinyllm serve --backend` name
    prompt_logits = True

    def __init__(self, model_dir: str | Path, num_threads: int | None = None, trust_remote_code: bool = False):
        from tinyllm_hf.inference.exported_graphs import OnnxGraphs, OpenVINOGraphs
        from tinyllm_hf.model_utils import get_tokenizer

        model_dir = Path(model_dir)
        method = quantize_method(model_dir)
        if method not in ("onnx", "onnx-int8", "openvino-int8", "openvino-int4"):
            raise UsageError(f"{model_dir} is not an ONNX or OpenVINO export from `tinyllm quantize`")
        graphs = OnnxGraphs if method.startswith("onnx") else OpenVINOGraphs
        self.graphs = graphs(model_dir, num_threads=num_threads)
        self.tokenizer = get_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
        config = self.graphs.config
        self.context_length = config["max_position_embeddings"]
        self.vocab_size = config["vocab_size"]
        self.eos_token_ids = eos_ids(config.get("eos_token_id"), self.tokenizer.eos_token_id)
        self.chat_template = self.tokenizer.chat_template

    def logits(self, ids: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.graphs.step("prefill", list(ids), 0, None)[0].copy()).float()

    def prefill(self, prompts, all_logits: bool = False):
        (prompt,) = prompts
        logits, cache = self.graphs.step("prefill", prompt, 0, None)  # the graph gives every position's logits
        logits = torch.from_numpy(logits.copy())  # (len, vocab)
        return [cache, len(prompt)], logits[None] if all_logits else logits[-1:]

    def decode(self, tokens, state):
        cache, position = state
        logits, state[0] = self.graphs.step("decode", tokens, position, cache)
        state[1] = position + 1
        return torch.from_numpy(logits[-1:].copy())


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_runtime(path: str | Path, threads: int | None = None, dtype: str = "float32", n_ctx: int = 0,
                 all_logits: bool = False, trust_remote_code: bool = False):
    """The runtime for `path`, whatever it holds: a checkpoint, a `tinyllm quantize` output or a .gguf file.
    `n_ctx` and `all_logits` apply to GGUF files (see `LlamaCppRuntime`); code shipped in a folder runs only with
    `trust_remote_code`."""
    kind = model_kind(path)
    if kind == "gguf":
        return LlamaCppRuntime(path, n_threads=threads, n_ctx=n_ctx, all_logits=all_logits)
    if kind == "checkpoint":
        return TransformersRuntime.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if kind.startswith("quanto"):
        return TransformersRuntime.from_quanto(path, trust_remote_code=trust_remote_code)
    return ExportedRuntime(path, num_threads=threads, trust_remote_code=trust_remote_code)


def load_backend(name: str, model: str | Path, dtype: str = "float32", threads: int | None = None,
                 trust_remote_code: bool = False, rope_scaling: str | None = None, streams: int = 1):
    """The runtime `name` (`tinyllm serve --backend`) for `model`: a checkpoint directory, a .gguf file, or a `tinyllm
    quantize` output. `rope_scaling` ("yarn:4", ...) rescales a checkpoint's RoPE (transformers backend only).
    `auto`: for a float32 checkpoint, the fastest runtime that reproduces it at `streams` sequences at once
    (`runtime_choice.choose_runtime`); anything else runs on the one runtime its files need. Says which on stderr.

    `threads` sets the CPU threads of one decode step (None: the runtime's default). A small model gains nothing from
    more than one at batch sizes this small, and on an oversubscribed machine each multi-threaded op can wait ~20 ms
    for a descheduled thread (docs/serving.md), so `--threads 1` is the safe choice for small models on shared CPUs.
    """
    if rope_scaling:
        parse_rope_scaling(rope_scaling)  # a bad spec fails before anything loads
    if name == AUTO_BACKEND:
        from tinyllm_hf.inference.runtime_choice import choose_runtime, is_auto_eligible

        if is_auto_eligible(model, dtype, rope_scaling, trust_remote_code):
            return choose_runtime(model, streams=streams, threads=threads)
        kind = model_kind(model)
        name = {"gguf": "llamacpp", "checkpoint": "transformers"}.get(kind, "quanto" if "quanto" in kind else "onnx")
        print(f"runtime: {name} (the one runtime for a {kind} model with these options)", file=sys.stderr)
        if name == "quanto":
            return TransformersRuntime.from_quanto(model, trust_remote_code=trust_remote_code)
    if rope_scaling and name != "transformers":
        raise UsageError(f"--rope-scaling needs the transformers backend (a checkpoint folder), not {name}: export "
                         "the rescaled checkpoint instead (tinyllm export gguf keeps YaRN)")
    if threads is not None:
        torch.set_num_threads(threads)
    if name == "transformers":
        return TransformersRuntime.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                   rope_scaling=rope_scaling)
    if name == "llamacpp":
        return LlamaCppRuntime(model, n_threads=threads)
    if name == "onnx":
        return ExportedRuntime(model, num_threads=threads, trust_remote_code=trust_remote_code)
    raise UsageError(f"unknown backend {name!r}; choose one of {', '.join((AUTO_BACKEND, *BACKENDS))}")
