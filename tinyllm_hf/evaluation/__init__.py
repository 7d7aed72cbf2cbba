"""Evaluation: C-Eval / CMMLU (ppl and gen modes), perplexity and bits per character, checkable task accuracy, and
task configs for lm-evaluation-harness. `tinyllm eval` (tinyllm_hf.evaluation.cli) runs them into one results JSON.

The names below load with their submodule on first use (PEP 562): scoring imports torch, and importing the package
for a light submodule (e.g. `evaluation.results` for a model card, or `tinyllm eval --help`) should not.
"""

import importlib

SUBMODULES = {
    "benchmarks": ("Benchmark", "Question", "load_benchmark", "load_local", "load_mapping"),
    "mc": ("evaluate_multiple_choice", "parse_letter", "score_choices"),
    # Not the `perplexity` function: once the submodule is imported, `evaluation.perplexity` is that submodule.
    "perplexity": ("load_texts",),
    "results": ("FORMAT_VERSION", "load_results", "make_results", "results_table", "save_results"),
    "tasks": ("evaluate_tasks", "load_examples"),
}
SUBMODULE_OF = {name: module for module, names in SUBMODULES.items() for name in names}

__all__ = list(SUBMODULE_OF)


def __getattr__(name: str):
    if name in SUBMODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{SUBMODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
