"""C-Eval and CMMLU: loading the official file layouts (or the Hub datasets) and the one prompt format both modes use.

C-Eval (https://github.com/hkust-nlp/ceval): `{dev,val,test}/<subject>_<split>.csv` with the header
`id,question,A,B,C,D,answer[,explanation]`; the test split has empty answers (scored only by the C-Eval server).
CMMLU (https://github.com/haonan-li/CMMLU): `{dev,test}/<subject>.csv` with the header `,Question,A,B,C,D,Answer`.
Both become lists of `Question`; the dev split (5 per subject) is the pool of few-shot exemplars. The same rows come
from the Hugging Face Hub (`ceval/ceval-exam`; CMMLU from the parquet conversion of `haonan-li/cmmlu`) or from
ModelScope (OpenCompass's `opencompass/ceval-exam`, `opencompass/cmmlu`): `load_benchmark(name, "hub"|"modelscope")`.

Prompts follow lm-evaluation-harness's `ceval-valid` / `cmmlu` tasks exactly, so our ppl-mode numbers and lm-eval's agree:

    <description>                      以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n\n  (C-Eval)
                                       以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\n\n      (CMMLU)
    <exemplar> " " <letter> "\n\n"     (k times, dev split, in file order)
    <question>\nA. ..\nB. ..\nC. ..\nD. ..\n答案：
"""

import csv
import importlib.util
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tinyllm_hf.errors import DatasetUnavailableError, MissingFileError, UsageError

LETTERS = ("A", "B", "C", "D")
BENCHMARKS = ("ceval", "cmmlu")
MODES = ("ppl", "gen")  # scored by option log-likelihood (base models), or generated and parsed (chat models)
HUB_NAMES = {"ceval": "ceval/ceval-exam", "cmmlu": "haonan-li/cmmlu"}
# haonan-li/cmmlu is a loading-script repo, which `datasets` >= 4 refuses; the Hub's own parquet conversion of it lives
# on the refs/convert/parquet branch, one folder per subject and split.
HUB_PARQUET = {"cmmlu": "hf://datasets/haonan-li/cmmlu@refs%2Fconvert%2Fparquet"}
# OpenCompass's copies on ModelScope (what its `DATASET_SOURCE=ModelScope` reads), in the official columns.
MODELSCOPE_NAMES = {"ceval": "opencompass/ceval-exam", "cmmlu": "opencompass/cmmlu"}
SOURCES = ("hub", "modelscope")  # the remote sources, in the order "auto" tries them
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test"}
DESCRIPTIONS = {
    "ceval": "以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n",
}
ANSWER_PROMPT = "答案："
EXEMPLAR_SEPARATOR = "\n\n"
# The continuation scored in ppl mode is " A" etc.: lm-eval's default target delimiter is a space.
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # None when the split is unlabelled (C-Eval test)


@dataclass
class Benchmark:
    """One benchmark split: questions per subject, dev exemplars per subject, subject names and categories."""

    name: str
    split: str
    questions: dict[str, list[Question]]
    dev: dict[str, list[Question]] = field(default_factory=dict)
    subject_names: dict[str, str] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return all(q.answer is not None for qs in self.questions.values() for q in qs)


# ---------------------------------------------------------------- subject mappings


def load_mapping(path: str | Path | None = None, benchmark: str = "ceval") -> dict[str, tuple[str, list[str]]]:
    """Subject -> (Chinese name, categories). Without `path`, the mapping shipped with the package.

    Accepted shapes per subject: C-Eval's official `subject_mapping.json` (`[English, 中文, Category]`),
    `{"name": .., "category": ..}` (the shared fixtures' mapping.json) or `{"name": .., "categories": [..]}`.
    """
    if path is None:
        text = resources.files("tinyllm_hf.evaluation").joinpath(f"{benchmark}_subject_mapping.json").read_text("utf-8")
        source = f"{benchmark}_subject_mapping.json (package data)"
    else:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"subject mapping not found: {path}")
        text, source = path.read_text("utf-8"), str(path)
    mapping = {}
    for subject, entry in json.loads(text).items():
        if isinstance(entry, list) and len(entry) == 3:
            mapping[subject] = (entry[1], [entry[2]])
        elif isinstance(entry, dict) and "name" in entry and ("category" in entry or "categories" in entry):
            cats = entry.get("categories") or [entry["category"]]
            mapping[subject] = (entry["name"], list(cats))
        else:
            raise UsageError(f"{source}: subject {subject!r} must be [English, 中文, Category] or have name and category")
    return mapping


