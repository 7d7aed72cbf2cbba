"""Multiple-choice evaluation (C-Eval, CMMLU) in the two standard modes.

- **ppl** (base models): the log-likelihood of each answer letter as the continuation of the prompt (" A", " B", ...
  after "答案："); the most likely letter is the prediction. This is lm-evaluation-harness's `acc` for these tasks.
- **gen** (chat models): the question as a chat conversation (k-shot: one user/assistant turn per exemplar), greedy
  generation, and a letter parsed from the reply; replies with no recognisable letter count as wrong and are reported.

k-shot prompts take the first k dev questions of the subject; when a prompt exceeds the model's context, exemplars are
dropped from the end, never the question (a question too long by itself is cut from the left and counted).
"""

import re
from collections import defaultdict
from dataclasses import dataclass

from tinyllm_hf.errors import UsageError
from tinyllm_hf.evaluation.benchmarks import (
    DEFAULT_STYLE,
    LETTERS,
    MODES,
    TARGET_DELIMITER,
    PROMPT_STYLES,
    Benchmark,
    PromptStyle,
    Question,
)
from tinyllm_hf.evaluation.engine import (
    context_length,
    encode,
    encode_pair,
    greedy_generate,
    loglikelihoods,
    transformers_model,
)

# ---------------------------------------------------------------- letter parsing (gen mode)

_OPEN = r"[(（\[【]?\s*"
_LETTER = r"([A-D])(?![A-Za-z])"
_ANSWER_PATTERNS = [
    # 答案是B / 答案：B / 正确答案为（B） / 答案应该是 B / 答案选B / 答案为选项B
    re.compile(r"答案\s*(?:应该|应|就)?\s*(?:是|为|选)?\s*(?:选项)?\s*[:：]?\s*" + _OPEN + _LETTER),
    # 选 B / 选择：B / 选项C / 故选D
    re.compile(r"选(?:择|项)?\s*[:：]?\s*" + _OPEN + _LETTER),
    # B选项正确 / B 是正确的 / C项符合题意 / D当选
    re.compile(r"(?<![A-Za-z])([A-D])\s*(?:选?项)?\s*(?:是|为)?\s*(?:正确|对的|符合题意|当选)"),
    # A reply that starts with the letter alone: "B", "B.", "(B)", "B、因为……" (not "A和B都对")
    re.compile(r"^\s*" + _OPEN + r"([A-D])\s*(?:$|[.．。、,，:：)）\]】\s])"),
]
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


def parse_letter(text: str) -> str | None:
    """The option letter a free-form reply chooses, or None when it names none (or several without a marker)."""
    text = text.strip().translate(str.maketrans("ＡＢＣＤ", "ABCD"))
    for pattern in _ANSWER_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    mentioned = set(_STANDALONE.findall(text))
    return mentioned.pop() if len(mentioned) == 1 else None


# ---------------------------------------------------------------- prompts within the context window


@dataclass
class Prompt:
    question: Question
    text: str
    shots: int  # exemplars actually kept
    overflow: bool  # the question alone did not fit; the model sees its last tokens only


def _fit(build, exemplars: list[Question], n_tokens, budget: int) -> tuple[str, int, bool]:
    """Build with as many of `exemplars` (in order) as fit in `budget` tokens."""
    kept = list(exemplars)
    text = build(kept)
    while kept and n_tokens(text) > budget:
        kept.pop()
        text = build(kept)
    return text, len(kept), n_tokens(text) > budget


def ppl_prompt(bench: Benchmark, q: Question, shots: int, tokenizer, budget: int,
               style: PromptStyle = DEFAULT_STYLE) -> Prompt:
    def build(exemplars):
        return style.ppl_context(bench, q, exemplars)

    text, kept, overflow = _fit(build, bench.dev.get(q.subject, [])[:shots], lambda t: len(encode(tokenizer, t)), budget)
    return Prompt(q, text, kept, overflow)


def gen_prompt(bench: Benchmark, q: Question, shots: int, runtime, budget: int,
               style: PromptStyle = DEFAULT_STYLE) -> Prompt:
    def build(exemplars):
        return runtime.render_chat(style.chat_messages(bench, q, exemplars))

    text, kept, overflow = _fit(build, bench.dev.get(q.subject, [])[:shots], lambda t: len(runtime.encode(t)), budget)
    return Prompt(q, text, kept, overflow)


# ---------------------------------------------------------------- evaluation


def score_choices(model, tokenizer, prompts: list[str], batch_size: int = 16, progress: bool = False,
                  targets: tuple[str, ...] = tuple(TARGET_DELIMITER + letter for letter in LETTERS)) -> list[list[float]]:
    """log p(target) of each answer's target (" A", ..., " D" by default) after each prompt."""
    requests = [(p, target) for p in prompts for target in targets]
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    return [flat[i : i + len(targets)] for i in range(0, len(flat), len(targets))]


