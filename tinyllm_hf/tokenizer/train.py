"""Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` that `AutoTokenizer` loads.

Byte-level BPE starts from all 256 bytes, so every UTF-8 string (rare characters, emoji, mixed scripts) encodes and
decodes back exactly; there is no unknown token. The pre-tokenizer is GPT-2's (`ByteLevel(use_regex=True)`): its
`\\p{L}+` already keeps runs of Chinese characters together and splits them from digits, punctuation and spaces, and
llama.cpp re-implements exactly this regex (GGUF pre-tokenizer `gpt-2`). Extra CJK splitting was measured and did not
pay off (docs/tokenizer.md, `bench/tokenizer.py pretokenizers`). There is no normalizer: text cleaning belongs to the corpus, and a normalizer would make
decode(encode(x)) differ from x.
"""

import hashlib
import heapq
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tinyllm_hf.errors import OutputExistsError, UsageError
from tinyllm_hf.runs import atomic_output
from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, RESPONSE_TEMPLATE, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

# Chosen by measurement on the default corpus (docs/tokenizer.md, `bench/tokenizer.py sweep`): 4096 needs 11.5% more
# tokens; beyond 8192 most added tokens are seen < 100 times in training and the embedding table dominates the small
# presets (already 46% of `16m` at 8192).
DEFAULT_VOCAB_SIZE = 8192
# Training text beyond this many characters is sampled down to it (`sample_texts`). The trainer's memory grows by
# ~167 bytes per character of text (GPT-2's regex keeps a whole Chinese clause as one pre-token, so nearly every
# clause is a new entry in its word counts): ~100 GB at 1B characters. At this cap the peak RSS stays ~4 GiB
# whatever the corpus size (measured: docs/tokenizer.md, "Training text cap").
DEFAULT_MAX_TRAIN_CHARS = 20_000_000
# The longest context of the standard presets; trainers take their sequence length from the model config.
DEFAULT_MODEL_MAX_LENGTH = 1024
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# The class name older transformers (4.x) can load; transformers 5 would write "TokenizersBackend".
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE with our pre-tokenizer and decoder (no normalizer, no post-processor)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def text_batches(texts: Iterable[str] | Iterable[list[str]], batch_size: int, seen: dict) -> Iterator[list[str]]:
    """Regroup strings (or lists of strings) into lists for the trainer, checking types and counting characters.

    The trainer pre-tokenizes each list in parallel in Rust, so lists beat single strings. Strings with lone
    surrogates (e.g. bytes decoded with `errors="surrogateescape"`) are not UTF-8 and are rejected here with a clear
    message instead of an opaque error from inside the trainer.
    """
    batch: list[str] = []
    for index, item in enumerate(texts):
        for text in item if isinstance(item, (list, tuple)) else [item]:
            if not isinstance(text, str):
                raise UsageError(f"tokenizer training texts must be str, got {type(text).__name__} at item {index}")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise UsageError(f"text at item {index} is not valid UTF-8 ({err.reason} at character {err.start})")
            seen["chars"] += len(text)
            batch.append(text)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _priority(text: str) -> int:
    """A pseudo-random rank that depends on the text only (not on its position, the run or the machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def sample_texts(batches: Iterable[list[str]], max_chars: int, seen: dict) -> list[str]:
    """At most `max_chars` characters of the documents in `batches`, read in one pass with memory bounded by the cap:
    the documents of lowest `_priority` (a bottom-k sample by hash), i.e. a deterministic uniform sample of the whole
    corpus, not its head; all of them, in order, when the corpus fits (a document longer than the cap never is).
    `seen["sampled_chars"]` counts what is kept."""
    heap: list[tuple[int, int, str]] = []  # (-priority, index, text): the root is the document dropped first
    kept_chars, index = 0, 0
    for batch in batches:
        for text in batch:
            index += 1
            if len(text) > max_chars:
                continue  # longer than the whole sample may be: it would push out everything else
            if kept_chars + len(text) > max_chars:
                priority = _priority(text)
                if not heap or priority >= -heap[0][0]:
                    continue  # ranks after everything kept: it would be the first dropped
                heapq.heappush(heap, (-priority, index, text))
                kept_chars += len(text)
                while kept_chars > max_chars:
                    kept_chars -= len(heapq.heappop(heap)[2])
            else:
                heapq.heappush(heap, (-_priority(text), index, text))
                kept_chars += len(text)
    seen["sampled_chars"] = kept_chars
    return [text for _, _, text in sorted(heap, key=lambda item: item[1])]


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    output_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    batch_size: int = 1000,
    overwrite: bool = False,
    max_train_chars: int | None = DEFAULT_MAX_TRAIN_CHARS,
    extra_texts: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and return it with our special tokens, chat template, EOS and pad set.

    Args:
        texts: strings, or lists of strings (batches, e.g. from `tinyllm_hf.data.corpus.iter_texts`).
        vocab_size: total size including the 256 byte tokens and the special tokens (ids 0..10, `SPECIAL_TOKENS`).
            Training stops early if no pair occurs `min_frequency` times any more; the result is then smaller.
        output_dir: if given, save there with `save_tokenizer` (atomic: no partial directory on failure).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: stored in tokenizer_config.json.
        batch_size: strings per list handed to the Rust trainer.
        overwrite: replace an existing non-empty `output_dir`.
        max_train_chars: train on a sample of at most this many characters of `texts`, spread over all of them
            (`sample_texts`), which bounds the trainer's memory; None: all of the text, however large.
        extra_texts: texts always trained on, outside the cap (the CLI's rendered tool-use conversations).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size!r}"
        )
    if max_train_chars is not None and (isinstance(max_train_chars, bool) or not isinstance(max_train_chars, int)
                                        or max_train_chars < 1):
        raise UsageError(f"max_train_chars must be a positive number of characters or None, got {max_train_chars!r}")
    if output_dir is not None:
        check_output_dir(Path(output_dir), overwrite)
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"chars": 0}
    batches = text_batches(texts, batch_size, seen)
    if max_train_chars is not None:
        sample = sample_texts(batches, max_train_chars, seen)
        if seen["chars"] > max_train_chars:
            logger.warning(f"training the tokenizer on {seen['sampled_chars']:,} of the corpus's {seen['chars']:,} "
                           f"characters (max_train_chars {max_train_chars:,}), sampled across the whole corpus")
        batches = (sample[i:i + batch_size] for i in range(0, len(sample), batch_size))
    if extra_texts:
        batches = itertools.chain(batches, text_batches(extra_texts, batch_size, {"chars": 0}))
    tokenizer.train_from_iterator(batches, trainer=trainer)
    if seen["chars"] == 0:
        raise UsageError("the training corpus is empty: no characters to learn a tokenizer from")
    fast = wrap_tokenizer(tokenizer, model_max_length)
    if output_dir is not None:
        save_tokenizer(fast, output_dir, overwrite=overwrite)
    return fast


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` that contains `SPECIAL_TOKENS` as a transformers tokenizer with our chat format."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE,
    )


def check_output_dir(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output path {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {target} is not empty; pass overwrite=True (--overwrite) to replace it")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`save_pretrained` into `output_dir` atomically, with a tokenizer_config.json that transformers 4.x also loads."""
    check_output_dir(Path(output_dir), overwrite)
    with atomic_output(output_dir) as staging:
        tokenizer.save_pretrained(staging)
        write_portable_tokenizer_config(staging)
    return Path(output_dir)


def write_portable_tokenizer_config(directory: str | os.PathLike) -> None:
    """Rewrite tokenizer_config.json so transformers 4.x loads it too: `tokenizer_class` PreTrainedTokenizerFast
    (transformers 5 writes TokenizersBackend, unknown to 4.x) and the chat template inline (4.x releases before
    chat_template.jinja support read it only from there)."""
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    template_path = Path(directory) / "chat_template.jinja"
    if template_path.exists():
        config["chat_template"] = template_path.read_text(encoding="utf-8")
        template_path.unlink()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
