"""Tool use and thinking: the chat format, the reply parser, the built-in tools, the tool loop, tool-use SFT data,
evaluation with tools and `tinyllm chat`'s tool calls."""

import json
import os

import pytest
from scripted_runtime import ScriptedRuntime
from transformers import AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinyllm_hf.evaluation.tasks import evaluate_tasks  # noqa: E402
from tinyllm_hf.inference.chat import ChatSession  # noqa: E402
from tinyllm_hf.inference.runtime import SamplingParams  # noqa: E402
from tinyllm_hf.inference.tool_loop import Toolbox, check_tool_schemas, run_tool_loop  # noqa: E402
from tinyllm_hf.tasks import TASKS, build_default_sft, heldout_task_records  # noqa: E402
from tinyllm_hf.tasks.tools import calculator, idiom_lookup, word_lookup, xiehouyu_lookup  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import SPECIAL_TOKENS, apply_chat_template_to_tokenizer  # noqa: E402
from tinyllm_hf.tokenizer.reply import parse_reply  # noqa: E402

CALL = '<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


def call_text(name: str, **arguments) -> str:
    return CALL.format(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def toolbox():
    return Toolbox.builtin()


def lookup_conversation(word="画蛇添足"):
    result = idiom_lookup(word)
    return [
        {"role": "user", "content": f"成语「{word}」是什么意思？"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "idiom_lookup", "arguments": {"word": word}}}]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": result},
    ]


# --- chat format -----------------------------------------------------------------------------------------------------

def test_tool_conversation_renders_the_tool_list_calls_and_results(tokenizer, toolbox):
    messages = lookup_conversation()
    rendered = tokenizer.apply_chat_template(messages, tools=toolbox.schemas, tokenize=False)
    result = idiom_lookup("画蛇添足")
    assert rendered.startswith("<|system|>\n你是一个乐于助人的中文助手。\n<|tools|>\nidiom_lookup(word: string): 查成语的解释。\n")
    assert "calculator(expression: string): 计算算术式。\n<|user|>\n" in rendered
    assert rendered.endswith(
        '<|assistant|>\n<tool_call>{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}</tool_call><|endoftext|>'
        f"<|tool|>\n{result}\n<|assistant|>\n{result}<|endoftext|>")
    # A call with JSON-string arguments (the OpenAI form) renders the same.
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"word": "画蛇添足"}'
    assert tokenizer.apply_chat_template(messages, tools=toolbox.schemas, tokenize=False) == rendered
    # Every control string is one token.
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    for token in SPECIAL_TOKENS[5:9]:
        assert tokenizer.convert_tokens_to_ids(token) in ids


def test_generation_mask_covers_calls_and_answers_never_tool_results(tokenizer, toolbox):
    messages = lookup_conversation()
    out = tokenizer.apply_chat_template(messages, tools=toolbox.schemas, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m],
                               skip_special_tokens=False)
    result = idiom_lookup("画蛇添足")
    assert trained == ('<tool_call>{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}</tool_call><|endoftext|>'
                       f"{result}<|endoftext|>")


def test_thinking_switch_is_the_prompt(tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) == plain
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking == plain + "<think>\n"
    answered = messages + [{"role": "assistant", "content": "你好！", "reasoning_content": "打个招呼。"}]
    full = tokenizer.apply_chat_template(answered, tokenize=False)
    assert full.startswith(thinking) and full.endswith("<think>\n打个招呼。\n</think>\n你好！<|endoftext|>")
    # The model learns to write the reasoning and what follows, never to open <think> itself.
    out = tokenizer.apply_chat_template(answered, return_dict=True, return_assistant_tokens_mask=True)
    trained = tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m],
                               skip_special_tokens=False)
    assert trained == "打个招呼。\n</think>\n你好！<|endoftext|>"


