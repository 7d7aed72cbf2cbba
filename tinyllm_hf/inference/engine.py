"""The generation engine behind `tinyllm serve` and `tinyllm demo`: a request queue and a batching decode loop.

One background thread owns the model. Callers `submit` a prompt (token ids) with sampling settings and a `sink` that
receives `Delta`s (new text, then a finish reason) from the engine thread. Each loop iteration the thread

1. admits waiting sequences while the batch has room: their prompts are prefilled as a left-padded batch and merged
   into the running batch's KV cache (continuous batching: nobody waits for the longest sequence of a batch to end);
2. samples one token per row with that row's own temperature / top_p / seed (one `torch.Generator` per sequence, so a
   seeded request gives the same tokens whatever else shares its batch);
3. streams each row's new text, ends rows that hit EOS, a stop string, their token budget, their deadline, or were
   cancelled (client gone), and drops those rows from the cache;
4. runs one decode step for the remaining rows.

The queue is bounded: `submit` raises `EngineOverloaded` when it is full, so a server answers 503 instead of hanging.

Backends: `TransformersBackend` (any checkpoint `AutoModelForCausalLM` loads; batched), `LlamaCppBackend` (a GGUF
file through llama-cpp-python) and `ExportedBackend` (ONNX Runtime / OpenVINO graphs written by `tinyllm quantize`);
the latter two decode one sequence at a time, so the engine queues instead of batching for them.
"""

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinyllm_hf.errors import EngineOverloaded, MissingDependencyError, MissingFileError, UsageError

FINISHED_OK = ("stop", "length")  # finish reasons of a normal end; "cancelled", "timeout" and "error" are aborts


@dataclasses.dataclass
class SamplingParams:
    """OpenAI's sampling knobs. temperature 0 means greedy; `seed=None` draws a fresh random seed."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclasses.dataclass
class Delta:
    """What a sink receives: new text of one sequence, and on its last delta the finish reason."""

    text: str
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """One sequence being generated: its prompt, sampling state and how much of its text was already sent."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Delta], None], deadline: float):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.deadline = deadline
        self.generated: list[int] = []
        self.sent_chars = 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()  # non-deterministic, and leaves torch's global generator alone
        else:
            self.generator.manual_seed(params.seed)

    def cancel(self) -> None:
        """Ask the engine to stop this sequence at its next step (safe from any thread)."""
        self.cancelled.set()

    def emit(self, delta: Delta) -> None:
        try:
            self.sink(delta)
        except Exception:  # a broken listener (e.g. its event loop closed) stops this sequence, not the engine
            self.cancel()

    def finish(self, reason: str, text: str = "", error: str | None = None) -> None:
        self.finish_reason = reason
        self.emit(Delta(text, reason, len(self.generated), error))


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


def sample_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """One token per row of `logits` (batch, vocab) with each sequence's own temperature, top_p and generator."""
    tokens = []
    for row, seq in zip(logits.float(), sequences):
        params = seq.params
        if params.temperature == 0:
            tokens.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return tokens


