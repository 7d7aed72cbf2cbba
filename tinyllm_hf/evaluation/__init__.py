"""Evaluation: C-Eval / CMMLU (ppl and gen modes), perplexity and bits per character, checkable task accuracy, and
task configs for lm-evaluation-harness. `tinyllm eval` (tinyllm_hf.evaluation.cli) runs them into one results JSON."""

from tinyllm_hf.evaluation.benchmarks import Benchmark, Question, load_benchmark, load_local, load_mapping
from tinyllm_hf.evaluation.mc import evaluate_multiple_choice, parse_letter, score_choices
from tinyllm_hf.evaluation.perplexity import load_texts, perplexity
from tinyllm_hf.evaluation.results import FORMAT_VERSION, load_results, make_results, results_table, save_results
from tinyllm_hf.evaluation.tasks import evaluate_tasks, load_examples

__all__ = [
    "Benchmark",
    "Question",
    "load_benchmark",
    "load_local",
    "load_mapping",
    "evaluate_multiple_choice",
    "parse_letter",
    "score_choices",
    "load_texts",
    "perplexity",
    "FORMAT_VERSION",
    "load_results",
    "make_results",
    "results_table",
    "save_results",
    "evaluate_tasks",
    "load_examples",
]