def test_a_tokenizer_from_before_the_tool_tokens_gets_them():
    """SFT with tool data on a model pretrained before the tool tokens existed: the tokens are added after the vocabulary."""
    from conftest import review_lines
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE
    from tinyllm_hf.tokenizer.train import new_byte_level_bpe
    from tinyllm_hf.trainers.sft import add_tool_tokens

    backend = new_byte_level_bpe()
    backend.train_from_iterator(review_lines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS[:5], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    old = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  chat_template=CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="lacks the special tokens"):
        apply_chat_template_to_tokenizer(old)
    assert add_tool_tokens(old) == SPECIAL_TOKENS[5:]
    assert len(old) == 406 and [old.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[5:]] == list(range(400, 406))
    assert old("<tool_call>好</tool_call>", add_special_tokens=False).input_ids[0] == 402
    assert add_tool_tokens(old) == []  # nothing more to add


# --- parsing replies -------------------------------------------------------------------------------------------------

def test_parse_reply_reads_calls_reasoning_and_keeps_what_does_not_parse():
    one = parse_reply(call_text("idiom_lookup", word="画蛇添足") + "<|endoftext|>")
    assert one["content"] == "" and one["tool_calls"] == [
        {"type": "function", "function": {"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}}]
    two = parse_reply("我查一下。" + call_text("calculator", expression="1+1") + call_text("word_lookup", word="好"))
    assert two["content"] == "我查一下。" and [c["function"]["name"] for c in two["tool_calls"]] == ["calculator",
                                                                                                   "word_lookup"]
    thought = parse_reply("想一想\n</think>\n答案<|endoftext|>", thinking=True)
    assert (thought["reasoning_content"], thought["content"]) == ("想一想", "答案")
    assert parse_reply("还没想完", thinking=True)["reasoning_content"] == "还没想完"
    plain = parse_reply("就是这样。<|endoftext|>")
    assert plain == {"role": "assistant", "content": "就是这样。", "reasoning_content": None, "tool_calls": [],
                     "invalid_tool_calls": []}
    for text, error in [('<tool_call>{"name": "idiom_lookup", "argu', "cut off"),
                        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
                        ('<tool_call>{"arguments": {}}</tool_call>', "no function name"),
                        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "not a JSON object")]:
        reply = parse_reply(text)
        assert reply["tool_calls"] == [] and reply["content"] == text  # nothing the model wrote is lost
        assert error in reply["invalid_tool_calls"][0]["error"]


# --- the built-in tools ----------------------------------------------------------------------------------------------

def test_builtin_lookups_answer_from_the_dictionaries_and_say_when_not_found():
    from tinyllm_hf.tasks.tools import xiehouyu_answers

    idiom = next(r for r in TASKS["idiom_meaning"].records("heldout") if r["explanation"])
    assert idiom_lookup(f"「{idiom['word']}」") == idiom["explanation"]  # held-out items are in the dictionary too
    assert idiom_lookup("不存在的成语") == "未找到成语「不存在的成语」。"
    assert word_lookup("好").startswith("「好」读 hǎo，意思是：")
    assert word_lookup("没有这个词语") == "未找到词语「没有这个词语」。"
    riddle = next(r for r in TASKS["xiehouyu"].records("train") if len(xiehouyu_answers(r["riddle"])) > 1)
    assert xiehouyu_lookup(riddle["riddle"]) == "；".join(xiehouyu_answers(riddle["riddle"]))


@pytest.mark.parametrize("expression,expected", [
    ("(3+4)*5", "35"), ("7÷2", "3.5"), ("12×7+3=", "87"), ("2^10", "1024"), ("-3 % 2", "1"), ("1/3", "0.3333333333"),
    ("1/0", "计算错误：除数不能为零。"), ("2**1000", "计算错误：指数太大（最多 64）。"),
    ("__import__('os').system('id')", "计算错误：只能计算数字和"), ("[1]*10**9", "计算错误：只能计算数字和"),
    ("9" * 300, "计算错误：表达式太长"), ("1+" * 40 + "1", "计算错误：表达式太复杂"), ("", "计算错误：表达式为空"),
    ("(10**30)*(10**30)", "计算错误：结果太大"),
])
def test_calculator_is_safe_and_bounded(expression, expected):
    assert calculator(expression).startswith(expected)


def test_toolbox_turns_every_failure_into_a_result(toolbox):
    def broken(text: str) -> str:
        """Always fails.

        Args:
            text: anything
        """
        raise RuntimeError("boom")

    def slow(text: str) -> str:
        """Never answers in time.

        Args:
            text: anything
        """
        import time

        time.sleep(2)
        return text

    box = Toolbox({"broken": broken, "slow": slow}, timeout=0.2)
    assert box.call("broken", {"text": "x"}) == ("错误：broken 出错：RuntimeError: boom。", "tool raised")
    assert box.call("slow", {"text": "x"})[1] == "timeout"
    assert box.call("nope", {})[1] == "unknown tool"
    assert box.call("broken", {})[0] == "错误：broken 的参数不对：缺少参数 text。"
    assert box.call("broken", {"text": 3})[0] == "错误：broken 的参数不对：参数 text 应为 string，收到 int。"
    assert box.call("broken", {"text": "x", "extra": 1})[1] == "bad arguments"
    assert toolbox.call("calculator", {"expression": "6*7"}) == ("42", None)


@pytest.mark.parametrize("tools,message", [
    ({"type": "function"}, "must be a list"),
    ([{"type": "function"}], "tools\\[0\\] must be an object with type 'function'"),
    ([{"type": "function", "function": {"name": "has space"}}], "letters, digits"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "of type 'object'"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}], "twice"),
])
def test_invalid_tool_schemas_are_refused(tools, message):
    with pytest.raises(ValueError, match=message):
        check_tool_schemas(tools)


