"""SFT: instruction-data loaders, assistant-only labels, packing, LoRA and merging (the default set: test_tasks.py)."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.data import sft as sft_data  # noqa: E402
from tinyllm_hf.data.sft import load_sft_dataset, to_conversation, to_messages  # noqa: E402
from tinyllm_hf.errors import MalformedRowError  # noqa: E402
from tinyllm_hf.tasks import parse_task_sizes  # noqa: E402
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
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "got 'tool' \\(a tool result follows"),
        ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
                       ASSISTANT]}, "expected role 'tool'"),
        ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
         "ends before the results"),
        ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{bad"}}]}]}, "arguments of tool call 'f' are not valid JSON"),
        ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]},
         "needs a function name"),
        ({"messages": [USER, ASSISTANT], "tools": "[{"}, "'tools' is not valid JSON"),
        ({"messages": [USER, ASSISTANT], "tools": [{"type": "function", "function": {"name": "has space"}}]},
         "'tools': .*letters, digits"),
        ({"messages": [USER, {"role": "system", "content": "x"}, ASSISTANT]}, "expected role 'assistant'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
        ({"question": "q", "answer": 3}, "field 'answer' must be a string"),
    ],
)
def test_malformed_rows_say_why(row, reason):
    with pytest.raises(MalformedRowError, match=reason):
        to_conversation(row)


LOOKUP_TOOL = {"name": "idiom_lookup", "description": "查成语",
               "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}
RESULT = "比喻做了多余的事。"
TOOL_ROWS = [
    # OpenAI / TRL messages: null content with the calls, arguments as a JSON string, a tool_call_id
    {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": "idiom_lookup", "arguments": '{"word": "画蛇添足"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": RESULT}, {"role": "assistant", "content": RESULT}],
     "tools": [{"type": "function", "function": LOOKUP_TOOL}]},
    # LLaMA-Factory's sharegpt: function_call / observation turns, tools as a JSON string of bare functions
    {"conversations": [{"from": "human", "value": USER["content"]},
                       {"from": "function_call", "value": '{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}'},
                       {"from": "observation", "value": RESULT}, {"from": "gpt", "value": RESULT}],
     "tools": json.dumps([LOOKUP_TOOL], ensure_ascii=False)},
]


def test_tool_conversations_in_either_format_load_the_same_and_train_on_the_call_and_answer(tiny_tokenizer_dir,
                                                                                           tmp_path):
    from transformers import AutoTokenizer

    from tinyllm_hf.trainers.sft import encode_conversations

    dataset = load_sft_dataset(str(write_jsonl(tmp_path / "tools.jsonl", [*TOOL_ROWS, {"messages": [USER, ASSISTANT]}])))
    openai_row, sharegpt_row, plain = dataset
    assert openai_row == sharegpt_row and plain["tools"] is None
    assert [m["role"] for m in openai_row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(openai_row["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"word": "画蛇添足"}
    assert json.loads(openai_row["tools"])[0]["function"]["name"] == "idiom_lookup"

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    encoded = encode_conversations(dataset.select([0]), tokenizer, None)[0]
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    spans = labelled_spans([t if m else -100 for t, m in zip(ids, mask)])
    # The loss is on the call and on the answer (each with its <|endoftext|>), never on the tool's result.
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == [
        '<tool_call>{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}</tool_call><|endoftext|>',
        RESULT + "<|endoftext|>"]
    text = tokenizer.decode(ids)
    assert "<|tools|>" in text and "idiom_lookup" in text.split("<|user|>")[0]  # the schemas in the system turn


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
    assert dataset.column_names == ["messages", "tools"] and len(dataset) == 2 and dataset["tools"] == [None, None]


def test_json_lines_in_a_json_file_load_as_belle_publishes_them(tmp_path):
    """BelleGroup/train_0.5M_CN's Belle_open_source_0.5M.json is JSON lines (instruction, input, output) despite
    its suffix; a folder downloaded from the Hub loads as the Hub dataset does, bad lines named by line number."""
    rows = [{"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"},
            {"instruction": "写一个成语", "input": "", "output": "画蛇添足"}]
    path = tmp_path / "Belle_open_source_0.5M.json"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) + "{broken\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match=r"Belle_open_source_0\.5M\.json:3: not valid JSON"):
        load_sft_dataset(str(tmp_path))
    dataset = load_sft_dataset(str(tmp_path), malformed="skip")
    assert [m["content"] for m in dataset[1]["messages"]] == ["写一个成语", "画蛇添足"]
    assert dataset[0]["messages"][0]["content"].startswith("把这句话翻译成英文") and len(dataset) == 2


def test_missing_file_and_unknown_hub_name_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="instruction data not found"):
        load_sft_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="loading it as a Hugging Face dataset failed"):
        load_sft_dataset("no-such-user/no-such-sft-dataset")


# --------------------------------------------------------------------------------------------------------------------
# Trainer: assistant-only labels, multi-turn, packing
# --------------------------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "system", "content": "你是老师。"}, {"role": "user", "content": "这本书好看吗？"},
     {"role": "assistant", "content": "很好看"}, {"role": "user", "content": "为什么？"},
     {"role": "assistant", "content": "故事感人"}],
    [{"role": "user", "content": "房间很干净"}, {"role": "assistant", "content": "正面"}],
]


def sft_trainer(model_dir, tmp_path, **config):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tinyllm_hf.trainers.sft import TinyllmSFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, max_length=128, bf16=False,
                     activation_checkpointing=False, use_cpu=True, report_to=[], per_device_train_batch_size=2,
                     save_strategy="no", dataloader_num_workers=0, **{"max_steps": 1, **config})
    return TinyllmSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"messages": CONVERSATIONS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def labelled_spans(labels):
    """[(start, end), ...] of the runs of positions whose label is not -100."""
    spans, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_loss_is_on_assistant_answers_and_their_eos_only(tiny_model_dir, tmp_path):
    trainer = sft_trainer(tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    spans = labelled_spans(labels)
    # Exactly the two answers carry loss, each with its closing <|endoftext|>; labels equal the tokens there.
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["很好看<|endoftext|>", "故事感人<|endoftext|>"]
    assert all(ids[b - 1] == tokenizer.eos_token_id for _, b in spans)
    assert all(labels[i] == ids[i] for a, b in spans for i in range(a, b))
    # Everything else (system prompt, user turns, role headers) is masked.
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert masked == "<|system|>\n你是老师。\n<|user|>\n这本书好看吗？\n<|assistant|>\n<|user|>\n为什么？\n<|assistant|>\n"
    # A conversation without a system message is trained under the default system prompt, also masked.
    second = trainer.train_dataset[1]
    masked = tokenizer.decode([t for t, label in zip(second["input_ids"], second["labels"]) if label == -100])
    assert masked.startswith(f"<|system|>\n{DEFAULT_SYSTEM_PROMPT}\n<|user|>\n房间很干净")

    # The collator pads with -100 and keeps the labels of every row.
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    n = len(second["labels"])
    assert batch["labels"][1, :n].tolist() == second["labels"] and (batch["labels"][1, n:] == -100).all()
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_packed_conversations_keep_their_labels_and_do_not_see_each_other(tiny_model_dir, tmp_path):
    trainer = sft_trainer(tiny_model_dir, tmp_path, packing=True)
    assert len(trainer.train_dataset) == 1  # both conversations fit one 128-token row
    batch = trainer.data_collator([trainer.train_dataset[0]])
    unpacked = sft_trainer(tiny_model_dir, tmp_path).train_dataset
    lengths = [len(row["input_ids"]) for row in unpacked]
    assert sorted(trainer.train_dataset[0]["seq_lengths"]) == sorted(lengths)
    assert (batch["labels"] != -100).sum() == sum(sum(label != -100 for label in row["labels"]) for row in unpacked)
    # Positions restart at each conversation, so attention stays within it: each packed conversation gets exactly
    # the logits it gets alone.
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for length in trainer.train_dataset[0]["seq_lengths"]:
            alone = model(input_ids=batch["input_ids"][:, start : start + length]).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-4)
            start += length


def test_training_steps_never_build_the_full_logits(tiny_model_dir, tmp_path):
    """A Tinyllm model's training steps take the loss from the hidden states (`HiddenStateLossMixin`): no step runs the
    (tokens, vocab) head projection of the model, and TRL's entropy / token-accuracy metrics (which need every
    position's full softmax) are not logged."""
    trainer = sft_trainer(tiny_model_dir, tmp_path, max_steps=2, logging_steps=1)
    head = trainer.model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert calls == [] and len(logged) == 2 and not any("mean_token_accuracy" in e for e in logged)
    trainer.model.eval()
    ids = torch.tensor([[5, 6, 7]])
    assert trainer.model(input_ids=ids).logits.shape[-1] == trainer.model.config.vocab_size and calls  # generation path


