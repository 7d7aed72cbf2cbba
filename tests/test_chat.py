"""`tinyllm chat`: streamed replies equal plain generation, multi-turn history, context trimming, commands."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.inference.chat import ChatSession, build_parser, load_chat_model, repl  # noqa: E402


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return load_chat_model(str(tiny_model_dir), device="cpu")


def greedy_session(runtime, **kwargs):
    return ChatSession(runtime, max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs)


def test_streamed_reply_equals_plain_generation_and_joins_the_history(runtime):
    model, tokenizer = runtime.model, runtime.tokenizer
    session = greedy_session(runtime)
    reply = "".join(session.stream("你好"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert reply == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert session.history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": reply}]


def test_second_turn_sees_the_first_and_the_system_prompt(runtime):
    session = greedy_session(runtime, system_prompt="你是老师。")
    first = "".join(session.stream("第一个问题"))
    prompt = runtime.tokenizer.decode(session.prompt_ids("第二个问题"))
    assert prompt == (f"<|system|>\n你是老师。\n<|user|>\n第一个问题\n<|assistant|>\n{first}<|endoftext|>"
                      "<|user|>\n第二个问题\n<|assistant|>\n")


def test_oldest_turns_are_dropped_when_the_context_is_full(runtime):
    session = greedy_session(runtime, max_new_tokens=200)  # 256-token context: ~56 left for the prompt
    session.history = [{"role": "user", "content": "很长的问题" * 8}, {"role": "assistant", "content": "很长的回答" * 8}]
    ids = session.prompt_ids("新问题")
    assert len(ids) + 200 <= 256 and session.history == []
    with pytest.raises(ValueError, match="the message is too long"):
        session.prompt_ids("太长了" * 100)


def test_repl_commands(runtime):
    session = greedy_session(runtime)
    lines = iter(["你好", "/system 你是诗人。", "/bogus", "再来", "/reset", "/exit", "never read"])
    out = []
    assert repl(session, read=lambda prompt: next(lines), write=out.append) == 0
    text = "".join(out)
    assert "system prompt: 你是诗人。" in text and "unknown command /bogus" in text and "new conversation" in text
    assert session.history == [] and session.system_prompt == "你是诗人。"
    assert next(lines) == "never read"  # /exit stopped the loop


def test_lora_adapter_folder_loads_on_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    model = load_chat_model(str(tmp_path), device="cpu").model
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model.eval()(ids).logits)


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert tinyllm(["chat", "--model", str(tmp_path / "nope")]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_default_reply_length_comes_from_the_model(runtime):
    """The reply may use the rest of the context after the prompt (a fixed 256 failed on a 256-token model)."""
    assert build_parser().parse_args(["--model", "m"]).max_new_tokens is None
    session = ChatSession(runtime)
    tokens = []
    session.runtime = _CountingRuntime(runtime, tokens)
    prompt_len = len(session.prompt_ids("你好"))
    reply = "".join(session.stream("你好"))
    assert session.history[-1]["content"] == reply
    # Every token but the last is fed back through one decode step: the reply filled the context exactly.
    assert len(tokens) + 1 == runtime.context_length - prompt_len
    with pytest.raises(ValueError, match=r"max_new_tokens \(256\) must be below the model's context \(256\)"):
        ChatSession(runtime, max_new_tokens=256)


class _CountingRuntime:
    """The runtime, with every decoded token recorded; EOS never ends the reply, so the whole budget is used."""

    eos_token_ids = frozenset()

    def __init__(self, runtime, tokens):
        self._runtime, self._tokens = runtime, tokens

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def decode(self, tokens, state):
        self._tokens += tokens
        return self._runtime.decode(tokens, state)
