"""Model-agnostic scoring primitives: batched continuation log-likelihoods and batched greedy generation.

Works with any `transformers` causal LM and tokenizer. Batches are left-padded, with position ids counted from the
first real token, so a padded row gives the same numbers as the row alone (checked in tests).
"""

import inspect

import torch
from tqdm.auto import tqdm

from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.runtime import left_pad

# Used when neither the model config nor the tokenizer states a context length.
FALLBACK_CONTEXT = 2048


def context_length(model, tokenizer=None) -> int:
    """The longest input the model takes: its config's position limit, or a smaller tokenizer limit."""
    limits = [getattr(model.config, name, None) for name in ("max_position_embeddings", "n_positions", "seq_length")]
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


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    max_length: int | None = None,
) -> list[str]:
    """Greedy completions (special tokens dropped) of raw prompt strings, batched with left padding."""
    max_length = max_length or context_length(model, tokenizer)
    if max_new_tokens >= max_length:
        raise UsageError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({max_length})")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    encoded = [encode(tokenizer, p)[-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids = order[start : start + batch_size]
        input_ids, mask, _ = left_pad([encoded[i] for i in ids], pad)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for j, i in enumerate(ids):
            outputs[i] = tokenizer.decode(generated[j, input_ids.shape[1] :], skip_special_tokens=True)
    return outputs