def test_training_loss_and_gradients_equal_trls_fused_head(tiny_model_dir, tmp_path):
    """The loss from the hidden states at labelled positions only (padding and prompts skipped on a CPU) has the
    value and every gradient of TRL's own SFT loss on the same padded batch."""
    from trl import SFTTrainer

    trainer = sft_trainer(tiny_model_dir, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"] == -100).float().mean() > 0.3  # enough prompt and padding for the selection to matter
    model = trainer.model.train()

    def loss_and_grads(compute_loss):
        model.zero_grad()
        loss = compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(27))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, expected_grads = loss_and_grads(lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k))
    got, got_grads = loss_and_grads(trainer.compute_loss)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# `tinyllm sft` end to end with LoRA, `tinyllm merge`
# --------------------------------------------------------------------------------------------------------------------


def belle_rows(count: int) -> list[dict]:
    """Rows in the schema of BelleGroup/train_0.5M_CN as the Hub publishes it (JSON lines: instruction, input, output)."""
    from conftest import review_lines

    lines = review_lines(600)
    return [{"instruction": "这条评论是正面的还是负面的？", "input": lines[i][:40], "output": "正面" if i < 300 else "负面"}
            for i in range(0, 600, 600 // count)]


def test_sft_data_is_built_and_tokenized_once_then_loaded_on_restart(tiny_model_dir, tmp_path, monkeypatch):
    """The second start (a restart, or any rank after the main process) neither converts the rows nor tokenizes the
    conversations again, and trains on the same token ids; changed data builds again."""
    import datasets

    from tinyllm_hf.data.on_disk import CACHE_DIR
    from tinyllm_hf.trainers import sft

    calls = {"build": 0, "encode": 0}
    build, encode = sft.build_datasets, sft.encode_conversations

    def counting_build(*args, **kwargs):
        calls["build"] += 1
        return build(*args, **kwargs)

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(sft, "build_datasets", counting_build)
    monkeypatch.setattr(sft, "encode_conversations", counting_encode)
    data = write_jsonl(tmp_path / "belle.jsonl", belle_rows(20))
    output = tmp_path / "sft"

    def run() -> list[list[int]]:
        assert sft.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output), "--dataset_name",
                         str(data), "--eval_fraction", "0.2", "--max_steps", "1", "--per_device_train_batch_size", "2",
                         "--max_length", "128", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
                         "--loss_curve", "false", "--peak_flops", "1e11"]) == 0
        folders = sorted((output / CACHE_DIR).glob("sft-tokens-train-*"))
        return [datasets.load_from_disk(str(f))["input_ids"] for f in folders]

    first = run()
    assert calls == {"build": 1, "encode": 2}  # the conversations once; tokens for train and validation
    second = run()
    assert calls == {"build": 1, "encode": 2} and second == first and len(first) == 1
    # The saved tokens are what the conversations encode to.
    from transformers import AutoTokenizer

    conversations = datasets.load_from_disk(str(next((output / CACHE_DIR).glob("sft-conversations-*"))))["train"]
    assert first[0] == encode(conversations, AutoTokenizer.from_pretrained(tiny_model_dir), None)["input_ids"]

    write_jsonl(data, belle_rows(30))  # new inputs: built and tokenized again
    run()
    assert calls == {"build": 2, "encode": 4}


