"""The task registry: each task's wordings and answers, and the SFT, preference, RL-prompt and held-out sets built from
it (split by item, deterministic)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinyllm_hf.data.records import split_of  # noqa: E402
from tinyllm_hf.tasks import (  # noqa: E402
    HELDOUT_TASKS,
    PREFERENCE_TASKS,
    RL_TASKS,
    TASKS,
    build,
    build_default_preferences,
    build_default_sft,
    build_prompt_dataset,
    char_f1,
    check_exact,
    heldout_task_records,
    reply_reward,
    sample_prompt,
)
from tinyllm_hf.tasks.peoples_daily import entities_answer  # noqa: E402
from tinyllm_hf.tasks.reviews import SENTIMENT_LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_every_wording_of_a_task_fills_from_its_records(name):
    task = TASKS[name]
    split = "heldout" if task.has_heldout else "train"
    records = task.records(split)[:50]
    conversations = [c for c in map(task.conversation, records) if c is not None]
    assert conversations, f"{name}: no usable {split} record among the first 50"
    for question in task.questions:
        question.format(**records[0])  # a field the records lack raises KeyError
    assert all(m["content"].strip() for c in conversations for m in c)


def test_the_sets_draw_on_tasks_that_can_build_them():
    assert all(TASKS[t].distractor is not None for t in PREFERENCE_TASKS)
    assert set(RL_TASKS) <= set(TASKS) and "identity" not in HELDOUT_TASKS


def test_questions_vary_between_a_tasks_wordings():
    train = build_default_sft("train", ["sentiment"], {"sentiment": 60})
    openings = {m[0]["content"].split("\n")[0] for m in train["messages"]}
    assert openings == {q.split("\n")[0] for q in TASKS["sentiment"].questions}


def test_entities_answer_lists_each_type():
    found = [{"text": "江泽民", "label": "person"}, {"text": "中共中央", "label": "organization"},
             {"text": "江泽民", "label": "person"}]
    assert entities_answer(found) == "人名：江泽民；地名：无；机构名：中共中央"


def test_sample_prompts_name_a_task_and_its_fields():
    assert sample_prompt("随便聊聊") == "随便聊聊"
    assert sample_prompt({"task": "idiom_meaning", "word": "画蛇添足"}) == "成语「画蛇添足」是什么意思？"
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        sample_prompt({"task": "poetry", "text": "x"})
    with pytest.raises(ValueError, match="needs the field 'text'"):
        sample_prompt({"task": "sentiment", "review": "x"})


def test_quickstart_report_prompts_are_the_reports_defaults():
    from tinyllm_hf.report import DEFAULT_PROMPTS

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text("utf-8"))
    assert [sample_prompt(p) for p in recipe["report"]["prompts"]] == [sample_prompt(p) for p in DEFAULT_PROMPTS]


def test_reply_reward_is_exact_for_labels_and_partial_elsewhere():
    assert reply_reward("sentiment", "负面", "正面") == 0.0
    assert reply_reward("idiom_meaning", "比喻做事多余", "比喻多此一举") == char_f1("比喻做事多余", "比喻多此一举") > 0
    assert reply_reward("my_own_task", "比喻做事多余", "比喻多此一举") == char_f1("比喻做事多余", "比喻多此一举")
    assert reply_reward("my_own_task", "「正面」。", "正面") == 1.0


# --------------------------------------------------------------------------------------------------------------------
# The embedded sets
# --------------------------------------------------------------------------------------------------------------------


def test_default_set_split_is_by_item_and_deterministic():
    sizes = {"sentiment": 300, "xiehouyu": 100}
    train = build_default_sft("train", ["sentiment", "xiehouyu"], sizes)
    heldout = build_default_sft("heldout", ["sentiment", "xiehouyu"], sizes)
    assert len(train) == len(heldout) == 400
    assert not set(train["id"]) & set(heldout["id"])
    assert build_default_sft("train", ["sentiment", "xiehouyu"], sizes)["messages"] == train["messages"]
    labels = {m[-1]["content"] for m, task in zip(train["messages"], train["task"]) if task == "sentiment"}
    assert labels == {"正面", "负面"}


def test_heldout_task_records_plug_into_the_task_evaluator():
    from tinyllm_hf.evaluation.tasks import prepare

    records = heldout_task_records(["sentiment", "idiom_dialogue"], {"sentiment": 5, "idiom_dialogue": 3})
    assert [r["task"] for r in records] == ["sentiment"] * 5 + ["idiom_dialogue"] * 3
    query, answers, task, checker = prepare(records[0])
    assert query[-1]["role"] == "user" and answers[0] in ("正面", "负面") and checker == "exact"
    assert check_exact(answers[0] + "。", answers)
    query, _, _, _ = prepare(records[-1])  # multi-turn: the earlier answer stays in the history
    assert [m["role"] for m in query] == ["user", "assistant", "user"]


def test_identity_is_train_only_and_repeats_to_its_size():
    train = build_default_sft("train", ["identity"], {"identity": 30})
    assert len(train) == 30 and "tinyllm" in train[0]["messages"][-1]["content"] + "".join(
        m["messages"][-1]["content"] for m in train)
    with pytest.raises(ValueError, match="no heldout conversations"):
        build_default_sft("heldout", ["identity"])
    with pytest.raises(ValueError, match="unknown SFT task"):
        build_default_sft("train", ["poetry"])


def test_embedded_preferences_and_prompts_keep_the_sft_item_split():
    train = build_default_preferences("train", ["sentiment", "xiehouyu"])
    heldout = build_default_preferences("heldout", ["sentiment", "xiehouyu"])
    assert {split_of(i) for i in train["id"]} == {"train"}
    assert {split_of(i) for i in heldout["id"]} == {"heldout"}
    assert not set(train["id"]) & set(heldout["id"])
    prompts = build_prompt_dataset("train", ["sentiment", "xiehouyu"], {"sentiment": 50, "xiehouyu": 50})
    assert len(prompts) == 100 and {split_of(i) for i in prompts["id"]} == {"train"}
    # A pair's chosen answer is exactly the correct answer, the rejected one something else.
    row = next(r for r in train if r["task"] == "sentiment")
    assert row["chosen"][0]["content"] in SENTIMENT_LABELS.values() != row["rejected"][0]["content"]
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    with pytest.raises(ValueError, match="unknown preference task"):
        build_default_preferences("train", ["entities"])


def test_task_file_cli_writes_heldout_records(tmp_path):
    path = tmp_path / "tasks.jsonl"
    assert build.main([str(path), "--as-task-records", "--tasks", "sentiment", "--sizes", "sentiment=3"]) == 0
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and {r["task"] for r in rows} == {"sentiment"} and all(r["checker"] == "exact" for r in rows)


def test_task_file_module_runs_from_the_command_line(tmp_path):
    path = tmp_path / "train.jsonl"
    done = subprocess.run([sys.executable, "-m", "tinyllm_hf.tasks", str(path), "--split", "train", "--tasks",
                           "identity", "--sizes", "identity=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["task"] for line in path.read_text("utf-8").splitlines()] == ["identity"] * 2
