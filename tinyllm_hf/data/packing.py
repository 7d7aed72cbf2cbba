"""Pretraining data: documents -> token ids + EOS -> fixed-length blocks, with no padding anywhere.

Each batch of documents is tokenized, every document gets the tokenizer's EOS appended (the document separator; there
is no BOS), the ids are concatenated and cut into blocks of `block_size`. The tail of a batch that does not fill a
block is dropped, at most `block_size - 1` tokens per `PACK_BATCH_DOCS` documents (`packing_stats` measures it).

Map-style datasets are processed with `datasets.map` over `num_proc` processes and cached on disk under a fingerprint
of the input dataset, the tokenizer's content and the block size, so a second run (or the other ranks of a distributed
run) reuses the blocks. Their order is shuffled by the Trainer's sampler (seeded by `data_seed`/`seed`, reproduced on
resume). Iterable (streaming) datasets are tokenized lazily, for corpora larger than memory or disk, and shuffled in a
buffer with a fixed seed.
"""

import hashlib
import math
from itertools import chain

import datasets
import numpy as np
import torch

from tinyllm_hf.errors import UsageError

PACK_BATCH_DOCS = 2000  # documents packed together; bigger batches drop a smaller share of tail tokens
MIN_DOCS_PER_PROCESS = 2 * PACK_BATCH_DOCS  # below this, starting worker processes costs more than it saves


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what the tokenizer does (its serialised pipeline and vocabulary, and its EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    return hashlib.sha256(f"{content}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UsageError(
            "the tokenizer has no EOS token; pretraining appends it to every document as the separator "
            "(tinyllm tokenizers use <|endoftext|>)"
        )
    return tokenizer.eos_token_id


def pack_batch(batch: dict, tokenizer, block_size: int, text_field: str = "text") -> dict:
    """One `datasets.map` batch: documents -> {"input_ids": (n_blocks, block_size) int32 array}."""
    eos = _eos_id(tokenizer)
    # verbose=False: documents longer than model_max_length are expected here, they get cut into blocks anyway.
    docs = tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]
    total = sum(len(doc) + 1 for doc in docs)
    flat = np.fromiter(chain.from_iterable(doc + [eos] for doc in docs), dtype=np.int32, count=total)
    n_blocks = total // block_size
    return {"input_ids": flat[: n_blocks * block_size].reshape(n_blocks, block_size)}


def block_features(block_size: int) -> datasets.Features:
    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=block_size)})


def pack_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    tokenizer,
    block_size: int,
    text_field: str = "text",
    num_proc: int | None = None,
    seed: int = 42,
    shuffle_buffer_size: int = 10_000,
):
    """Packed blocks of `block_size` token ids from a dataset of documents (column `text_field`).

    Map-style: tokenized with `num_proc` processes and cached; returned unshuffled (the Trainer's sampler shuffles).
    Iterable: tokenized lazily and shuffled in a buffer of `shuffle_buffer_size` blocks with `seed`.
    """
    if block_size < 2:
        raise UsageError(f"block_size must be at least 2, got {block_size}")
    _eos_id(tokenizer)
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise UsageError(f"the dataset has no column {text_field!r} (columns: {', '.join(columns)})")
    kwargs = dict(
        batched=True,
        batch_size=PACK_BATCH_DOCS,
        fn_kwargs={"tokenizer": tokenizer, "block_size": block_size, "text_field": text_field},
        features=block_features(block_size),
    )
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.select_columns([text_field])
        packed = dataset.map(pack_batch, remove_columns=[text_field], **kwargs)
        return packed.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if num_proc is not None:
        num_proc = min(num_proc, len(dataset) // MIN_DOCS_PER_PROCESS) or None
    fingerprint = hashlib.sha256(
        f"pack|{dataset._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{block_size}|{text_field}|{PACK_BATCH_DOCS}".encode()
    ).hexdigest()[:32]
    return dataset.map(
        pack_batch,
        remove_columns=columns,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc=f"Packing into blocks of {block_size} tokens",
        **kwargs,
    )


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; the labels are the inputs (the model shifts them), every position carries loss."""
    input_ids = torch.as_tensor(np.stack([np.asarray(e["input_ids"]) for e in examples]), dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def token_counts(dataset: datasets.Dataset, vocab_size: int, batch_size: int = 1024) -> np.ndarray:
    """How often every token id occurs in a packed (map-style) dataset."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in dataset.with_format("numpy").iter(batch_size=batch_size):
        counts += np.bincount(batch["input_ids"].ravel(), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_entropy(dataset: datasets.Dataset, vocab_size: int) -> float:
    """Entropy in nats per token of the token frequencies of `dataset`: the loss of the best model that ignores
    context. A language model's validation loss must go clearly below it to have learnt anything beyond frequencies."""
    counts = token_counts(dataset, vocab_size)
    if counts.sum() == 0:
        raise UsageError("the dataset has no tokens")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def packing_stats(documents: datasets.Dataset, packed: datasets.Dataset, tokenizer, text_field: str = "text") -> dict:
    """Tokens in the documents (with EOS) vs tokens kept in blocks; for reports and tests (tokenizes again)."""
    total = 0
    for batch in documents.iter(batch_size=PACK_BATCH_DOCS):
        ids = tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]
        total += sum(len(doc) + 1 for doc in ids)
    kept = len(packed) * len(packed[0]["input_ids"]) if len(packed) else 0
    return {"tokens": total, "packed_tokens": kept, "dropped_fraction": 1 - kept / total if total else math.nan}