# ---------------------------------------------------------------- local files


def _read_csv(path: Path, benchmark: str, subject: str) -> list[Question]:
    question_col, answer_col = ("question", "answer") if benchmark == "ceval" else ("Question", "Answer")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and not {question_col, *LETTERS} <= rows[0].keys():
        raise UsageError(f"{path}: expected columns {question_col},A,B,C,D[,{answer_col}], got {list(rows[0])}")
    questions = []
    for i, row in enumerate(rows):
        # CMMLU's id is the unnamed first column; C-Eval's is `id`.
        qid = row.get("id") or row.get("") or str(i)
        answer = (row.get(answer_col) or "").strip().upper() or None
        if answer is not None and answer not in LETTERS:
            raise UsageError(f"{path}: row {i} has answer {answer!r}, expected one of A, B, C, D")
        options = tuple(str(row[letter]) for letter in LETTERS)
        questions.append(Question(subject, str(qid), str(row[question_col]), options, answer))
    return questions


def _subject_files(root: Path, benchmark: str, split: str) -> dict[str, Path]:
    folder = root / split
    if not folder.is_dir():
        raise MissingFileError(f"{benchmark}: no {split}/ folder in {root}")
    suffix = f"_{split}.csv" if benchmark == "ceval" else ".csv"
    files = {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}
    if not files:
        raise MissingFileError(f"{benchmark}: no *{suffix} files in {folder}")
    return files


def load_local(
    benchmark: str,
    root: str | Path,
    split: str | None = None,
    subjects: list[str] | None = None,
    mapping_path: str | Path | None = None,
) -> Benchmark:
    """Read a benchmark in its official layout. Subjects default to every file present in the split's folder."""
    if benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    root, split = Path(root), split or DEFAULT_SPLIT[benchmark]
    files = _subject_files(root, benchmark, split)
    if subjects:
        missing = sorted(set(subjects) - set(files))
        if missing:
            raise MissingFileError(f"{benchmark}: no {split} file for subject(s) {', '.join(missing)} in {root / split}")
        files = {s: files[s] for s in subjects}
    dev_files = _subject_files(root, benchmark, "dev") if (root / "dev").is_dir() else {}
    mapping = load_mapping(mapping_path, benchmark)
    return Benchmark(
        name=benchmark,
        split=split,
        questions={s: _read_csv(p, benchmark, s) for s, p in files.items()},
        dev={s: _read_csv(dev_files[s], benchmark, s) for s in files if s in dev_files},
        subject_names={s: mapping[s][0] if s in mapping else s for s in files},
        categories={s: mapping[s][1] for s in files if s in mapping},
    )


# ---------------------------------------------------------------- Hugging Face Hub and ModelScope


def _hub_splits(benchmark: str, subject: str, splits: tuple[str, ...]):
    """{split: rows} of one subject from the Hugging Face Hub."""
    import datasets

    if benchmark in HUB_PARQUET:
        base = HUB_PARQUET[benchmark]
        return datasets.load_dataset("parquet", data_files={s: f"{base}/{subject}/{s}/*.parquet" for s in splits})
    return datasets.load_dataset(HUB_NAMES[benchmark], subject)