# --- the tool loop ---------------------------------------------------------------------------------------------------

def greedy(n):
    return [SamplingParams(1, temperature=0.0) for _ in range(n)]


def test_tool_loop_calls_feeds_back_and_answers(tokenizer, toolbox):
    result = idiom_lookup("画蛇添足")
    runtime = ScriptedRuntime(tokenizer, {
        "画蛇添足": [call_text("idiom_lookup", word="画蛇添足"), result],
        "你好": ["你好！"],
        "循环": [call_text("calculator", expression="1+1")],  # never stops calling
        "坏": ['<tool_call>{"name": "idiom_lookup"', "不会用到"],
        "未知": [call_text("no_such_tool", x=1), "没有这个工具。"],
    })
    conversations = [[{"role": "user", "content": q}] for q in
                     ("成语「画蛇添足」是什么意思？", "你好", "循环", "坏", "未知")]
    done = run_tool_loop(runtime, conversations, toolbox, greedy(5), max_tokens=300, max_rounds=2)
    lookup, hello, loop, bad, unknown = done
    assert lookup.finish_reason == "stop" and lookup.content == result
    assert [(c.name, c.arguments, c.result) for c in lookup.calls] == [("idiom_lookup", {"word": "画蛇添足"}, result)]
    assert [m["role"] for m in lookup.messages] == ["assistant", "tool", "assistant"]
    # The second round's prompt is the conversation so far, rendered with the tools: the model reads the result.
    assert any(p.endswith(f"<|tool|>\n{result}\n<|assistant|>\n") for p in runtime.prompts)
    assert hello.finish_reason == "stop" and hello.content == "你好！" and hello.calls == []
    assert loop.finish_reason == "tool_rounds" and len(loop.calls) == 3  # max_rounds=2: rounds 0, 1 and 2 called
    assert bad.finish_reason == "stop" and bad.content == '<tool_call>{"name": "idiom_lookup"'
    assert bad.reply["invalid_tool_calls"] and bad.calls == []
    assert unknown.calls[0].error == "unknown tool" and unknown.content == "没有这个工具。"