class Engine:
    """Runs `backend` in one background thread; see the module docstring for the loop."""

    def __init__(self, backend, max_batch_size: int = 8, max_queue: int = 64, request_timeout: float = 120.0):
        if max_batch_size < 1 or max_queue < 1:
            raise UsageError("max_batch_size and max_queue must be at least 1")
        self.backend = backend
        self.max_batch_size = min(max_batch_size, backend.max_batch_size)
        self.request_timeout = request_timeout
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_queue)
        self.running: list[Sequence] = []
        self.finished: collections.Counter[str] = collections.Counter()  # finish reasons so far, for /health and tests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tinyllm-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Delta], None]) -> Sequence:
        """Queue a sequence; `sink` gets its deltas from the engine thread. Raises EngineOverloaded when full."""
        if not prompt_ids:
            raise UsageError("the prompt is empty: it needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.backend.context_length:
            raise UsageError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.backend.context_length} tokens"
            )
        seq = Sequence(prompt_ids, params, sink, time.monotonic() + self.request_timeout)
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise EngineOverloaded(f"the request queue is full ({self.waiting.maxsize} waiting); retry later") from None
        return seq

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the loop --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        state, logits = None, None
        while not self._stop.is_set():
            try:
                state, logits = self._admit(state, logits)
                if self.running:
                    state, logits = self._step(state, logits)
            except Exception as exc:  # a backend failure ends the affected requests, never the engine
                for seq in self.running:
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self.running, state, logits = [], None, None
        for seq in self.running:
            self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        self.finished[reason] += 1
        seq.finish(reason, text, error)

    def _admit(self, state, logits):
        """Prefill waiting sequences into the batch while it has room (blocks briefly when idle)."""
        new: list[Sequence] = []
        while len(self.running) + len(new) < self.max_batch_size:
            try:
                seq = self.waiting.get(timeout=0.05) if not (self.running or new) else self.waiting.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
            elif time.monotonic() > seq.deadline:
                self._finish(seq, "timeout", error="the request timed out while waiting in the queue")
            else:
                new.append(seq)
        if not new:
            return state, logits
        new_state, new_logits = self.backend.prefill([seq.prompt_ids for seq in new])
        self.running += new
        if state is None:
            return new_state, new_logits
        return self.backend.merge(state, new_state), torch.cat([logits, new_logits])

    def _step(self, state, logits):
        """Sample, stream and retire rows, then one decode step for the rows still running."""
        tokens = sample_tokens(logits, self.running)
        keep = [i for i, (seq, token) in enumerate(zip(self.running, tokens)) if self._advance(seq, token)]
        if not keep:
            self.running = []
            return None, None
        if len(keep) < len(self.running):
            state = self.backend.select(state, keep)
        self.running = [self.running[i] for i in keep]
        return state, self.backend.decode([tokens[i] for i in keep], state)

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Append `token` to `seq` and stream its new text; False once the sequence has finished."""
        if seq.cancelled.is_set():
            self._finish(seq, "cancelled")
            return False
        if time.monotonic() > seq.deadline:
            self._finish(seq, "timeout", error=f"generation exceeded the request timeout of {self.request_timeout:g}s")
            return False
        if token in self.backend.eos_token_ids:
            self._finish(seq, "stop", self._unsent(seq, self.backend.decode_text(seq.generated)))
            return False
        seq.generated.append(token)
        text = self.backend.decode_text(seq.generated)
        stop_at = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._finish(seq, "stop", self._unsent(seq, text[:stop_at]))
            return False
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, "length", self._unsent(seq, text))
            return False
        ready = len(text) - held_back(text, seq.params.stop)
        if ready > seq.sent_chars:
            seq.emit(Delta(text[seq.sent_chars:ready], None, len(seq.generated)))
            seq.sent_chars = ready
        return True

    @staticmethod
    def _unsent(seq: Sequence, text: str) -> str:
        return text[seq.sent_chars:]


# ---------------------------------------------------------------------------------------------------------------------
# Backends. Each one has: context_length, eos_token_ids, max_batch_size, encode(text), decode_text(ids),
# render_chat(messages) -> prompt text, prefill(prompts) -> (state, logits), decode(tokens, state) -> logits,
# select(state, rows) -> state, merge(a, b) -> state. Logits are (batch, vocab) for the next token of each row.
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    """KV cache plus a (batch, kv_len) attention mask; rows are left-padded, `positions` is each row's next position."""

    cache: object
    mask: torch.Tensor
    positions: torch.Tensor


class TransformersBackend:
    """Any causal LM that `AutoModelForCausalLM` loads (Tinyllm, a merged LoRA, its Llama export), batched."""

    max_batch_size = 64

    def __init__(self, model_dir: str | Path, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import tinyllm_hf  # noqa: F401  (registers Tinyllm with the Auto classes)

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise MissingFileError(f"{model_dir / 'config.json'} not found: --model must be a checkpoint directory")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        config = self.model.config
        self.context_length = config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id or config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.chat_template = self.tokenizer.chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[_Batch, torch.Tensor]:
        from transformers import DynamicCache

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1
        )
        return _Batch(out.cache, mask, mask.sum(-1)), out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int], batch: _Batch) -> torch.Tensor:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(tokens), 1))], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens)[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            cache=batch.cache,
            use_cache=True,
        )
        batch.positions = batch.positions + 1
        return out.logits[:, -1]

    def select(self, batch: _Batch, rows: list[int]) -> _Batch:
        """Keep `rows`, then drop the left columns that are now padding in every remaining row."""
        index = torch.tensor(rows)
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