def _modelscope_splits(benchmark: str, subject: str, splits: tuple[str, ...]):
    """{split: rows} of one subject from ModelScope (OpenCompass's copies, as `DATASET_SOURCE=ModelScope` reads them)."""
    if importlib.util.find_spec("modelscope") is None:
        raise DatasetUnavailableError('the modelscope package is not installed (pip install "modelscope[datasets]")')
    try:
        from modelscope import MsDataset
    except (ImportError, RuntimeError) as err:  # the SDK without its datasets extra raises RuntimeError here
        reason = " ".join(str(err).split())  # the SDK's message spans lines
        raise DatasetUnavailableError(f'modelscope cannot load datasets ({reason}); pip install "modelscope[datasets]"'
                                      ) from None

    return MsDataset.load(dataset_name=MODELSCOPE_NAMES[benchmark], subset_name=subject)


_REMOTE = {"hub": (_hub_splits, HUB_NAMES), "modelscope": (_modelscope_splits, MODELSCOPE_NAMES)}


def load_remote(benchmark: str, source: str = "hub", split: str | None = None,
                subjects: list[str] | None = None) -> Benchmark:
    """Download a benchmark (one dataset config per subject) from `source`: "hub" (Hugging Face) or "modelscope";
    the rows are the official columns in both. Raises DatasetUnavailableError when it cannot be read (offline, or
    the SDK missing)."""
    if source not in _REMOTE:
        raise UsageError(f"unknown benchmark source {source!r}; choose one of {', '.join(SOURCES)}")
    load_splits, names = _REMOTE[source]
    split = split or DEFAULT_SPLIT[benchmark]
    mapping = load_mapping(None, benchmark)
    subjects = subjects or list(mapping)
    question_col, answer_col = ("question", "answer") if benchmark == "ceval" else ("Question", "Answer")
    questions, dev = {}, {}
    for subject in subjects:
        try:
            splits = load_splits(benchmark, subject, (split, "dev"))
            rows = {name: list(splits[name]) for name in (split, "dev")}
        except DatasetUnavailableError as err:
            raise DatasetUnavailableError(f"could not load {names[benchmark]} from {source}: {err}") from None
        except Exception as err:  # offline, unknown subject, a repo the installed `datasets` cannot read
            raise DatasetUnavailableError(
                f"could not load {names[benchmark]} ({subject}) from {source}: {type(err).__name__}: "
                f"{' '.join(str(err).split())}. "
                f"Download the dataset and pass its folder with --{benchmark}-dir instead."
            ) from None
        for name, target in ((split, questions), ("dev", dev)):
            target[subject] = [
                Question(
                    subject,
                    str(row.get("id", i)),
                    str(row[question_col]),
                    tuple(str(row[letter]) for letter in LETTERS),
                    (row.get(answer_col) or "").strip().upper() or None,
                )
                for i, row in enumerate(rows[name])
            ]
    return Benchmark(
        name=benchmark,
        split=split,
        questions=questions,
        dev=dev,
        subject_names={s: mapping[s][0] for s in subjects if s in mapping},
        categories={s: mapping[s][1] for s in subjects if s in mapping},
    )


def load_benchmark(
    benchmark: str,
    source: str | Path | None = None,
    split: str | None = None,
    subjects: list[str] | None = None,
    mapping_path: str | Path | None = None,
) -> Benchmark:
    """`source` is a local folder in the official layout, "hub" / the Hub name / None (Hugging Face), "modelscope",
    or "auto" (the Hub, then ModelScope: the first that answers)."""
    if source is None or str(source) in ("hub", HUB_NAMES.get(benchmark)):
        return load_remote(benchmark, "hub", split, subjects)
    if source == "modelscope":
        return load_remote(benchmark, "modelscope", split, subjects)
    if source == "auto":
        failures = []
        for remote in SOURCES:
            try:
                return load_remote(benchmark, remote, split, subjects)
            except DatasetUnavailableError as err:
                failures.append(str(err))
        raise DatasetUnavailableError("; ".join(failures))
    return load_local(benchmark, source, split, subjects, mapping_path)


# ---------------------------------------------------------------- prompts


def description(benchmark: str, subject_name: str) -> str:
    return DESCRIPTIONS[benchmark].format(name=subject_name)


def format_question(q: Question) -> str:
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    return f"{q.question.strip()}{options}\n{ANSWER_PROMPT}"


