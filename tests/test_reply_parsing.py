"""The two parsers of a reply agree: `tokenizer.parse_response` (transformers' parser, driven by RESPONSE_TEMPLATE,
what TRL's GRPOTrainer(tools=...) reads rollouts with) and `tinyllm_hf.tokenizer.reply.parse_reply`."""

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl.chat_template_utils import parse_response as trl_parse_response

from tinyllm_hf.tokenizer import RESPONSE_TEMPLATE, apply_chat_template_to_tokenizer
from tinyllm_hf.tokenizer.chat_template import EOS_TOKEN, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START
from tinyllm_hf.tokenizer.reply import parse_reply

QUESTION = [{"role": "user", "content": "“画蛇添足”是什么意思？"}]


def call(name: str, **arguments) -> str:
    return TOOL_CALL_START + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_END


REPLIES = {  # name: (enable_thinking, generated text with its control tokens)
    "plain": (False, "比喻做了多余的事，反而不恰当。" + EOS_TOKEN),
    "plain_with_spaces": (False, " 正面 \n" + EOS_TOKEN),
    "empty": (False, EOS_TOKEN),
    "thinking": (True, "先想一想。\n" + THINK_END + "\n比喻多此一举。" + EOS_TOKEN),
    "thinking_opened_by_the_model": (False, THINK_START + "\n先想一想。\n" + THINK_END + "\n多此一举。" + EOS_TOKEN),
    "one_call": (False, call("idiom_lookup", word="画蛇添足") + EOS_TOKEN),
    "two_calls_after_text": (False, "我查一下。" + call("idiom_lookup", word="画蛇添足")
                             + call("calculator", expression="(3+4)*5") + EOS_TOKEN),
    "thinking_then_call": (True, "要查词典。\n" + THINK_END + "\n" + call("word_lookup", word="添") + EOS_TOKEN),
    "truncated_answer": (False, "比喻做了多余的"),
    "truncated_reasoning": (True, "先想一"),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer as saved by train_tokenizer and loaded back: the response template travels in the folder."""
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def transformers_parse(tokenizer, text: str, thinking: bool) -> dict:
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=thinking)
    return tokenizer.parse_response(tokenizer.encode(text), prefix=tokenizer.encode(prompt))


def test_saved_tokenizers_carry_the_response_template(tokenizer):
    assert tokenizer.response_template == RESPONSE_TEMPLATE
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert apply_chat_template_to_tokenizer(bare).response_template == RESPONSE_TEMPLATE


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_parse_response_agrees_with_parse_reply(tokenizer, name):
    thinking, text = REPLIES[name]
    ours = parse_reply(text, thinking=thinking)
    theirs = transformers_parse(tokenizer, text, thinking)
    assert ours["invalid_tool_calls"] == []
    assert theirs["role"] == "assistant"
    assert theirs.get("content", "") == ours["content"]
    assert theirs.get("reasoning_content") == ours["reasoning_content"]
    assert theirs.get("tool_calls", []) == ours["tool_calls"]


@pytest.mark.parametrize("text", [
    TOOL_CALL_START + '{"name": "idiom_lookup", "argu',   # cut off by the token budget
    TOOL_CALL_START + '{"name": idiom_lookup}' + TOOL_CALL_END + EOS_TOKEN,  # not JSON
])
def test_a_malformed_call_is_kept_by_parse_reply_and_dropped_by_trl(tokenizer, text):
    """Where the parsers part: parse_reply keeps the bad call in content and lists it as invalid; transformers' parser
    raises, and TRL then falls back to the text without control tokens and no tool call (nothing runs)."""
    ours = parse_reply(text)
    assert ours["tool_calls"] == [] and len(ours["invalid_tool_calls"]) == 1 and ours["content"].startswith(
        TOOL_CALL_START)
    with pytest.raises(ValueError):
        transformers_parse(tokenizer, text, thinking=False)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    fallback = trl_parse_response(tokenizer, tokenizer.encode(text), prefix=prompt_ids)
    assert "tool_calls" not in fallback and TOOL_CALL_START not in fallback["content"]