class _SingleSequenceBackend:
    """Shared parts of the backends that decode one sequence at a time (the engine queues instead of batching)."""

    max_batch_size = 1

    def select(self, state, rows):
        raise AssertionError("a single-sequence batch never drops rows while others continue")

    def merge(self, a, b):
        raise AssertionError("a single-sequence backend never merges batches")

    def render_chat(self, messages: list[dict]) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.chat_template:
            raise UsageError("this model has no chat template: use /v1/completions with a plain prompt")
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template, add_generation_prompt=True)
        return rendered[0]


class LlamaCppBackend(_SingleSequenceBackend):
    """A GGUF file (e.g. from `tinyllm export gguf`) through llama-cpp-python; tokenizer and chat template from the file."""

    def __init__(self, gguf_file: str | Path, n_threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingDependencyError('the llamacpp backend needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"') from None
        gguf_file = Path(gguf_file)
        if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
            raise MissingFileError(f"{gguf_file} is not a .gguf file: --backend llamacpp needs --model FILE.gguf")
        self.llm = Llama(model_path=str(gguf_file), n_ctx=0, n_threads=n_threads, n_threads_batch=n_threads,
                         logits_all=False, verbose=False)
        self.context_length = self.llm.n_ctx()
        self.eos_token_ids = {self.llm.token_eos()}
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode_text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _last_logits(self) -> torch.Tensor:
        # Llama.scores stays empty unless logits_all=True (which keeps logits for every position); the last
        # position's logits are all we need, read straight from the context.
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())[None]

    def prefill(self, prompts):
        (prompt,) = prompts
        self.llm.reset()
        self.llm.eval(prompt)
        return None, self._last_logits()

    def decode(self, tokens, state):
        self.llm.eval(tokens)
        return self._last_logits()


class ExportedBackend(_SingleSequenceBackend):
    """ONNX Runtime or OpenVINO prefill + decode graphs written by `tinyllm quantize` (tinyllm_hf.inference.runtimes)."""

    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        from tinyllm_hf.export.quantize import load_quantized
        from tinyllm_hf.inference.runtimes import CachedDecoder

        self.model, self.tokenizer = load_quantized(model_dir, num_threads=num_threads)
        if not isinstance(self.model, CachedDecoder):
            raise UsageError(f"{model_dir} is not an ONNX or OpenVINO export from `tinyllm quantize`")
        config = self.model.config
        self.context_length = config["max_position_embeddings"]
        eos = config.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.chat_template = self.tokenizer.chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prefill(self, prompts):
        (prompt,) = prompts
        logits, cache = self.model._step("prefill", prompt, 0, None)
        return [cache, len(prompt)], torch.from_numpy(logits[-1:].copy())

    def decode(self, tokens, state):
        cache, position = state
        logits, state[0] = self.model._step("decode", tokens, position, cache)
        state[1] = position + 1
        return torch.from_numpy(logits[-1:].copy())


BACKENDS = ("transformers", "llamacpp", "onnx")


def load_backend(name: str, model: str | Path, dtype: str = "float32", threads: int | None = None):
    """The backend `name` for `model` (a checkpoint directory, a .gguf file, or a `tinyllm quantize` output).

    `threads` sets the CPU threads of one decode step (None: the runtime's default). A small model gains nothing from
    more than one at batch sizes this small, and on an oversubscribed machine each multi-threaded op can wait ~20 ms
    for a descheduled thread (docs/serving.md), so `--threads 1` is the safe choice for small models on shared CPUs.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if name == "transformers":
        return TransformersBackend(model, dtype=dtype)
    if name == "llamacpp":
        return LlamaCppBackend(model, n_threads=threads)
    if name == "onnx":
        return ExportedBackend(model, num_threads=threads)
    raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
