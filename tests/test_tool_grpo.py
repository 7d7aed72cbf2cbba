"""Tool-use GRPO (`tinyllm grpo --tools builtin`): TRL runs the policy's tool calls during generation, the rewards
judge the final answer and the calls."""

import functools
import json
import math
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import teach, tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tinyllm_hf import TinyllmForCausalLM  # noqa: E402
from tinyllm_hf.errors import UsageError  # noqa: E402
from tinyllm_hf.inference.tool_loop import Toolbox  # noqa: E402
from tinyllm_hf.tasks import build_prompt_dataset  # noqa: E402
from tinyllm_hf.tasks import tools as builtin_tools  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import TOOL_CALL_START  # noqa: E402
from tinyllm_hf.trainers import grpo  # noqa: E402
from tinyllm_hf.trainers.alignment import ToolArguments  # noqa: E402
from tinyllm_hf.trainers.rewards import (  # noqa: E402
    FormatReward,
    RewardArguments,
    ToolCallReward,
    build_rewards,
    completion_text,
)

CALL = {"type": "function", "function": {"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}}
FLAGS = ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
         "--loss_curve", "false", "--disable_tqdm", "true", "--seed", "0"]


def rollout(tool_calls: list[dict], answer: str | None) -> list[dict]:
    """A conversational completion as TRL hands it to the rewards: call turn, tool results, final answer."""
    messages = [{"role": "assistant", "content": "", "tool_calls": tool_calls}]
    messages += [{"role": "tool", "name": c["function"]["name"], "content": "结果"} for c in tool_calls]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny model taught (plain supervised steps on the assistant tokens) to answer an idiom question by calling
    idiom_lookup, then to answer after the result: a miniature tool-use SFT model."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Prompt (system turn with the tool list) + call + result + answer outgrow the conftest model's 256 positions.
    torch.manual_seed(0)
    model = TinyllmForCausalLM(tiny_config(tokenizer, max_position_embeddings=1024))
    schemas = Toolbox.builtin().schemas
    rows = []
    for row in build_prompt_dataset("train", ["idiom_meaning"], {"idiom_meaning": 4}):
        conversation = row["prompt"] + rollout([CALL], "多此一举。")
        conversation[-2]["content"] = builtin_tools.idiom_lookup("画蛇添足")
        encoded = tokenizer.apply_chat_template(conversation, tools=schemas, return_dict=True,
                                                return_assistant_tokens_mask=True)
        rows.append((encoded["input_ids"], [i if m else -100 for i, m in
                                            zip(encoded["input_ids"], encoded["assistant_masks"])]))
    loss = teach(model, rows, tokenizer.pad_token_id, steps=60)
    assert loss < 0.3, loss
    path = tmp_path_factory.mktemp("tool-sft") / "sft"
    model.save_pretrained(path)
    shutil.copytree(tiny_tokenizer_dir, path, dirs_exist_ok=True)
    return path


def test_grpo_with_builtin_tools_runs_the_calls_during_generation(tool_model_dir, tmp_path, monkeypatch):
    calls = []

    @functools.wraps(builtin_tools.idiom_lookup)
    def counting_lookup(word: str) -> str:
        calls.append(word)
        return builtin_tools.idiom_lookup(word)

    monkeypatch.setitem(builtin_tools.BUILTIN_TOOLS, "idiom_lookup", counting_lookup)
    output = tmp_path / "grpo-tools"
    code = grpo.main(["--model_name_or_path", str(tool_model_dir), "--output_dir", str(output), "--tools", "builtin",
                      "--tasks", "idiom_meaning", "--task_sizes", "idiom_meaning=4",
                      "--rewards", "correctness,format,tool_call", "--reward_weights", "1.0", "0.2", "0.5",
                      "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "4",
                      "--max_completion_length", "160", *FLAGS])
    assert code == 0
    assert calls, "the policy's idiom_lookup calls never ran"
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "reward" in entry]
    assert len(steps) == 2
    for step in steps:
        assert step["tools/call_frequency"] > 0
        for name in ("correctness_reward", "format_reward", "tool_call_reward"):
            assert math.isfinite(step[f"rewards/{name}/mean"])
    assert max(step["rewards/tool_call_reward/mean"] for step in steps) > 0
    AutoModelForCausalLM.from_pretrained(output)
    assert AutoTokenizer.from_pretrained(output).response_template is not None


def test_tool_call_reward_is_the_share_of_calls_that_can_run(tokenizer):
    reward = ToolCallReward(tokenizer, Toolbox.builtin())
    start = tokenizer.convert_tokens_to_ids(TOOL_CALL_START)
    unknown = {"type": "function", "function": {"name": "weather", "arguments": {}}}
    bad_arguments = {"type": "function", "function": {"name": "calculator", "arguments": {"expr": "1+1"}}}
    completions = [rollout([CALL], "多此一举"), rollout([CALL, unknown], "x"), rollout([bad_arguments], "x"),
                   [{"role": "assistant", "content": "多此一举"}],
                   [{"role": "assistant", "content": "坏的调用"}]]  # TRL dropped a malformed call: only its token shows
    ids = [[start, 1], [start, 1, start], [start], [1, 2], [start, 2]]
    assert reward(completions=completions, completion_ids=ids) == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_rewards_judge_the_final_answer_after_the_tool_results(tokenizer):
    assert completion_text(rollout([CALL], "多此一举")) == "多此一举"
    assert completion_text(rollout([CALL], None)) == ""  # cut off after the tool result: no answer
    assert completion_text([{"role": "assistant", "content": "", "tool_calls": [CALL]}]) == ""
    fmt = FormatReward(tokenizer)
    answer = tokenizer.encode("多此一举。") + [tokenizer.eos_token_id]
    call_turn = tokenizer.encode(TOOL_CALL_START + "{}</tool_call><|endoftext|>")
    suffix = tokenizer.encode("<|tool|>\n结果\n<|assistant|>\n")
    completions = [rollout([CALL], "多此一举。")] * 2
    ids = [call_turn + suffix + answer, call_turn + suffix + tokenizer.encode("多此一举")]  # the second is cut off
    assert fmt(completions=completions, completion_ids=ids) == [1.0, 0.0]


def test_tool_options_are_checked():
    with pytest.raises(UsageError, match="unknown tool set"):
        ToolArguments(tools="all")
    with pytest.raises(UsageError, match="tool_call reward needs tools"):
        build_rewards(RewardArguments(rewards="tool_call"), tokenizer=None)
    assert ToolArguments().toolbox() is None


def test_toolbox_functions_keep_their_schema_and_refuse_bad_calls():
    from transformers.utils import get_json_schema

    toolbox = Toolbox.builtin()
    functions = {f.__name__: f for f in toolbox.as_functions()}
    assert [get_json_schema(f) for f in functions.values()] == [
        get_json_schema(f) for f in builtin_tools.BUILTIN_TOOLS.values()]
    assert functions["calculator"](expression="(3+4)*5") == "35"
    assert functions["calculator"](expr="1") == toolbox.call("calculator", {"expr": "1"})[0]
    assert toolbox.refusal("calculator", {"expr": "1"})[1] == "bad arguments"
    assert toolbox.refusal("calculator", "1+1")[1] == "bad arguments"
    assert toolbox.refusal("calculator", {"expression": "1"}) is None
