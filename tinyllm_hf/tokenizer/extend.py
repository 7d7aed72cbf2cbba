"""Add Chinese vocabulary learned from a corpus to an existing BPE tokenizer, and resize a model's embeddings to match.

How: BPE training continues from where the base tokenizer stops. The corpus is encoded with the base tokenizer; each
base token becomes one private-use character and the Rust BPE trainer learns merges over those, so every new token is
a concatenation of base tokens that actually sit next to each other after the base merges. The new merges are
appended after all base merges (so they rank lower) and the new tokens get ids from `len(base)` on.

What this guarantees:
- every base token (added/special tokens included) keeps its string and id;
- every text decodes to the same string as before, and the new token sequence is the old one with some neighbours
  fused: BPE applies merges by rank, so all base merges run first exactly as before; a text in which no new pair
  occurs (English text, for an English base) gets exactly the same ids as before.

Base tokenizers supported: any `tokenizers` BPE model, i.e. byte-level BPE (GPT-2, Llama 3, Qwen, ours) and the
SentencePiece-style BPE with byte fallback that Llama 2 / Mistral fast tokenizers use. For the latter, Chinese
characters missing from the base vocabulary (encoded as 3 byte tokens) are first added as single-character tokens,
most frequent first; merges never cross a `▁` word start or a byte-fallback token, as in SentencePiece. SentencePiece
*Unigram* tokenizers (T5, ALBERT, XLM-R) are refused: a Unigram model picks the segmentation with the best total
score, so new pieces need scores commensurate with the old ones; there is no exact way to keep old segmentations.
The saved result is a `tokenizers`-only `PreTrainedTokenizerFast` (a slow SentencePiece `tokenizer.model`, which
could not contain the new merges, is not written).
"""

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.model_utils import get_model, get_tokenizer
from tinyllm_hf.runs import atomic_output
from tinyllm_hf.tokenizer.train import (
    check_output_dir,
    save_tokenizer,
    text_batches,
    write_portable_tokenizer_config,
)

# Private-use code points stand for base tokens during training: never produced by normal text processing and
# never whitespace, so the trainer's WhitespaceSplit keeps each encoded word intact.
_PRIVATE_USE = [range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE)]
_PRIVATE_USE_SIZE = sum(len(block) for block in _PRIVATE_USE)
_SENTENCEPIECE_SPACE = "\u2581"


def _private_char(index: int) -> str:
    for block in _PRIVATE_USE:
        if index < len(block):
            return chr(block[index])
        index -= len(block)
    raise UsageError(f"corpus uses more than {_PRIVATE_USE_SIZE} distinct base tokens; pass a smaller sample")


