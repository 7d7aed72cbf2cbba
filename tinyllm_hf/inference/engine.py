"""The generation engine behind `tinyllm serve` and `tinyllm demo`: a request queue and a batching decode loop.

One background thread owns the model. Callers `submit` a prompt (token ids) with sampling settings and a listener
that hears of each new token and of the finish reason from the engine thread. The engine knows token ids only:
detokenising, stop strings and text deltas are `text_stream.TextStream`, the listener every front end uses. Each loop
iteration the thread

1. admits waiting sequences while the batch has room: their prompts are prefilled as a left-padded batch and merged
   into the running batch's KV cache (continuous batching: nobody waits for the longest sequence of a batch to end);
2. samples one token per row with that row's own temperature / top_p / seed (one `torch.Generator` per sequence, so a
   seeded request gives the same tokens whatever else shares its batch), for a row with a grammar
   (`response_format`, `grammar.py`) only among the tokens its grammar allows next, and for the rows that asked for
   logprobs (`SamplingParams.logprobs`) the log-softmax of that row's raw logits: the other rows pay for neither;
3. tells each row's listener of its token, ends rows that hit EOS, a stop (their listener says so: a stop string),
   the end of their grammar, their token budget, their deadline, or were cancelled (client gone), and drops those rows from the cache;
4. runs one decode step for the remaining rows.

A sequence that asks for its prompt's logprobs (`SamplingParams.prompt_logprobs`, the completions API's `echo` with
`logprobs`) is prefilled alone with the logits of every position kept, so the sequences prefilled beside it never pay
for them; with `max_tokens` 0 it ends ("length") once they are reported. One without prompt logprobs and `max_tokens`
0 ends without being prefilled.

The queue is bounded: `submit` raises `EngineOverloaded` when it is full, so a server answers 503 instead of hanging.

A failure ends only the sequences it concerns: a row whose sampling fails (its logits are NaN, say) finishes with
"error" while the others go on; a prefill that fails is retried one new sequence at a time, so only a prompt that
cannot be prefilled alone fails, and the running batch is untouched. Only a failing decode step (which runs every row
at once) or merge ends the whole batch.

`Engine.stream_batch` is `runtime.stream_batch` through the engine: the token-id generator the tool loop takes as its
`generate_round`, so the web demo runs its tool loop while its users share one batch.

The model is any runtime of `runtime.py` (its prefill / decode / select / merge on token ids); runtimes that decode one sequence at a time (llama.cpp, exported graphs) make the engine queue
instead of batch.
"""

import collections
import queue
import threading
import time
from collections.abc import Iterator

import torch

from tinyllm_hf.errors import EngineOverloaded, GenerationError, UsageError
from tinyllm_hf.inference.runtime import SamplingParams, TokenLogprob, sample_token, token_logprobs

FINISHED_OK = ("stop", "length")  # finish reasons of a normal end; "cancelled", "timeout" and "error" are aborts


class Sequence:
    """One sequence being generated: its prompt, sampling state, tokens so far and who listens to them."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, listener, deadline: float):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        # on_token / on_progress / on_finish (and on_prompt_logprobs if it asked), e.g. a text_stream.TextStream
        self.listener = listener
        self.deadline = deadline
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.eos_token: int | None = None  # the EOS that ended it (not in `generated`, as the server counts tokens)
        self.cancelled = threading.Event()
        self.generator = params.generator()
        self.mask = params.token_mask()  # its grammar's state (response_format), None when unconstrained

    def cancel(self) -> None:
        """Ask the engine to stop this sequence at its next step (safe from any thread)."""
        self.cancelled.set()

    def notify(self, event: str, *args) -> bool:
        """Call the listener's `event` method; its answer (False if it broke)."""
        try:
            return bool(getattr(self.listener, event)(self.generated, *args))
        except Exception:  # a broken listener (e.g. its event loop closed) stops this sequence, not the engine
            self.cancel()
            return False

    def finish(self, reason: str, error: str | None = None, logprob: TokenLogprob | None = None) -> None:
        self.finish_reason = reason
        self.notify("on_finish", reason, error, logprob)

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from this sequence's (vocab,) `logits`, with its own sampling settings, generator and
        grammar (which the token advances), and its logprobs if the sequence asked for them (None otherwise: only
        the rows that ask pay for the softmax)."""
        seen = self.prompt_ids + self.generated if self.params.repetition_penalty != 1.0 else None
        token = sample_token(logits, self.params, self.generator, seen, self.mask)
        if self.params.logprobs is None:
            return token, None
        return token, token_logprobs(logits[None], [token], self.params.logprobs)[0]


class _RowListener:
    """Puts one row's tokens, then its finish, on a queue shared by the rows of `Engine.stream_batch`."""

    def __init__(self, row: int, put):
        self.row, self.put = row, put

    def on_token(self, generated: list[int], logprob: TokenLogprob | None) -> bool:
        self.put((self.row, generated[-1], None, None))
        return False  # no stop strings: only EOS or the budget ends the row

    def on_progress(self, generated: list[int]) -> None:
        pass

    def on_finish(self, generated: list[int], reason: str, error: str | None, logprob: TokenLogprob | None) -> None:
        self.put((self.row, None, reason, error))


