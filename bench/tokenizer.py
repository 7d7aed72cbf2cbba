"""Tokenizer benchmarks on the embedded default corpus (train split to learn, validation split to measure).

    python bench/tokenizer.py compare [--vocab-size 8192] [--max-train-chars 3000000]
        training time and held-out chars/token of ours vs SentencePiece BPE and unigram at the same vocabulary size on
        the same text, and batched encode throughput; prints a section for docs/benchmarks.md.
    python bench/tokenizer.py sweep [--sizes 4096,8192,...]
        held-out chars/token per vocabulary size and the embedding share of the tiny/16m/92m presets (the table in
        docs/tokenizer.md). One BPE is trained at the largest size: BPE merges are learned greedily in order, so the
        tokenizer of a smaller size is exactly its first merges (checked by `--check-prefix`).
    python bench/tokenizer.py pretokenizers
        our GPT-2 regex pre-tokenizer against CJK-splitting variants: training time and chars/token.
    python bench/tokenizer.py cap [--caps 4000000,2000000,1000000]
        held-out chars/token when training on a `--max-train-chars` sample of the train split vs on all of it.

SentencePiece runs with identity normalisation (its default nmt_nfkc rewrites full-width forms and whitespace, so it
would tokenize different text), byte fallback (lossless like ours), no dummy prefix, whitespace kept, character
coverage 0.995. Times are
wall clock and process CPU time (all threads); on a shared machine CPU time is the steadier number.
"""

import argparse
import datetime
import io
import json
import os
import platform
import resource
import time
from collections import Counter

from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers

from tinyllm_hf.data.corpus import load_corpus
from tinyllm_hf.tokenizer.chat_template import SPECIAL_TOKENS
from tinyllm_hf.tokenizer.train import MIN_VOCAB_SIZE, new_byte_level_bpe, sample_texts, train_tokenizer

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def corpus_texts(max_train_chars: int | None) -> tuple[list[str], list[str], str]:
    """Train texts (every k-th document when capped, so every source is represented), the whole validation split,
    and a description of both."""
    train = list(load_corpus("default", split="train")["text"])
    validation = list(load_corpus("default", split="validation")["text"])
    total, stride = sum(map(len, train)), 1
    if max_train_chars and total > max_train_chars:
        stride = -(-total // max_train_chars)
        train = train[::stride]
    subset = f"every {stride}th document, " if stride > 1 else ""
    description = (f"default corpus train split ({subset}{sum(map(len, train)):,} of {total:,} chars); "
                   f"chars/token on the whole validation split ({sum(map(len, validation)):,} chars)")
    print(description, flush=True)
    return train, validation, description


def chars_per_token(texts: list[str], token_counts: list[int]) -> float:
    return sum(map(len, texts)) / sum(token_counts)


def ours_counts(backend: Tokenizer, texts: list[str]) -> list[int]:
    return [len(encoding.ids) for encoding in backend.encode_batch(texts, add_special_tokens=False)]


# SentencePiece adds every character up to this coverage as a piece before any merge; its CJK recommendation 0.9995
# needs ~9,300 characters on this corpus, more than an 8k vocabulary. Rarer characters fall back to bytes, as in ours.
SENTENCEPIECE_COVERAGE = 0.995


def train_sentencepiece(texts: list[str], vocab_size: int, model_type: str):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, character_coverage=SENTENCEPIECE_COVERAGE, max_sentence_length=1 << 20,
        num_threads=2, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def throughput(encode, texts: list[str], min_seconds: float = 3.0) -> tuple[float, float]:
    """Characters per second of `encode(texts)` per wall-clock second and per CPU second (all threads), repeated
    until `min_seconds` have passed. On a busy machine the process gets a fraction of a core: compare CPU rates."""
    chars, rounds = sum(map(len, texts)), 0
    with Timer() as timer:
        start = time.perf_counter()
        while time.perf_counter() - start < min_seconds or rounds == 0:
            encode(texts)
            rounds += 1
    return rounds * chars / timer.wall, rounds * chars / timer.cpu


def compare(args) -> str:
    train, validation, description = corpus_texts(args.max_train_chars)
    rows = []
    with Timer() as timer:
        ours = train_tokenizer(train, vocab_size=args.vocab_size)
    backend = ours.backend_tokenizer
    lossless = all(backend.decode(backend.encode(t).ids) == t for t in validation)
    rows.append(dict(name="ours: byte-level BPE (tokenizers)", wall=timer.wall, cpu=timer.cpu,
                     cpt=chars_per_token(validation, ours_counts(backend, validation)), lossless=lossless,
                     speed=throughput(lambda texts: backend.encode_batch(texts, add_special_tokens=False), validation),
                     speed_hf=throughput(lambda texts: ours(texts, add_special_tokens=False), validation)))
    for model_type in ("bpe", "unigram"):
        with Timer() as timer:
            sp = train_sentencepiece(train, args.vocab_size, model_type)
        ids = sp.encode(validation)
        rows.append(dict(name=f"SentencePiece {model_type}", wall=timer.wall, cpu=timer.cpu,
                         cpt=chars_per_token(validation, [len(i) for i in ids]),
                         lossless=all(sp.decode(i) == t for i, t in zip(ids, validation)),
                         speed=throughput(lambda texts: sp.encode(texts, num_threads=2), validation), speed_hf=None))
        print(rows[-1], flush=True)

    ours_row = rows[0]
    lines = [
        f"### Tokenizer training and encoding ({datetime.date.today().isoformat()}, `python bench/tokenizer.py compare`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (noisy: CPU time is the "
        f"steadier figure). Text: {description}. Vocabulary {args.vocab_size:,} for all; SentencePiece with identity "
        f"normalisation, byte fallback and character coverage {SENTENCEPIECE_COVERAGE}.",
        "",
        "| tokenizer | train wall s | train CPU s | held-out chars/token | lossless "
        "| batched encode, chars per CPU s (per wall s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = f"{row['speed'][1]:,.0f} ({row['speed'][0]:,.0f})"
        if row["speed_hf"]:
            speed += f"; via transformers {row['speed_hf'][1]:,.0f} ({row['speed_hf'][0]:,.0f})"
        lines.append(f"| {row['name']} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['cpt']:.3f} | {row['lossless']} "
                     f"| {speed} |")
    lines.append("")
    for row in rows[1:]:
        lines.append(
            f"- ours vs {row['name']}: compression x{ours_row['cpt'] / row['cpt']:.3f}, training CPU time "
            f"x{ours_row['cpu'] / row['cpu']:.2f} (wall x{ours_row['wall'] / row['wall']:.2f}), encode speed per CPU "
            f"second x{ours_row['speed'][1] / row['speed'][1]:.2f}"
        )
    return "\n".join(lines) + "\n"


def truncated(backend: Tokenizer, vocab_size: int) -> Tokenizer:
    """The BPE of `vocab_size` tokens that training at a larger size passes through: its first merges."""
    data = json.loads(backend.to_str())
    model = data["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < vocab_size}
    model["merges"] = model["merges"][: vocab_size - MIN_VOCAB_SIZE]
    return Tokenizer.from_str(json.dumps(data))


def sweep(args) -> str:
    from tinyllm_hf.modeling.presets import preset_parameter_counts

    sizes = sorted(int(s) for s in args.sizes.split(","))
    train, validation, description = corpus_texts(args.max_train_chars)
    if args.trained:
        largest = Tokenizer.from_file(args.trained)
        if largest.get_vocab_size() != sizes[-1]:
            raise ValueError(f"{args.trained} has {largest.get_vocab_size()} tokens, the largest size is {sizes[-1]}")
    else:
        with Timer() as timer:
            largest = train_tokenizer(train, vocab_size=sizes[-1]).backend_tokenizer
        print(f"trained {sizes[-1]} in {timer.wall:.1f}s wall / {timer.cpu:.1f}s CPU")
    if args.check_prefix:
        direct = train_tokenizer(train, vocab_size=sizes[0]).backend_tokenizer
        assert direct.to_str() == truncated(largest, sizes[0]).to_str(), "prefix property does not hold"
        print(f"checked: training at {sizes[0]} gives exactly the first merges of training at {sizes[-1]}")
    presets = ("tiny", "16m", "92m")
    lines = [
        "| vocab | held-out chars/token | tokens vs largest | tokens seen < 100 times in train | "
        + " | ".join(f"`{p}` params (embedding share)" for p in presets) + " |",
        "|---|---|---|---|" + "---|" * len(presets),
    ]
    tokenizers = {size: truncated(largest, size) for size in sizes}
    cpt = {size: chars_per_token(validation, ours_counts(tokenizer, validation)) for size, tokenizer in tokenizers.items()}
    for size, tokenizer in tokenizers.items():
        uses = Counter(i for encoding in tokenizer.encode_batch(train, add_special_tokens=False) for i in encoding.ids)
        rare = sum(uses[i] < 100 for i in range(len(SPECIAL_TOKENS), size))
        counts = preset_parameter_counts(size)
        cells = [f"{counts[p][0] / 1e6:.2f}M ({100 * counts[p][1] / counts[p][0]:.0f}%)" for p in presets]
        lines.append(f"| {size:,} | {cpt[size]:.3f} | {cpt[sizes[-1]] / cpt[size]:.2f}x | "
                     f"{100 * rare / (size - len(SPECIAL_TOKENS)):.0f}% | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return f"Text: {description}.\n\n" + "\n".join(lines) + "\n"


PRETOKENIZER_VARIANTS = {
    "GPT-2 regex (ours)": None,
    "Han runs split from other letters": r"\p{Han}+|[^\s\p{Han}\p{N}\p{P}\p{S}]+",
    "Han runs cut to <= 16 chars": r"\p{Han}{1,16}",
    "Han runs cut to <= 8 chars": r"\p{Han}{1,8}",
    "Han runs cut to <= 4 chars": r"\p{Han}{1,4}",
}


def pretokenizers(args) -> str:
    train, validation, description = corpus_texts(args.max_train_chars)
    lines = [f"Text: {description}; vocabulary {args.vocab_size:,}.", "", "| pre-tokenizer | train wall s | train CPU s | held-out chars/token |", "|---|---|---|---|"]
    for name, pattern in PRETOKENIZER_VARIANTS.items():
        backend = new_byte_level_bpe()
        if pattern is not None:
            # Split the pattern's matches off first; the ByteLevel regex then splits the rest as usual.
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(pattern), "isolated"), backend.pre_tokenizer])
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        with Timer() as timer:
            backend.train_from_iterator((train[i:i + 1000] for i in range(0, len(train), 1000)), trainer=trainer)
        cpt = chars_per_token(validation, ours_counts(backend, validation))
        lines.append(f"| {name} | {timer.wall:.1f} | {timer.cpu:.1f} | {cpt:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def cap(args) -> str:
    """Held-out chars/token of tokenizers trained on the whole train split and on `sample_texts` samples of it (what
    `tinyllm tokenizer train --max-train-chars` trains on), at one vocabulary size."""
    train, validation, description = corpus_texts(None)
    caps = [None] + sorted((int(c) for c in args.caps.split(",")), reverse=True)
    lines = [f"Text: {description}; vocabulary {args.vocab_size:,}.", "",
             "| max_train_chars | chars trained on | train CPU s | held-out chars/token | tokens vs uncapped |",
             "|---|---|---|---|---|"]
    uncapped = None
    for max_chars in caps:
        seen = {"chars": 0}
        trained_on = sum(map(len, sample_texts([train], max_chars, seen))) if max_chars else sum(map(len, train))
        with Timer() as timer:
            backend = train_tokenizer(train, vocab_size=args.vocab_size, max_train_chars=max_chars).backend_tokenizer
        cpt = chars_per_token(validation, ours_counts(backend, validation))
        uncapped = uncapped or cpt
        lines.append(f"| {f'{max_chars:,}' if max_chars else 'none (whole split)'} | {trained_on:,} | "
                     f"{timer.cpu:.1f} | {cpt:.3f} | {uncapped / cpt:.3f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["compare", "sweep", "pretokenizers", "cap"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--sizes", default="4096,6144,8192,12288,16384,32768")
    parser.add_argument("--max-train-chars", type=int, default=None, help="cap the train text (strided subset)")
    parser.add_argument("--caps", default="4000000,2000000,1000000", help="cap: the max_train_chars to compare")
    parser.add_argument("--check-prefix", action="store_true", help="sweep: also train the smallest size directly")
    parser.add_argument("--trained", help="sweep: a tokenizer.json already trained at the largest size on this text")
    args = parser.parse_args()
    print({"compare": compare, "sweep": sweep, "pretokenizers": pretokenizers, "cap": cap}[args.mode](args))


if __name__ == "__main__":
    main()