def load_base_tokenizer(base: str | os.PathLike | PreTrainedTokenizerBase,
                        trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory, a Hub name, or an already loaded tokenizer; code shipped with it runs
    only with `trust_remote_code`."""
    try:
        if isinstance(base, PreTrainedTokenizerBase):
            tokenizer = base
        else:
            tokenizer = get_tokenizer(str(base), trust_remote_code=trust_remote_code)
    except OSError as err:  # transformers' "not a local folder and not a valid model identifier ..."
        raise MissingFileError(f"cannot load the base tokenizer {str(base)!r}: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"base tokenizer {base!r} is not a fast (tokenizers-backed) tokenizer; convert it first")
    return tokenizer


def _is_byte_level(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _check_extensible(tokenizer_json: dict, name: str) -> None:
    model = tokenizer_json["model"]
    if model["type"] != "BPE":
        raise UsageError(
            f"cannot extend {name}: its model is {model['type']}, only BPE tokenizers can be extended with ids and "
            "segmentations kept stable (see tinyllm_hf/tokenizer/extend.py)"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UsageError(f"cannot extend {name}: BPE with subword prefixes/suffixes is not supported")


def _missing_characters(texts: list[str], vocab: dict, min_frequency: int, limit: int) -> list[str]:
    """Characters (not whitespace) that the base model lacks, seen at least `min_frequency` times, most frequent first."""
    counts = Counter()
    for text in texts:
        counts.update(text)
    missing = [c for c, n in counts.most_common() if n >= min_frequency and c not in vocab and not c.isspace()]
    return missing[:limit]


def _encoded_words(backend: Tokenizer, texts: list[str], batch_size: int = 1000) -> tuple[list[str], dict[str, int]]:
    """The corpus as base-token words for the trainer: each distinct base id becomes one private-use character, words
    are joined by spaces. Words break where the base pre-tokenizer splits, before a `▁` word start, and around
    special, unknown and byte-fallback tokens (which no new token may contain). Returns (lines, base id of each
    private-use character)."""
    model = backend.model
    barrier = set(backend.get_added_tokens_decoder())
    if model.byte_fallback:
        barrier.update(i for token, i in backend.get_vocab(with_added_tokens=False).items()
                       if len(token) == 6 and token.startswith("<0x") and token.endswith(">"))
    if model.unk_token:
        barrier.add(backend.token_to_id(model.unk_token))
    char_of: dict[int, str] = {}
    lines = []
    for start in range(0, len(texts), batch_size):
        for encoding in backend.encode_batch(texts[start:start + batch_size], add_special_tokens=False):
            words, current, previous_word = [], [], None
            for token_id, token, word in zip(encoding.ids, encoding.tokens, encoding.word_ids):
                if token_id in barrier or word != previous_word or token.startswith(_SENTENCEPIECE_SPACE):
                    if current:
                        words.append("".join(current))
                    current = []
                previous_word = word
                if token_id in barrier:
                    continue
                if token_id not in char_of:
                    char_of[token_id] = _private_char(len(char_of))
                current.append(char_of[token_id])
            if current:
                words.append("".join(current))
            lines.append(" ".join(words))
    return lines, {c: i for i, c in char_of.items()}


def _learn_merges(backend: Tokenizer, texts: list[str], num_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """BPE merges on top of the base segmentation, as pairs of token strings, best first."""
    lines, id_of_char = _encoded_words(backend, texts)
    alphabet = sorted(id_of_char)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    learner.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)), trainer=trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]

    def token_string(private: str) -> str:
        return "".join(backend.id_to_token(id_of_char[c]) for c in private)

    return [(token_string(left), token_string(right)) for left, right in merges]


def extend_tokenizer(
    base: str | os.PathLike | PreTrainedTokenizerBase,
    texts: Iterable[str] | Iterable[list[str]],
    num_new_tokens: int | None = None,
    target_vocab_size: int | None = None,
    output_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Return `base` with up to `num_new_tokens` new tokens (or up to `target_vocab_size` in total) learned from `texts`.

    Fewer tokens are added when the corpus has no more pairs occurring `min_frequency` times. The corpus is held in
    memory (read twice for SentencePiece-style bases: character counts, then encoding): pass a sample of a large one.
    If `output_dir` is given, the tokenizer is saved there atomically.
    """
    tokenizer = load_base_tokenizer(base)
    old_size = len(tokenizer)
    if (num_new_tokens is None) == (target_vocab_size is None):
        raise UsageError("give exactly one of num_new_tokens and target_vocab_size")
    if num_new_tokens is None:
        num_new_tokens = target_vocab_size - old_size
    if not isinstance(num_new_tokens, int) or num_new_tokens <= 0:
        raise UsageError(
            f"nothing to add: base tokenizer has {old_size} tokens, asked for {num_new_tokens!r} new ones"
            + (f" (target_vocab_size {target_vocab_size})" if target_vocab_size is not None else "")
        )
    corpus = [text for batch in text_batches(texts, 1000, {"chars": 0}) for text in batch]
    if not any(corpus):
        raise UsageError("the corpus for tokenizer extension is empty")

    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_extensible(tokenizer_json, str(getattr(tokenizer, "name_or_path", base)))
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"]["merges"]]
    next_id = old_size
    new_tokens: list[str] = []

    def add(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        new_tokens.append(token)
        next_id += 1

    # Byte-level bases build characters from byte merges; other bases need the characters in the vocabulary first.
    if not _is_byte_level(tokenizer_json):
        for char in _missing_characters(corpus, vocab, min_frequency, num_new_tokens):
            add(char)
    tokenizer_json["model"]["merges"] = [list(m) for m in merges]
    base_with_chars = Tokenizer.from_str(json.dumps(tokenizer_json))

    remaining = num_new_tokens - len(new_tokens)
    if remaining > 0:
        known_merges = set(merges)
        # Some learned merges produce strings the base already has (reached by another merge path); they cost no id,
        # so learn a few more merges than ids still wanted, then stop at the wanted count.
        for left, right in _learn_merges(base_with_chars, corpus, remaining + remaining // 4 + 8, min_frequency):
            if len(new_tokens) == num_new_tokens:
                break
            if (left, right) in known_merges:
                continue
            merges.append((left, right))
            known_merges.add((left, right))
            if left + right not in vocab:
                add(left + right)
    tokenizer_json["model"]["merges"] = [list(m) for m in merges]

    extended = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tokenizer_json)),
        model_max_length=tokenizer.model_max_length,
        chat_template=tokenizer.chat_template,
        **{key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)},
    )
    if output_dir is not None:
        save_tokenizer(extended, output_dir, overwrite=overwrite)
    return extended