def lora_run(model_dir, output_dir) -> int:
    from tinyllm_hf.trainers import sft

    return sft.main([
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--dataset_name", "default",
        "--sft_tasks", "sentiment,identity", "--task_sizes", "sentiment=16,identity=4", "--max_eval_samples", "4",
        "--heldout_eval_sizes", "sentiment=2", "--use_peft", "true", "--lora_r", "4", "--learning_rate", "0.05",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "128", "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--loss_curve", "false", "--peak_flops", "1e11",
    ])


def test_lora_sft_saves_a_peft_adapter_that_merges_to_the_same_outputs(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyllm_hf.trainers import merge
    from tinyllm_hf.trainers.sft import GENERATION_DEFAULTS

    adapter = tmp_path / "adapter"
    assert lora_run(tiny_model_dir, adapter) == 0
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    results = json.loads((adapter / "heldout_results.json").read_text())
    assert results["per_task"]["sentiment"]["n"] == 2
    assert (adapter / "heldout_tasks.jsonl").is_file()
    # The measured sampling defaults (docs/sft.md) ship with the adapter, beside the end-of-turn token that stops
    # generation.
    eos = AutoTokenizer.from_pretrained(adapter).eos_token_id
    generation = json.loads((adapter / "generation_config.json").read_text())
    assert GENERATION_DEFAULTS and {key: generation.get(key) for key in GENERATION_DEFAULTS} == GENERATION_DEFAULTS
    assert generation["eos_token_id"] == eos

    merged_dir = tmp_path / "merged"
    assert merge.main(["--adapter", str(adapter), "--output", str(merged_dir), "--base", str(tiny_model_dir)]) == 0
    assert not (merged_dir / "adapter_config.json").exists()
    merged_generation = json.loads((merged_dir / "generation_config.json").read_text())  # the adapter's, not the base's
    assert {key: merged_generation.get(key) for key in GENERATION_DEFAULTS} == GENERATION_DEFAULTS
    assert merged_generation["eos_token_id"] == eos
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the adapter learned something, so the check means something
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)


