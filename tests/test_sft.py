"""SFT: instruction-data loaders, the embedded default set, assistant-only labels, packing, LoRA and merging."""

import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinyllm_hf.data import sft as sft_data  # noqa: E402
from tinyllm_hf.data.sft import (  # noqa: E402
    MalformedRowError,
    build_default_sft,
    entities_answer,
    heldout_task_records,
    load_sft_dataset,
    to_messages,
)
from tinyllm_hf.tokenizer.chat_template import DEFAULT_SYSTEM_PROMPT  # noqa: E402

USER, ASSISTANT = {"role": "user", "content": "成语「画蛇添足」是什么意思？"}, {"role": "assistant", "content": "比喻多此一举。"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [USER, ASSISTANT]},
        {"conversations": [{"from": "human", "value": USER["content"]}, {"from": "gpt", "value": ASSISTANT["content"]}]},
        {"instruction": USER["content"], "input": "", "output": ASSISTANT["content"]},
        {"question": USER["content"], "answer": ASSISTANT["content"]},
    ],
    ids=["messages", "sharegpt", "alpaca", "qa"],
)
def test_every_format_normalises_to_the_same_messages(row):
    assert to_messages(row) == [USER, ASSISTANT]


def test_alpaca_input_and_system_fields_are_kept():
    row = {"system": "你是老师。", "instruction": "翻译成英文", "input": "你好", "output": "Hello"}
    assert to_messages(row) == [
        {"role": "system", "content": "你是老师。"},
        {"role": "user", "content": "翻译成英文\n你好"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_multi_turn_sharegpt_with_system():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    assert [m["role"] for m in to_messages(row)] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "x"}, "no known format"),
        ({"messages": [USER]}, "must end with an assistant"),
        ({"messages": [ASSISTANT, USER]}, "expected role 'user'"),
        ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "content is empty"),
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"messages": [USER, {"role": "system", "content": "x"}, ASSISTANT]}, "expected role 'assistant'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
        ({"question": "q", "answer": 3}, "field 'answer' must be a string"),
    ],
)
def test_malformed_rows_say_why(row, reason):
    with pytest.raises(MalformedRowError, match=reason):
        to_messages(row)


def test_malformed_jsonl_line_fails_with_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, "", "{not json", {"question": "q2"}])
    with pytest.raises(MalformedRowError, match=r"d\.jsonl:3: not valid JSON"):
        load_sft_dataset(str(path))


def test_malformed_rows_are_skipped_with_a_count_and_line_numbers(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, "{not json", {"question": "q2"},
                                              {"instruction": "i", "output": "o"}])
    with caplog.at_level(logging.WARNING, logger=sft_data.logger.name):
        dataset = load_sft_dataset(str(path), malformed="skip")
    assert len(dataset) == 2
    assert "skipped 2 malformed of 4 rows" in caplog.text
    assert "d.jsonl:2: not valid JSON" in caplog.text and "d.jsonl:3: no known format" in caplog.text


def test_json_list_files_and_folders_load(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q", "answer": "a"}]), encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"messages": [USER, ASSISTANT]}])
    dataset = load_sft_dataset(str(tmp_path))
    assert dataset.column_names == ["messages"] and len(dataset) == 2


def test_missing_file_and_unknown_hub_name_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="instruction data not found"):
        load_sft_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="loading it as a Hugging Face dataset failed"):
        load_sft_dataset("no-such-user/no-such-sft-dataset")


# --------------------------------------------------------------------------------------------------------------------
# The embedded default set
# --------------------------------------------------------------------------------------------------------------------


def test_entities_answer_lists_each_type():
    found = [{"text": "江泽民", "label": "person"}, {"text": "中共中央", "label": "organization"},
             {"text": "江泽民", "label": "person"}]
    assert entities_answer(found) == "人名：江泽民；地名：无；机构名：中共中央"


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
    from tinyllm_hf.evaluation.tasks import check_exact, prepare

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