def ppl_prompts(bench: Benchmark, questions: list[Question], shots: int, tokenizer, max_length: int,
                style: PromptStyle = DEFAULT_STYLE) -> list[Prompt]:
    """ppl-mode prompts that leave room for the answer letter within `max_length` tokens."""
    if not questions:
        return []
    # Every prompt ends the same way before its letter, so one question tells how many tokens the letters take. The
    # scored input is prompt + continuation minus its last token; it must fit in max_length.
    context = style.ppl_context(bench, questions[0], [])
    longest = max(len(encode_pair(tokenizer, context, style.target(bench, letter))[1]) for letter in LETTERS)
    return [ppl_prompt(bench, q, shots, tokenizer, max_length + 1 - longest, style) for q in questions]


def evaluate_multiple_choice(
    runtime,
    bench: Benchmark,
    mode: str = "ppl",
    shots: int = 0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    style: str = DEFAULT_STYLE.name,
) -> dict:
    """Evaluate every subject of `bench` (the first `limit` questions of each, if given) on `runtime` (see
    `inference/runtime.py`); returns the task's result entry (see `summarize`). ppl mode scores with the
    transformers model of a `TransformersRuntime`; gen mode runs on any runtime, each reply `max_new_tokens` long at
    most (None: the rest of the context after its prompt). `style`: the prompt format (`benchmarks.PROMPT_STYLES`)."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if shots < 0:
        raise UsageError(f"shots must be >= 0, not {shots}")
    if style not in PROMPT_STYLES:
        raise UsageError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, not {style!r}")
    prompt_style = PROMPT_STYLES[style]
    if mode == "gen" and not runtime.chat_template:
        raise UsageError("gen mode needs a tokenizer with a chat template; use --mode ppl for a base model")
    questions = [q for qs in bench.questions.values() for q in qs[:limit]]
    if mode == "ppl":
        model, tokenizer = transformers_model(runtime, "ppl mode")
        prompts = ppl_prompts(bench, questions, shots, tokenizer, context_length(model, tokenizer), prompt_style)
        targets = tuple(prompt_style.target(bench, letter) for letter in LETTERS)
        scores = score_choices(model, tokenizer, [p.text for p in prompts], batch_size, progress, targets)
        predictions = [LETTERS[max(range(len(LETTERS)), key=s.__getitem__)] for s in scores]
    else:
        budget = runtime.context_length - (max_new_tokens or 1)
        prompts = [gen_prompt(bench, q, shots, runtime, budget, prompt_style) for q in questions]
        replies = greedy_generate(runtime, [p.text for p in prompts], max_new_tokens, batch_size, progress)
        predictions = [parse_letter(r) for r in replies]
    return {**summarize(bench, prompts, predictions, mode, shots), "prompt_style": style}


def _accuracy(correct: int, n: int) -> float | None:
    return correct / n if n else None


def summarize(bench: Benchmark, prompts: list[Prompt], predictions: list[str | None], mode: str, shots: int) -> dict:
    """Per-subject, per-category and overall accuracy (micro: over questions; macro: mean of subjects).

    An unlabelled split gets `accuracy: null` and the predictions in C-Eval's submission format instead."""
    scored = bench.scored
    per_subject: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "unparsed": 0})
    submission: dict[str, dict[str, str | None]] = defaultdict(dict)
    for prompt, pred in zip(prompts, predictions):
        q = prompt.question
        entry = per_subject[q.subject]
        entry["n"] += 1
        entry["unparsed"] += pred is None
        entry["correct"] += scored and pred == q.answer
        submission[q.subject][q.id] = pred
    per_category: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    for subject, entry in per_subject.items():
        entry["name"] = bench.subject_names.get(subject, subject)
        entry["accuracy"] = _accuracy(entry["correct"], entry["n"]) if scored else None
        for category in bench.categories.get(subject, []):
            per_category[category]["n"] += entry["n"]
            per_category[category]["correct"] += entry["correct"]
    for entry in per_category.values():
        entry["accuracy"] = _accuracy(entry["correct"], entry["n"]) if scored else None
    n = len(prompts)
    correct = sum(e["correct"] for e in per_subject.values())
    subject_acc = [e["accuracy"] for e in per_subject.values() if e["accuracy"] is not None]
    result = {
        "mode": mode,
        "shots": shots,
        "split": bench.split,
        "scored": scored,
        "accuracy": _accuracy(correct, n) if scored else None,
        "macro_accuracy": sum(subject_acc) / len(subject_acc) if subject_acc else None,
        "n": n,
        "correct": correct,
        "unparsed": sum(e["unparsed"] for e in per_subject.values()),
        "overflow": sum(p.overflow for p in prompts),
        "mean_shots": sum(p.shots for p in prompts) / n if n else 0.0,
        "per_subject": dict(sorted(per_subject.items())),
        "per_category": dict(sorted(per_category.items())),
    }
    if not scored:
        result["predictions"] = dict(submission)
    return result