def test_merge_rejects_a_folder_without_an_adapter(tiny_model_dir, tmp_path, capsys):
    assert tinyllm(["merge", "--adapter", str(tiny_model_dir), "--output", str(tmp_path / "m")]) == 1
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_qlora_without_bitsandbytes_or_cuda_says_so(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine may run QLoRA")
    code = tinyllm(["sft", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--use_peft", "true",
                     "--load_in_4bit", "true", "--use_cpu", "true"])
    assert code == 1
    assert "needs bitsandbytes on a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(str(p) for p in (Path(__file__).parents[1] / "recipes" / "sft").glob("*.yaml")))
def test_every_sft_recipe_parses(recipe):
    from trl import ModelConfig, SFTConfig

    from tinyllm_hf.trainers.common import parse_recipe
    from tinyllm_hf.trainers.sft import DEFAULTS, SFTDataArguments

    # use_cpu: the GPU recipes ask for bf16, which SFTConfig refuses on a machine without a GPU unless told it is a CPU run.
    model_args, data_args, args, _ = parse_recipe([ModelConfig, SFTDataArguments, SFTConfig], ["--config", recipe, "--use_cpu", "true"],
                                                  defaults=DEFAULTS)
    assert args.assistant_only_loss and model_args.model_name_or_path and data_args.sources
    parse_task_sizes(data_args.task_sizes), parse_task_sizes(data_args.heldout_eval_sizes)