def format_exemplar(q: Question) -> str:
    return f"{format_question(q)}{TARGET_DELIMITER}{q.answer}{EXEMPLAR_SEPARATOR}"


class PromptStyle:
    """How a question, its exemplars and the scored answer are written: `ppl_context(...) + target(letter)` is the
    text whose continuation ppl mode scores; `chat_messages` is the conversation gen mode sends. The default is
    lm-evaluation-harness's format (the module docstring); `OpenCompassStyle` writes OpenCompass's."""

    name = "lm-eval"

    def ppl_context(self, bench: Benchmark, q: Question, exemplars: list[Question]) -> str:
        head = description(bench.name, bench.subject_names.get(q.subject, q.subject))
        return head + "".join(format_exemplar(e) for e in exemplars) + format_question(q)

    def target(self, bench: Benchmark, letter: str) -> str:
        return TARGET_DELIMITER + letter

    def chat_messages(self, bench: Benchmark, q: Question, exemplars: list[Question]) -> list[dict]:
        """k-shot as a multi-turn chat: each exemplar is a user question answered by its letter."""
        head = description(bench.name, bench.subject_names.get(q.subject, q.subject))
        messages = []
        for e in [*exemplars, q]:
            messages.append({"role": "user", "content": (head if not messages else "") + format_question(e)})
            if e is not q:
                messages.append({"role": "assistant", "content": e.answer})
        return messages


class OpenCompassStyle(PromptStyle):
    """OpenCompass's C-Eval and CMMLU prompts (its `ceval_ppl_578f8d` / `ceval_gen_5f30c7` and `cmmlu_ppl_8b9c76`
    configs): every exemplar carries the subject line, each is a HUMAN turn then a BOT turn, and a base model without a
    meta template sees the turns joined with newlines - so its ppl text for answer A is `...答案: \nA` (C-Eval) or
    `...\n答案是: A` (CMMLU). Scoring the letter after that text picks what OpenCompass's lowest-perplexity choice does:
    the candidates differ in that one letter."""

    name = "opencompass"
    HUMAN = {
        "ceval": "以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n{question}{options}\n答案: ",
        "cmmlu": "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n题目：{question}{options}",
    }
    BOT = {"ceval": "{letter}", "cmmlu": "答案是: {letter}"}

    def human(self, bench: Benchmark, q: Question) -> str:
        options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
        name = bench.subject_names.get(q.subject, q.subject)
        return self.HUMAN[bench.name].format(name=name, question=q.question, options=options)

    def bot(self, bench: Benchmark, letter: str) -> str:
        return self.BOT[bench.name].format(letter=letter)

    def ppl_context(self, bench: Benchmark, q: Question, exemplars: list[Question]) -> str:
        # As OpenCompass 0.5.4 renders it (read off its saved prompts): each exemplar's turns joined with a newline,
        # exemplars with three, five before the question.
        shots = "\n\n\n".join(f"{self.human(bench, e)}\n{self.bot(bench, e.answer)}" for e in exemplars)
        answer_prefix = self.bot(bench, "")  # "" (C-Eval) or "答案是: " (CMMLU): the scored letter follows it
        return (shots + "\n\n\n\n\n" if shots else "") + self.human(bench, q) + "\n" + answer_prefix.rstrip(" ")

    def target(self, bench: Benchmark, letter: str) -> str:
        return self.bot(bench, letter)[len(self.bot(bench, "").rstrip(" ")):]

    def chat_messages(self, bench: Benchmark, q: Question, exemplars: list[Question]) -> list[dict]:
        messages = []
        for e in exemplars:
            messages += [{"role": "user", "content": self.human(bench, e)},
                         {"role": "assistant", "content": self.bot(bench, e.answer)}]
        return messages + [{"role": "user", "content": self.human(bench, q)}]


PROMPT_STYLES = {style.name: style for style in (PromptStyle(), OpenCompassStyle())}
DEFAULT_STYLE = PROMPT_STYLES["lm-eval"]