def extend_tokenizer_and_model(
    base: str,
    texts: Iterable[str],
    *,
    output_dir: str | os.PathLike,
    model: str | None = None,
    model_output: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    **extend_kwargs,
):
    """`tinyllm tokenizer extend`: extend `base` into `output_dir` and, given `model`, resize that model's embeddings to
    the new tokenizer and save both to `model_output`. Returns (base tokenizer, extended tokenizer, resized model or
    None); `extend_kwargs` go to `extend_tokenizer`. Code shipped with `base` or `model` runs only with
    `trust_remote_code`."""
    if model_output is not None:
        # Checked before the (slow) extension so a bad path fails fast.
        check_output_dir(Path(model_output), overwrite)
    base_tokenizer = load_base_tokenizer(base, trust_remote_code)
    extended = extend_tokenizer(base_tokenizer, texts, output_dir=output_dir, overwrite=overwrite, **extend_kwargs)
    if model is None:
        return base_tokenizer, extended, None
    try:
        loaded = get_model(model, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise MissingFileError(f"cannot load the model {model!r} to resize: {err}") from err
    resized = resize_model_embeddings(loaded, base_tokenizer, extended)
    with atomic_output(model_output) as staging:  # its folder was checked before the extension
        resized.save_pretrained(staging)
        extended.save_pretrained(staging)
        write_portable_tokenizer_config(staging)
    return base_tokenizer, extended, resized


def new_token_pieces(old_tokenizer: PreTrainedTokenizerFast, new_tokenizer: PreTrainedTokenizerFast) -> dict[int, list[int]]:
    """For each id the new tokenizer adds, the old ids it replaces: the old model's segmentation of the token string
    (byte-fallback bytes for a newly added character)."""
    old_model = old_tokenizer.backend_tokenizer.model
    pieces = {}
    for new_id in range(len(old_tokenizer), len(new_tokenizer)):
        token = new_tokenizer.convert_ids_to_tokens(new_id)
        pieces[new_id] = [piece.id for piece in old_model.tokenize(token)]
    return pieces


def resize_model_embeddings(model, old_tokenizer, new_tokenizer):
    """Resize `model`'s input (and untied output) embeddings to `len(new_tokenizer)` rows, in place.

    Old rows are kept; each new row is the mean of the old rows of the pieces the new token replaces, in both the
    input embedding and an untied output embedding, so the extended model's predictions start close to the base
    model's. Returns the model.
    """
    import torch  # here, so that importing the tokenizer package does not import torch

    old_tokenizer = load_base_tokenizer(old_tokenizer)
    new_tokenizer = load_base_tokenizer(new_tokenizer)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < len(old_tokenizer):
        raise UsageError(f"model has {old_rows} embedding rows but the old tokenizer has {len(old_tokenizer)} tokens")
    pieces = new_token_pieces(old_tokenizer, new_tokenizer)
    model.resize_token_embeddings(max(old_rows, len(new_tokenizer)), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            for new_id, old_ids in pieces.items():
                weight[new_id] = weight[old_ids].mean(dim=0)
    return model
