"""Perplexity and bits per character on a set of texts, with a sliding window inside the model's context.

Each text is scored on its own, preceded by the tokenizer's BOS token (or EOS, the document separator of BOS-less
tokenizers such as ours), so every token of the text is predicted, the first one included. Texts longer than the
context are scored in windows of `max_length` tokens that advance by `stride`: each token is scored once, with at least
`max_length - stride` tokens of context once the first window is done (the transformers perplexity recipe).

Bits per character (and per UTF-8 byte) do not depend on the tokenizer, so they compare models with different
vocabularies; perplexity per token does not.
"""

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.evaluation.engine import context_length, last_logprobs, pad_id


def load_texts(source: str | Path | list[str] | None = None) -> list[str]:
    """Texts to score: a list as is; a .txt file (one document per non-empty line) or .jsonl file (field `text`);
    None or "default": the validation split of the embedded default corpus."""
    if isinstance(source, list):
        return source
    if source is None or str(source) == "default":
        from tinyllm_hf.data.corpus import load_corpus

        return list(load_corpus("default", split="validation")["text"])
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise UsageError(f"{path}:{n}: a JSON line without a 'text' field")
                texts.append(record["text"])
        return texts
    if path.suffix == ".txt":
        return [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    raise UsageError(f"{path}: expected a .txt (one document per line) or .jsonl (field 'text') file")


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for a sequence of n_tokens: the model reads tokens[begin:end] and the last n_scored of
    them are scored. Token 0 (the BOS/EOS prefix) is context only; every later token is scored exactly once."""
    # A window must overlap the scored part by a token at least: its first token has no prediction of its own.
    if not 0 < stride < max_length:
        raise UsageError(f"stride must be in 1..{max_length - 1} (below max_length), not {stride}")
    spans, begin, scored_from = [], 0, 1
    while True:
        end = min(begin + max_length, n_tokens)
        spans.append((begin, end, end - scored_from))
        if end == n_tokens:
            return spans
        scored_from, begin = end, begin + stride


def score_windows(logprobs, pieces: list[tuple[list[int], int]], batch_size: int = 4, progress: bool = False):
    """(summed negative log-likelihood, tokens scored) of `pieces`: (token ids the model reads, how many of their
    trailing tokens are scored). `logprobs(rows, keep)` gives log-probabilities (batch, keep, vocab) at the last
    `keep` positions of each row (e.g. `engine.last_logprobs`, or a runtime's `logits`)."""
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    nll, n_tokens = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = [pieces[i] for i in order[start : start + batch_size]]
        keep = max(k for _, k in batch) + 1
        logprobs_batch = logprobs([row for row, _ in batch], keep)
        for j, (row, k) in enumerate(batch):
            # Positions keep-k-1 .. keep-2 (of the kept tail) predict the row's last k tokens.
            predicted = logprobs_batch[j, keep - k - 1 : keep - 1]
            nll -= predicted[torch.arange(k), torch.tensor(row[-k:], device=predicted.device)].sum().item()
            n_tokens += k
    return nll, n_tokens


def perplexity(
    model,
    tokenizer,
    texts: list[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Summed negative log-likelihood of `texts` as perplexity per token, bits per character and bits per byte."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise UsageError("perplexity needs a tokenizer with a BOS or EOS token to start each text")
    max_length = max_length or context_length(model, tokenizer)
    stride = stride or max(1, max_length // 2)
    pieces = []  # (token ids the model reads, how many trailing tokens are scored)
    n_chars = n_bytes = 0
    for text in texts:
        ids = [prefix] + tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) < 2:
            continue
        n_chars += len(text)
        n_bytes += len(text.encode("utf-8"))
        pieces += [(ids[b:e], k) for b, e, k in windows(len(ids), max_length, stride)]
    if not pieces:
        raise UsageError("no text to score (all texts empty)")
    pad = pad_id(tokenizer)
    nll, n_tokens = score_windows(lambda rows, keep: last_logprobs(model, rows, pad, keep), pieces, batch_size, progress)
    return {
        "n_texts": len(texts),
        "n_tokens": n_tokens,
        "n_chars": n_chars,
        "nll_per_token": nll / n_tokens,
        "perplexity": math.exp(nll / n_tokens),
        "bits_per_char": nll / math.log(2) / n_chars,
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "max_length": max_length,
        "stride": stride,
    }
