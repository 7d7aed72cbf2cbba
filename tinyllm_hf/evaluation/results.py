"""The results file: one versioned JSON document per evaluation run, read back by the model card.

    {
      "format_version": 1,
      "model": "out/sft",               # what was evaluated (path or Hub id)
      "revision": "sha256:…",           # content hash of the weights (or the Hub commit)
      "date": "2026-11-20T12:00:00+00:00",
      "versions": {"tinyllm_hf": …, "transformers": …, "torch": …},
      "settings": {…},                  # the command-line settings of the run
      "tasks": {
        "ceval": {"mode", "shots", "split", "scored", "accuracy", "macro_accuracy", "n", "correct", "unparsed",
                  "overflow", "mean_shots", "per_subject": {…}, "per_category": {…}},
                 (or, when its data could not be read: {"skipped": why, "mode", "shots", "split", "command"})
        "cmmlu": {…},
        "ppl":   {"n_texts", "n_tokens", "n_chars", "nll_per_token", "perplexity", "bits_per_char", "bits_per_byte", …},
        "tasks": {"mode", "shots", "tools", "accuracy", "n", "correct", "per_task": {…},
                  "repetition": {"replies", "distinct_1", "distinct_2", "repeated_4gram_rate", "loops", "loop_share"}},
        "tasks_tools": {… as "tasks", with the built-in tools (--tools on|both), "tool_calls": {"n", "valid",
                        "validity", "called", "malformed"}}
      }
    }

Readers must check `format_version`; a change that renames or removes a field increments it.
"""

import datetime
import hashlib
import json
from pathlib import Path

from tinyllm_hf.errors import MissingFileError, UsageError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "revision", "date", "tasks")


def weights_revision(model_dir: str | Path) -> str | None:
    """A revision for a model folder: the Hub commit of a cached snapshot, else a hash of its weight files."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    if path.parent.name == "snapshots":
        return path.name
    digest = hashlib.sha256()
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
    if not files:
        return None
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def make_results(model: str, revision: str | None, tasks: dict, settings: dict | None = None) -> dict:
    import torch
    import transformers

    import tinyllm_hf

    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "revision": revision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tinyllm_hf": tinyllm_hf.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "settings": settings or {},
        "tasks": tasks,
    }


def save_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"results file not found: {path}")
    results = json.loads(path.read_text("utf-8"))
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise UsageError(f"{path}: not an evaluation results file (missing {', '.join(missing)})")
    if results["format_version"] != FORMAT_VERSION:
        raise UsageError(f"{path}: results format_version {results['format_version']}, this code reads {FORMAT_VERSION}")
    return results


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def results_table(results: dict) -> str:
    """A Markdown summary (one row per task) for model cards and logs."""
    lines = ["| task | mode | shots | score | n |", "|---|---|---|---|---|"]
    for name, entry in results["tasks"].items():
        if "skipped" in entry:
            lines.append(f"| {name} | {entry['mode']} | {entry['shots']} | skipped: no data (`{entry['command']}`) | – |")
        elif "bits_per_char" in entry:
            score = f"{entry['bits_per_char']:.3f} bits/char (ppl {entry['perplexity']:.2f})"
            lines.append(f"| {name} | – | – | {score} | {entry['n_tokens']} tokens |")
        else:
            score = f"{_pct(entry['accuracy'])}% acc" if entry.get("scored", True) else "unscored split"
            if entry.get("unparsed"):
                score += f" ({entry['unparsed']} unparsed)"
            if entry.get("tool_calls", {}).get("n"):
                score += f", {_pct(entry['tool_calls']['validity'])}% valid tool calls"
            lines.append(f"| {name} | {entry['mode']} | {entry['shots']} | {score} | {entry['n']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- C-Eval / CMMLU, as the reference project shows them

BENCHMARK_TITLES = {"ceval": "C-Eval", "cmmlu": "CMMLU"}
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")  # C-Eval's four; CMMLU adds "China specific"


def benchmark_cell(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    if "skipped" in entry:
        return "skipped (no data)"
    if not entry.get("scored", True):
        return "unscored split"
    return f"{_pct(entry['accuracy'])} ({entry['n']:,} q, {entry['mode']}, {entry['shots']}-shot)"


def benchmark_table(models: dict[str, tuple[str, dict]]) -> str:
    """model | type | C-Eval | CMMLU, for {model name: (type, e.g. "base"/"chat", its results)}: accuracy in %,
    with the questions, the mode and the shots."""
    lines = ["| model | type | C-Eval | CMMLU |", "|---|---|---|---|"]
    for model, (kind, results) in models.items():
        cells = [benchmark_cell(results["tasks"].get(name)) for name in BENCHMARK_TITLES]
        lines.append(f"| {model} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_table(models: dict[str, tuple[str, dict]]) -> str | None:
    """Accuracy per category (STEM, Social Science, Humanities, Other) of every benchmark that was scored; None if
    none was."""
    lines = ["| model | benchmark | " + " | ".join(CATEGORIES) + " | all |", "|---|---|" + "---|" * (len(CATEGORIES) + 1)]
    for model, (_, results) in models.items():
        for name, title in BENCHMARK_TITLES.items():
            entry = results["tasks"].get(name)
            if entry is None or "skipped" in entry or not entry.get("scored", True):
                continue
            per_category = entry.get("per_category", {})
            cells = [_pct(per_category[c]["accuracy"]) if c in per_category else "–" for c in CATEGORIES]
            lines.append(f"| {model} | {title} | " + " | ".join(cells) + f" | {_pct(entry['accuracy'])} |")
    return "\n".join(lines) if len(lines) > 2 else None


def skipped_benchmarks(models: dict[str, tuple[str, dict]]) -> list[str]:
    """One line per skipped benchmark run: why, and the command to run it once the data is there."""
    return [f"{BENCHMARK_TITLES[name]} on {model}: {entry['skipped']} Run: `{entry['command']}`"
            for model, (_, results) in models.items() for name, entry in results["tasks"].items()
            if name in BENCHMARK_TITLES and "skipped" in entry]
