"""Repetition metrics (`tinyllm_hf.evaluation.repetition`) on hand-made replies with known values, and the run
report's evaluation table that shows them. (Their place in the eval JSON: test_evaluation.py; in the drift table:
test_drift.py.)"""

import json

import pytest

from tinyllm_hf.evaluation.repetition import format_repetition, loop_unit, repetition_metrics
from tinyllm_hf.report import eval_table
from tinyllm_hf.runs import RunLayout


@pytest.mark.parametrize("reply, unit", [
    ("它是一种。它是一种。它是一种。", "它是一种。"),  # 3 copies of 5 characters
    # The budget cut the last copy short; the repeating stretch (and so its unit) starts at the 。 before the first copy.
    ("比喻多此一举。它是一种。它是一种。它是一种。它是", "。它是一种"),
    ("好" * 12, "好"),  # the shortest unit, not "好好"
    ("人名：王；地名：无；无；无；无；无；无；\n", "无；"),  # trailing whitespace does not hide a loop
])
def test_a_looping_reply_is_detected_with_its_unit(reply, unit):
    assert loop_unit(reply) == unit


@pytest.mark.parametrize("reply", [
    "比喻多此一举，做了多余的事。",  # a clean answer
    "哈哈哈",  # 3 copies, but under 12 characters
    "好" * 11,  # one character short of a loop
    "它是一种。它是一种。",  # 2 copies only
    "它是一种。它是一种。它是一种。然后呢？",  # the repetition is not where the reply ends
    "",
])
def test_a_reply_that_does_not_end_in_a_loop_is_not_one(reply):
    assert loop_unit(reply) is None


def test_distinct_n_and_repeated_4gram_rate_have_their_exact_values():
    # "abab": 1-grams a b a b (2 distinct of 4), 2-grams ab ba ab (2 of 3). "abcabcabc": 1-grams 3 distinct of 9,
    # 2-grams ab bc ca (3 distinct of 8), 4-grams abca bcab cabc abca bcab cabc (the last 3 repeat the first 3).
    # Pooled: distinct-1 = |{a, b, c}| / 13, distinct-2 = |{ab, ba, bc, ca}| / 11; 4-grams: 3 repeated of 1 + 6.
    metrics = repetition_metrics(["abab", "abcabcabc"])
    assert metrics["distinct_1"] == pytest.approx(3 / 13)
    assert metrics["distinct_2"] == pytest.approx(4 / 11)
    assert metrics["repeated_4gram_rate"] == pytest.approx(3 / 7)
    assert metrics["replies"] == 2 and metrics["loops"] == 0 and metrics["loop_share"] == 0.0


def test_characters_are_the_tokens_and_whitespace_does_not_count():
    # Segmented text ("今天 天气 很 好") counts the same as unsegmented: 6 characters, 6 distinct.
    spaced, plain = repetition_metrics(["今天 天气 很 好"]), repetition_metrics(["今天天气很好"])
    assert spaced == plain and plain["distinct_1"] == pytest.approx(5 / 6)  # 天 twice
    assert plain["distinct_2"] == 1.0 and plain["repeated_4gram_rate"] == 0.0


def test_a_metric_with_nothing_to_count_is_none_not_zero():
    # Two-character answers have no 4-grams; no replies at all have nothing.
    metrics = repetition_metrics(["正面", "负面"])
    assert metrics["repeated_4gram_rate"] is None and metrics["distinct_2"] == 1.0
    empty = repetition_metrics([])
    assert empty["distinct_1"] is None and empty["loop_share"] is None and empty["loops"] == 0
    assert format_repetition(None) == ["–", "–", "–"]


def test_loop_share_counts_the_looping_replies():
    metrics = repetition_metrics(["正面", "多余的事。" * 4, "比喻多此一举。", "。" * 20])
    assert metrics["loops"] == 2 and metrics["loop_share"] == 0.5
    assert format_repetition(metrics)[0] == "50.0% (2/4)"


def test_the_report_shows_repetition_per_model(tmp_path):
    run = RunLayout(tmp_path)
    run.eval_results("sft").parent.mkdir(parents=True)
    held = {"mode": "gen", "accuracy": 0.5, "n": 4, "correct": 2, "per_task": {},
            "repetition": repetition_metrics(["正面", "多余的事。" * 4, "比喻多此一举。", "负面"])}
    run.eval_results("sft").write_text(json.dumps({"tasks": {"tasks": held}}), "utf-8")
    # An older results file, written before repetition was measured, shows dashes.
    run.eval_results("dpo").write_text(json.dumps({"tasks": {"tasks": {k: v for k, v in held.items()
                                                                       if k != "repetition"}}}), "utf-8")
    header, _, sft, dpo = eval_table(run, ["sft", "dpo"]).splitlines()
    assert header.endswith("| loops | distinct-2 | repeated 4-grams |")
    assert sft.endswith("| " + " | ".join(format_repetition(held["repetition"])) + " |")
    assert "| 25.0% (1/4) |" in sft
    assert dpo.endswith("| – | – | – |")