def test_tool_loop_stops_a_reply_past_its_time_limit(tokenizer):
    """A model that keeps calling a slow tool, and one whose reply is slow to generate: each ends with finish_reason
    "time" once max_seconds is spent, keeping what it wrote; a reply cut mid-call runs nothing."""
    import time

    from tinyllm_hf.inference.runtime import stream_batch
    from tinyllm_hf.inference.tool_loop import UsageError

    def calculator(expression: str) -> str:  # the name the scripted model calls
        """Adds slowly.

        Args:
            expression: what to add
        """
        time.sleep(0.2)
        return "2"

    slow = Toolbox({"calculator": calculator})
    calling = ScriptedRuntime(tokenizer, {"循环": [call_text("calculator", expression="1+1")]})
    started = time.monotonic()
    (done,) = run_tool_loop(calling, [[{"role": "user", "content": "循环"}]], slow, greedy(1), max_tokens=300,
                            max_rounds=50, max_seconds=0.5)
    assert done.finish_reason == "time" and 1 <= len(done.calls) <= 4  # 0.2 s a call, checked after each round
    assert time.monotonic() - started < 5.0  # 50 rounds would take 10 s

    def slow_round(prompts, params):
        for row, token in stream_batch(writing, prompts, params):
            time.sleep(0.05)
            yield row, token

    writing = ScriptedRuntime(tokenizer, {"写": ["先查一下：" + call_text("calculator", expression="1+1")]})
    (cut,) = run_tool_loop(writing, [[{"role": "user", "content": "写"}]], slow, greedy(1), max_tokens=300,
                           generate_round=slow_round, max_seconds=0.3)
    assert cut.finish_reason == "time" and cut.calls == [] and cut.content  # the text so far is kept
    assert len(writing.encode(cut.content)) < len(writing.encode("先查一下：" + call_text("calculator", expression="1+1")))
    with pytest.raises(UsageError, match="max_seconds"):
        run_tool_loop(writing, [[{"role": "user", "content": "写"}]], slow, greedy(1), max_seconds=0)


def test_tool_loop_without_tools_and_when_the_context_is_full(tokenizer, toolbox):
    runtime = ScriptedRuntime(tokenizer, {"问": [call_text("calculator", expression="1+1")]})
    (done,) = run_tool_loop(runtime, [[{"role": "user", "content": "问"}]], None, greedy(1), max_tokens=64)
    assert done.finish_reason == "stop" and "<|tools|>" not in runtime.prompts[-1]
    assert done.reply["tool_calls"]  # parsed, but with no toolbox nothing runs
    tiny = ScriptedRuntime(tokenizer, {"问": ["答"]}, context_length=8)
    (full,) = run_tool_loop(tiny, [[{"role": "user", "content": "问"}]], toolbox, greedy(1))
    assert full.finish_reason == "context" and full.messages == []


# --- tool-use SFT data -----------------------------------------------------------------------------------------------

def test_tool_use_sft_rows_call_the_right_tool_and_keep_heldout_items_out():
    sizes = {"idiom_meaning": 30, "xiehouyu": 30, "not_found": 4, "calculator": 4, "direct": 6, "multi_turn": 3,
             "thinking": 3}
    train = build_default_sft("train", tasks=[], tool_sizes=sizes)
    assert len(train) == sum(sizes.values())
    heldout_ids = {r["id"] for name in ("idiom_meaning", "xiehouyu") for r in TASKS[name].records("heldout")}
    by_task = {}
    for row in train:
        by_task.setdefault(row["task"], []).append(row)
        assert json.loads(row["tools"])[0]["function"]["name"] == "idiom_lookup"
        assert not set(row["id"].split("+")) & heldout_ids
    for row in by_task["idiom_meaning"] + by_task["xiehouyu"]:
        user, call, tool, answer = row["messages"]
        function = call["tool_calls"][0]["function"]
        assert function["name"] == TASKS[row["task"]].tool
        assert tool["content"] == Toolbox.builtin().call(function["name"], json.loads(function["arguments"]))[0]
        assert answer["content"] == tool["content"]
    assert all(row["messages"][-1]["content"].startswith("抱歉，未找到") for row in by_task["not_found"])
    assert all(len(row["messages"]) == 2 for row in by_task.get("sentiment", []) + by_task.get("identity", []))
    assert all(len(row["messages"]) == 8 for row in by_task["multi_turn"])
    assert all(row["messages"][1]["reasoning_content"] for row in by_task["thinking"])
    with pytest.raises(ValueError, match="unknown kind 'poems'"):
        build_default_sft("train", tasks=[], tool_sizes={"poems": 3})


