"""Repetition in generated replies: distinct-n, the repeated n-gram rate, and the share of replies stuck in a loop.

A small chat model's most common failure is a reply that repeats itself until the token budget runs out. These
metrics are defined here once and computed on the replies of generation-mode task evaluation (`evaluation/tasks.py`),
of the drift table (`export/drift.py`) and of the generation-defaults bench (`bench/generation_defaults.py`); the run
report shows them.

Characters are the tokens: Chinese has no spaces to split words at, and model tokenizers differ, so an n-gram is a run
of n characters of a reply with its whitespace removed (the same numbers whichever model or tokenizer wrote it).

    distinct_1, distinct_2  distinct n-grams / all n-grams, pooled over all replies (Li et al. 2016, "A
                            Diversity-Promoting Objective Function for Neural Conversation Models")
    repeated_4gram_rate     of all 4-grams of all replies, the share that already occurred earlier in the same reply
                            (0 for a reply that never repeats a 4-character phrase; it nears 1 in a long loop)
    loops, loop_share       replies that end in a loop, and their share of all replies. A reply loops when, after
                            trailing whitespace, it ends in a stretch of at least LOOP_MIN_CHARS characters that is at
                            least LOOP_MIN_REPEATS consecutive copies of one unit of 1 to LOOP_MAX_UNIT characters; the
                            last copy may be cut short (where the token budget ran out). "哈哈哈" is no loop (too
                            short); "它是一种。它是一种。它是一种。" is (unit "它是一种。", 3 copies, 15 characters).

A metric with nothing to count (no reply has an n-gram that long) is None, never 0.
"""

from collections import Counter

DISTINCT_N = (1, 2)
REPEATED_NGRAM = 4
LOOP_MIN_REPEATS = 3
LOOP_MIN_CHARS = 12
LOOP_MAX_UNIT = 32


def characters(reply: str) -> str:
    """The reply's characters that n-grams are made of: all but whitespace."""
    return "".join(reply.split())


def ngrams(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def loop_unit(reply: str) -> str | None:
    """The repeated unit the reply ends in when it loops (see the module docstring), else None. The shortest unit wins:
    "好好好好好好好好好好好好" loops on "好", not on "好好"."""
    text = reply.rstrip()
    for unit in range(1, LOOP_MAX_UNIT + 1):
        # The longest suffix with period `unit`: characters equal to the one `unit` places before them, from the end.
        matched = 0
        while matched + unit < len(text) and text[-1 - matched] == text[-1 - matched - unit]:
            matched += 1
        span = matched + unit
        if span >= max(LOOP_MIN_REPEATS * unit, LOOP_MIN_CHARS):
            start = len(text) - span
            return text[start : start + unit]
    return None


def repeated_ngram_count(text: str, n: int) -> tuple[int, int]:
    """(n-grams of `text` that already occurred earlier in it, all n-grams of it)."""
    grams = ngrams(text, n)
    return len(grams) - len(set(grams)), len(grams)


def repetition_metrics(replies: list[str]) -> dict:
    """The repetition of a set of replies, as a JSON-ready dict (keys in the module docstring, plus `replies`)."""
    texts = [characters(reply) for reply in replies]
    metrics: dict = {"replies": len(replies)}
    for n in DISTINCT_N:
        counts = Counter(gram for text in texts for gram in ngrams(text, n))
        total = sum(counts.values())
        metrics[f"distinct_{n}"] = len(counts) / total if total else None
    counts = [repeated_ngram_count(text, REPEATED_NGRAM) for text in texts]
    repeated, total = sum(r for r, _ in counts), sum(t for _, t in counts)
    metrics[f"repeated_{REPEATED_NGRAM}gram_rate"] = repeated / total if total else None
    loops = sum(loop_unit(reply) is not None for reply in replies)
    metrics["loops"] = loops
    metrics["loop_share"] = loops / len(replies) if replies else None
    return metrics


REPETITION_HEADER = ["loops", "distinct-2", "repeated 4-grams"]


def format_repetition(metrics: dict | None) -> list[str]:
    """The cells under REPETITION_HEADER: loop share (with the count), distinct-2, repeated 4-gram rate; "–" where
    not measured."""
    if not metrics:
        return ["–"] * 3

    def percent(value):
        return "–" if value is None else f"{100 * value:.1f}%"

    loops = "–" if metrics["loop_share"] is None else (
        f"{percent(metrics['loop_share'])} ({metrics['loops']}/{metrics['replies']})")
    return [loops, "–" if metrics["distinct_2"] is None else f"{metrics['distinct_2']:.3f}",
            percent(metrics[f"repeated_{REPEATED_NGRAM}gram_rate"])]