class Engine:
    """Runs `runtime` in one background thread; see the module docstring for the loop."""

    def __init__(self, runtime, max_batch_size: int = 8, max_queue: int = 64, request_timeout: float = 120.0):
        if max_batch_size < 1 or max_queue < 1:
            raise UsageError("max_batch_size and max_queue must be at least 1")
        self.runtime = runtime
        self.max_batch_size = min(max_batch_size, runtime.max_batch_size)
        self.request_timeout = request_timeout
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_queue)
        self.running: list[Sequence] = []
        self.finished: collections.Counter[str] = collections.Counter()  # finish reasons so far, for /health and tests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tinyllm-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener) -> Sequence:
        """Queue a sequence; `listener` hears of its tokens from the engine thread (`on_token(generated, logprob) ->
        stop?`, `on_progress(generated)`, `on_finish(generated, reason, error, logprob)` - logprob: a
        `runtime.TokenLogprob` if `params.logprobs` asked, else None; on_finish's is the EOS's - and, if
        `params.prompt_logprobs` asked, `on_prompt_logprobs(generated, logprobs)` once prefilled: None for the first
        prompt token, then one `TokenLogprob` per token; `text_stream.TextStream` turns them into text). Raises
        EngineOverloaded when full."""
        if not prompt_ids:
            raise UsageError("the prompt is empty: it needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.runtime.context_length:
            raise UsageError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.runtime.context_length} tokens"
            )
        seq = Sequence(prompt_ids, params, listener, time.monotonic() + self.request_timeout)
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise EngineOverloaded(f"the request queue is full ({self.waiting.maxsize} waiting); retry later") from None
        return seq

    def stream_batch(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[tuple[int, int]]:
        """`runtime.stream_batch` through the engine: each prompt joins the engine's batch; yields `(row, token)` as
        the engine thread samples them, the EOS that ends a row included. Closing the generator (a user pressing Stop)
        cancels the rows still running; a row the engine ends otherwise (timeout, error, closing) raises
        GenerationError."""
        events: queue.Queue = queue.Queue()
        sequences: list[Sequence] = []
        try:
            for row, (prompt_ids, row_params) in enumerate(zip(prompts, params, strict=True)):
                sequences.append(self.submit(prompt_ids, row_params, _RowListener(row, events.put)))
            running = len(sequences)
            while running:
                row, token, reason, error = events.get()
                if reason is None:
                    yield row, token
                    continue
                running -= 1
                if reason not in FINISHED_OK:
                    raise GenerationError(f"generation {reason}" + (f": {error}" if error else ""))
                if sequences[row].eos_token is not None:
                    yield row, sequences[row].eos_token
        finally:
            for seq in sequences:
                seq.cancel()

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
            except Exception as exc:  # a failed decode step or merge ends the batch it ran on, never the engine
                for seq in self.running:
                    self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
                self.running, state, logits = [], None, None
        for seq in self.running:
            self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None,
                logprob: TokenLogprob | None = None) -> None:
        self.finished[reason] += 1
        seq.finish(reason, error, logprob)

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
            elif seq.params.max_tokens == 0 and seq.params.prompt_logprobs is None:
                self._finish(seq, "length")  # nothing to generate and nothing to report: no need to prefill
            else:
                new.append(seq)
        if not new:
            return state, logits
        admitted, new_state, new_logits = self._prefill(new)
        self.running += admitted
        return self._join(state, logits, new_state, new_logits)

    def _prefill(self, new: list[Sequence]):
        """(the sequences prefilled, their state, their logits) for `new`: those that asked for prompt logprobs one at a
        time with every position's logits, the others as one batch with the last position's only."""
        plain = [seq for seq in new if seq.params.prompt_logprobs is None]
        admitted, state, logits = self._prefill_batch(plain) if plain else ([], None, None)
        for seq in new:
            if seq.params.prompt_logprobs is not None:
                scored, seq_state, seq_logits = self._prefill_scored(seq)
                admitted += scored
                state, logits = self._join(state, logits, seq_state, seq_logits)
        return admitted, state, logits

    def _prefill_scored(self, seq: Sequence):
        """`_prefill` for one sequence that asked for its prompt's logprobs: they are reported to its listener."""
        try:
            state, every = self.runtime.prefill([seq.prompt_ids], all_logits=True)  # (1, len, vocab)
            scored = token_logprobs(every[0, :-1], seq.prompt_ids[1:], seq.params.prompt_logprobs)
        except Exception as exc:
            self._finish(seq, "error", f"prefill failed: {type(exc).__name__}: {exc}")
            return [], None, None
        seq.notify("on_prompt_logprobs", [None, *scored])
        return [seq], state, every[:, -1]

    def _prefill_batch(self, new: list[Sequence]):
        """`_prefill` for sequences prefilled as one batch; if that fails, one at a time, so a prompt that cannot be
        prefilled (or an out-of-memory batch) fails only the sequences it must."""
        try:
            return (new, *self.runtime.prefill([seq.prompt_ids for seq in new]))
        except Exception as exc:
            if len(new) == 1:
                self._finish(new[0], "error", f"prefill failed: {type(exc).__name__}: {exc}")
                return [], None, None
        admitted, state, logits = [], None, None
        for seq in new:
            alone, seq_state, seq_logits = self._prefill_batch([seq])
            admitted += alone
            state, logits = self._join(state, logits, seq_state, seq_logits)
        return admitted, state, logits

    def _join(self, state, logits, new_state, new_logits):
        """The state and logits of a batch's rows followed by another's; logits None: no rows (a single-sequence
        runtime's state is None even with one)."""
        if new_logits is None:
            return state, logits
        if logits is None:
            return new_state, new_logits
        return self.runtime.merge(state, new_state), torch.cat([logits, new_logits])

    def _step(self, state, logits):
        """Sample, stream and retire rows, then one decode step for the rows still running."""
        keep, tokens = [], []
        for i, (seq, row) in enumerate(zip(self.running, logits)):
            if seq.params.max_tokens == 0:  # prefilled for its prompt's logprobs only
                self._finish(seq, "length")
                continue
            try:
                token, logprob = seq.sample(row)
            except Exception as exc:  # settings or logits this row cannot be sampled with end this row only
                self._finish(seq, "error", f"sampling failed: {type(exc).__name__}: {exc}")
                continue
            if self._advance(seq, token, logprob):
                keep.append(i)
                tokens.append(token)
        if not keep:
            self.running = []
            return None, None
        if len(keep) < len(self.running):
            state = self.runtime.select(state, keep)
        self.running = [self.running[i] for i in keep]
        return state, self.runtime.decode(tokens, state)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Append `token` to `seq` and tell its listener (with the token's `logprob`, if asked); False once the
        sequence has finished."""
        if seq.cancelled.is_set():
            self._finish(seq, "cancelled")
            return False
        if time.monotonic() > seq.deadline:
            self._finish(seq, "timeout", error=f"generation exceeded the request timeout of {self.request_timeout:g}s")
            return False
        if token in self.runtime.eos_token_ids:
            seq.eos_token = token
            self._finish(seq, "stop", logprob=logprob)
            return False
        seq.generated.append(token)
        if seq.notify("on_token", logprob):  # the layer above saw a stop (e.g. a stop string in the text)
            self._finish(seq, "stop")
            return False
        if seq.mask is not None and seq.mask.complete:  # the grammar's text is whole (a JSON value closed)
            self._finish(seq, "stop")
            return False
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, "length")
            return False
        seq.notify("on_progress")
        return True
