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
        "cmmlu": {…},
        "ppl":   {"n_texts", "n_tokens", "n_chars", "nll_per_token", "perplexity", "bits_per_char", "bits_per_byte", …},
        "tasks": {"mode", "shots", "tools", "accuracy", "n", "correct", "per_task": {…}},
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
        if "bits_per_char" in entry:
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
