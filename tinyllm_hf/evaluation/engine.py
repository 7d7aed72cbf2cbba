"""Model-agnostic scoring primitives: batched continuation log-likelihoods and batched greedy generation.

Log-likelihoods work with any `transformers` causal LM and tokenizer; generation with any runtime of
`inference/runtime.py` (a transformers model, a GGUF file, an ONNX / OpenVINO export). Batches are left-padded, with
position ids counted from the first real token, so a padded row gives the same numbers as the row alone (checked in
tests).
"""

import inspect

import torch
from tqdm.auto import tqdm

from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime, left_pad, stream_batch
from tinyllm_hf.rope_scaling import model_context

# Used when neither the model config nor the tokenizer states a context length.
FALLBACK_CONTEXT = 2048


def context_length(model, tokenizer=None) -> int:
    """The longest input the model takes: its config's position limit, or a smaller tokenizer limit."""
    config = model.config
    limits = [model_context(config) if getattr(config, "max_position_embeddings", None) else None]
    limits += [getattr(config, name, None) for name in ("n_positions", "seq_length")]
    # Tokenizers without a stated limit report a huge sentinel (int(1e30)); ignore anything absurd.
    tok_limit = getattr(tokenizer, "model_max_length", None)
    limits.append(tok_limit if tok_limit and tok_limit < 1_000_000 else None)
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else FALLBACK_CONTEXT


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own conventions apply (a BOS where it adds one), as for any sequence start.
    return tokenizer(text).input_ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness does: encode the whole text and take
    the tokens after the context's own encoding, so the continuation is tokenized in context. Trailing spaces of the
    context move to the continuation (a space belongs to the following token in byte-level BPE). When a token spans
    the boundary, the continuation is encoded on its own."""
    stripped = context.rstrip(" ")
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids) :]
    # A merge across the boundary ("春天" + "来了" -> one token): score the continuation's own tokens instead.
    return context_ids, tokenizer(continuation, add_special_tokens=False).input_ids


def transformers_model(runtime, purpose: str):
    """The transformers model and tokenizer of a `TransformersRuntime`, which log-likelihood scoring needs."""
    if not isinstance(runtime, TransformersRuntime):
        raise UsageError(f"{purpose} scores log-likelihoods with a transformers model; a GGUF file or an ONNX / "
                         f"OpenVINO export evaluates in gen mode (--mode gen, --tasks tasks) only")
    return runtime.model, runtime.tokenizer


def _accepts(model, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params


@torch.inference_mode()
def last_logprobs(model, rows: list[list[int]], pad: int, keep: int) -> torch.Tensor:
    """Log-probabilities (float32) at the last `keep` positions of each row: shape (batch, keep, vocab)."""
    device = next(model.parameters()).device
    input_ids, mask, positions = (t.to(device) for t in left_pad(rows, pad))
    kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    # Only the last positions are needed: models that support it skip the LM head (and its memory) everywhere else.
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits[:, -keep:, :]
    return torch.log_softmax(logits.float(), dim=-1)


def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
    max_length: int | None = None,
) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair.

    Requests whose model input is the same (same context, one-token continuations, as with answer letters) share one
    forward pass. Inputs longer than the context window keep their last `max_length` tokens.
    """
    max_length = max_length or context_length(model, tokenizer)
    pad = pad_id(tokenizer)
    targets, row_index, rows = [], [], {}
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise UsageError(f"continuation {continuation!r} encodes to no tokens after context ending {context[-20:]!r}")
        # The last continuation token is predicted, never fed in.
        model_input = tuple((context_ids + continuation_ids)[:-1][-max_length:])
        row_index.append(rows.setdefault(model_input, len(rows)))
        targets.append(continuation_ids)
    unique = list(rows)
    # The longest rows first: similar lengths share a batch (less padding) and memory errors show up at once.
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    need = [0] * len(unique)
    for r, t in zip(row_index, targets):
        need[r] = max(need[r], len(t))
    row_logprobs: dict[int, torch.Tensor] = {}
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="loglikelihood", disable=not progress, leave=False):
        ids = order[start : start + batch_size]
        keep = max(need[i] for i in ids)
        logprobs = last_logprobs(model, [list(unique[i]) for i in ids], pad, keep)
        for j, i in enumerate(ids):
            row_logprobs[i] = logprobs[j, keep - need[i] :].cpu()
    scores = []
    for r, t in zip(row_index, targets):
        lp = row_logprobs[r][-len(t) :]
        scores.append(lp[torch.arange(len(t)), torch.tensor(t)].sum().item())
    return scores


def greedy_generate(
    runtime,
    prompts: list[str],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy completions (special tokens dropped) of raw prompt strings on any runtime of `inference/runtime.py`,
    batched (up to the runtime's `max_batch_size`) with the runtime's own prefill, decode and greedy sampling.

    `max_new_tokens=None` lets each completion use the rest of the context after its prompt, as `tinyllm chat` does;
    a number is a fixed budget, and prompts are cut from the left to leave room for it."""
    context = runtime.context_length
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, not {max_new_tokens}; leave it out to use the rest of the "
                         f"context after each prompt")
    if max_new_tokens is not None and max_new_tokens >= context:
        raise UsageError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({context}); leave it "
                         f"out to use the rest of the context after each prompt")
    room = max_new_tokens or 1
    encoded = [runtime.encode(p)[-(context - room) :] for p in prompts]
    greedy = [SamplingParams(max_tokens=max_new_tokens or context - len(ids), temperature=0.0) for ids in encoded]
    # The longest prompts first: similar lengths share a batch (less padding) and memory errors show up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batch_size = min(batch_size, runtime.max_batch_size)
    new: list[list[int]] = [[] for _ in prompts]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids = order[start : start + batch_size]
        for row, token in stream_batch(runtime, [encoded[i] for i in ids], [greedy[i] for i in ids]):
            if token not in runtime.eos_token_ids:
                new[ids[row]].append(token)
    return [runtime.decode_text(tokens) for tokens in new]