def test_heldout_records_accept_every_right_answer_and_name_the_expected_call():
    records = heldout_task_records(["xiehouyu", "sentiment"], {"xiehouyu": 40, "sentiment": 2})
    riddles = [r for r in records if r["task"] == "xiehouyu"]
    several = next(r for r in riddles if len(r["answer"]) > 2)
    riddle = several["tool_call"]["arguments"]["riddle"]
    assert several["answer"][-1] == xiehouyu_lookup(riddle) and several["messages"][-1]["content"] in several["answer"]
    assert all("tool_call" not in r for r in records if r["task"] == "sentiment")


def test_tool_format_texts_shorten_the_tool_format(tmp_path):
    from conftest import review_lines

    from tinyllm_hf.tasks.tool_use import tool_format_texts
    from tinyllm_hf.tokenizer.train import train_tokenizer

    plain = train_tokenizer(review_lines(), vocab_size=800)
    with_format = train_tokenizer(review_lines() + tool_format_texts(200), vocab_size=800)
    call = '{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}'
    assert len(with_format(call).input_ids) < len(plain(call).input_ids) / 2


# --- evaluation and chat with tools ----------------------------------------------------------------------------------

def test_evaluation_with_tools_scores_the_final_answer_and_the_calls(tokenizer, toolbox):
    records = heldout_task_records(["idiom_meaning"], {"idiom_meaning": 3})
    words = [r["tool_call"]["arguments"]["word"] for r in records]
    script = {words[0]: [call_text("idiom_lookup", word=words[0]), idiom_lookup(words[0])],  # right
              words[1]: [call_text("word_lookup", word=words[1]), "不对"],  # the wrong tool
              words[2]: ["我不知道。"]}  # no call
    runtime = ScriptedRuntime(tokenizer, script)
    results = evaluate_tasks(runtime, records, max_new_tokens=100, progress=False, toolbox=toolbox)
    assert results["tools"] is True and results["per_task"]["idiom_meaning"]["correct"] == 1
    assert results["tool_calls"] == {"n": 3, "valid": 1, "validity": 1 / 3, "called": 2, "malformed": 0}
    off = evaluate_tasks(ScriptedRuntime(tokenizer, script), records, max_new_tokens=100, progress=False)
    assert off["tools"] is False and "tool_calls" not in off


def test_chat_shows_the_call_and_result_and_keeps_them_in_the_history(tokenizer, toolbox):
    result = idiom_lookup("画蛇添足")
    runtime = ScriptedRuntime(tokenizer, {"画蛇添足": [call_text("idiom_lookup", word="画蛇添足"), result]})
    session = ChatSession(runtime, toolbox=toolbox)
    shown = "".join(session.stream("成语「画蛇添足」是什么意思？"))
    assert shown == f"\n[调用 idiom_lookup(word=画蛇添足)]\n[结果] {result}\n{result}"
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    session.reset()
    session.tools_on = False
    shown = "".join(session.stream("再问一次画蛇添足"))
    assert "<|tools|>" not in runtime.prompts[-1]
    assert shown == "\n(the model asked for a tool, but tools are off: /tools on)"  # no raw call JSON
