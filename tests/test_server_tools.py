"""`tinyllm serve` with tools and thinking: the official `openai` client's tool loop, forced calls, streaming deltas,
malformed calls, and the 400s for bad tools, tool_choice and tool messages.

A random model never writes a tool call, so most tests serve a `ScriptedRuntime`: the real tokenizer and chat template,
and replies a test writes (token by token, ending in EOS), to check what the server renders and how it reads replies.
The truncated forced call runs on the random model itself.
"""

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "tinyllm-hf[serve]"')
openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")
httpx = pytest.importorskip("httpx")

from scripted_runtime import ScriptedRuntime  # noqa: E402
from serve_fixtures import (  # noqa: E402
    assert_openai_error, build_chat_checkpoint, post, run_uvicorn,
)
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import TransformersRuntime  # noqa: E402
from tinyllm_hf.inference.server import build_app, forced_call_prefix  # noqa: E402
from tinyllm_hf.inference.tool_loop import Toolbox, check_tool_schemas  # noqa: E402
from tinyllm_hf.tasks.tools import calculator  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import EOS_TOKEN, TOOL_CALL_START, TOOLS_TOKEN, TOOL_TOKEN  # noqa: E402

MODEL_ID = "tiny-chat"
QUESTION = [{"role": "user", "content": "12乘7等于多少？"}]
TOOLS = check_tool_schemas([calculator])  # one tool: the four built-in ones fill most of the 256-token context
ARGUMENTS = {"expression": "12*7"}
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
ANSWER = "12乘7等于84。"
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return TransformersRuntime.from_pretrained(build_chat_checkpoint(tmp_path_factory.mktemp("tools") / "model"))


@pytest.fixture(scope="module")
def scripted(backend):
    return ScriptedRuntime(backend, script=lambda prompt: ANSWER, max_batch_size=1)


def _serve(runtime):
    engine = Engine(runtime)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            yield url
    finally:
        engine.close()


@pytest.fixture(scope="module")
def url(scripted):
    yield from _serve(scripted)


@pytest.fixture(scope="module")
def random_url(backend):
    yield from _serve(backend)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(url: str, **body) -> dict:
    response = post(url + "/v1/chat/completions", {"messages": QUESTION, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(url: str, **body) -> list[dict]:
    """The chunks of a streamed chat completion; checks it ends with `data: [DONE]`."""
    response = post(url + "/v1/chat/completions", {"messages": QUESTION, "stream": True, **body})
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def joined(chunks: list[dict], field: str) -> str:
    return "".join(chunk["choices"][0]["delta"].get(field) or "" for chunk in chunks if chunk["choices"])


def streamed_calls(chunks: list[dict]) -> list[dict]:
    return [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", [])]


@pytest.mark.parametrize("text, thinking", [
    ("先算一下。</think>\n我来算：" + CALL, True),
    ("还没想完", True),
    ("先查：" + CALL + "再查：" + CALL.replace("12*7", "3+4") + "好了。", False),
    ('先查：<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>' + CALL, False),
    (CALL[:-5], False),  # cut off inside the closing marker
    ("<think>\n自己开了思考</think>\n答案", False),
    ("没有调用，只有 <tool 字样", False),
])
def test_reply_stream_adds_up_to_the_parsed_reply(text, thinking):
    """Fed a character at a time, the deltas add up to what `parse_reply` makes of the whole text."""
    from tinyllm_hf.inference.text_stream import ReplyStream
    from tinyllm_hf.tokenizer.reply import parse_reply

    stream = ReplyStream(lambda t: parse_reply(t, thinking))
    streamed, calls = {"content": "", "reasoning_content": ""}, []
    for k, char in enumerate(text):
        grown, new_calls = stream.feed(char, final=k == len(text) - 1)
        for field, piece in grown.items():
            streamed[field] += piece
        calls += new_calls
        if k < len(text) - 1:  # an open call's text is never streamed as content
            assert TOOL_CALL_START not in streamed["content"] or "</tool_call>" in text[:k + 1]
    parsed = parse_reply(text, thinking)
    assert streamed == {"content": parsed["content"], "reasoning_content": parsed["reasoning_content"] or ""}
    assert calls == parsed["tool_calls"]


def test_openai_client_tool_loop(client, scripted):
    """The client's standard loop: create -> tool_calls -> the assistant message and the tool's result -> create."""
    scripted.script = lambda prompt: ANSWER if TOOL_TOKEN in prompt else CALL
    messages = list(QUESTION)
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert TOOLS_TOKEN in scripted.prompts[-1]  # "auto" (the default) shows the tools
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == ARGUMENTS

    messages.append(choice.message)  # the message object as the client returned it
    result, error = Toolbox({"calculator": calculator}).call(call.function.name, json.loads(call.function.arguments))
    assert error is None
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == ANSWER and not second.choices[0].message.tool_calls
    # The second prompt is the chat template's rendering of the exchange: the call, then its result.
    exchange = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": ARGUMENTS}}]},
        {"role": "tool", "content": result}]
    assert scripted.prompts[-1] == scripted.render_chat(exchange, TOOLS)
    assert f"{TOOL_TOKEN}\n{result}\n" in scripted.prompts[-1]


def test_stream_sends_reasoning_content_and_whole_tool_calls(url, client, scripted):
    scripted.script = lambda prompt: "先算一下。</think>\n我来算：" + CALL
    chunks = stream_chunks(url, tools=TOOLS, **THINKING)
    assert scripted.prompts[-1].endswith("<|assistant|>\n<think>\n")
    assert joined(chunks, "reasoning_content") == "先算一下。"
    assert joined(chunks, "content") == "我来算："
    assert sum(bool(chunk["choices"][0]["delta"].get("reasoning_content")) for chunk in chunks) > 1  # as it comes
    for chunk in chunks:  # the call's text never leaks into the content
        assert TOOL_CALL_START not in (chunk["choices"][0]["delta"].get("content") or "")
        assert "expression" not in (chunk["choices"][0]["delta"].get("content") or "")
    (call,) = streamed_calls(chunks)
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "calculator" and json.loads(call["function"]["arguments"]) == ARGUMENTS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])

    # The same reply, not streamed, and through the client's stream helper (which accumulates the deltas).
    message = chat(url, tools=TOOLS, **THINKING)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("先算一下。", "我来算：")
    assert [c["function"] for c in message["tool_calls"]] == [call["function"]]
    with client.chat.completions.stream(model=MODEL_ID, messages=QUESTION, tools=TOOLS, extra_body=THINKING) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "我来算："
    assert final.message.tool_calls[0].function.arguments == call["function"]["arguments"]


def test_several_calls_get_their_own_ids_and_indexes(url, scripted):
    second = CALL.replace("12*7", "3+4")
    scripted.script = lambda prompt: CALL + second
    calls = chat(url, tools=TOOLS)["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [ARGUMENTS, {"expression": "3+4"}]
    assert len({c["id"] for c in calls}) == 2
    streamed = streamed_calls(stream_chunks(url, tools=TOOLS))
    assert [c["index"] for c in streamed] == [0, 1] and len({c["id"] for c in streamed}) == 2


def test_parallel_tool_calls_false_ends_the_reply_after_its_first_call(url, client, scripted):
    scripted.script = lambda prompt: "先查：" + CALL + CALL.replace("12*7", "3+4") + "好了。"
    choice = chat(url, tools=TOOLS, parallel_tool_calls=False)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "先查："
    assert [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [ARGUMENTS]
    chunks = stream_chunks(url, tools=TOOLS, parallel_tool_calls=False)
    assert [json.loads(c["function"]["arguments"]) for c in streamed_calls(chunks)] == [ARGUMENTS]
    assert joined(chunks, "content") == "先查：" and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    reply = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=TOOLS, parallel_tool_calls=False)
    assert len(reply.choices[0].message.tool_calls) == 1
    assert reply.usage.completion_tokens == len(scripted.encode("先查：" + CALL))  # generation stopped there
    # true, or without tools: as before
    assert len(chat(url, tools=TOOLS, parallel_tool_calls=True)["choices"][0]["message"]["tool_calls"]) == 2


def test_thinking_switch_as_top_level_field(url, client, scripted):
    scripted.script = lambda prompt: "想想。</think>\n" + ANSWER
    message = chat(url, enable_thinking=True)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("想想。", ANSWER)
    assert scripted.prompts[-1].endswith("<think>\n") and TOOLS_TOKEN not in scripted.prompts[-1]
    # The client keeps the field it does not know as an attribute.
    reply = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, extra_body={"enable_thinking": True})
    assert reply.choices[0].message.reasoning_content == "想想。"
    plain = chat(url)["choices"][0]["message"]  # thinking off: no reasoning field, the text as it is
    assert "reasoning_content" not in plain and not scripted.prompts[-1].endswith("<think>\n")


def test_tool_choice_none_shows_no_tools_and_parses_no_calls(url, scripted):
    scripted.script = lambda prompt: CALL
    for body in ({"tool_choice": "none"}, {"tool_choice": "none", "stream": True}):
        if body.get("stream"):
            chunks = stream_chunks(url, tools=TOOLS, tool_choice="none")
            content, calls, reason = joined(chunks, "content"), streamed_calls(chunks), chunks[-1]["choices"][0][
                "finish_reason"]
        else:
            choice = chat(url, tools=TOOLS, **body)["choices"][0]
            content, calls, reason = choice["message"]["content"], choice["message"].get("tool_calls"), choice[
                "finish_reason"]
        assert TOOLS_TOKEN not in scripted.prompts[-1]
        assert not calls and reason == "stop" and '"name": "calculator"' in content


@pytest.mark.parametrize("choice, prefix, script", [
    ({"type": "function", "function": {"name": "calculator"}}, forced_call_prefix("calculator"),
     '{"expression": "12*7"}}</tool_call>'),
    ("required", forced_call_prefix(None), 'calculator", "arguments": {"expression": "12*7"}}</tool_call>'),
])
def test_forced_tool_choice_prefills_the_call(url, scripted, choice, prefix, script):
    scripted.script = lambda prompt: script
    for stream in (False, True):
        if stream:
            chunks = stream_chunks(url, tools=TOOLS, tool_choice=choice)
            calls, reason = streamed_calls(chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice_body = chat(url, tools=TOOLS, tool_choice=choice)["choices"][0]
            calls, reason = choice_body["message"]["tool_calls"], choice_body["finish_reason"]
        assert scripted.prompts[-1] == scripted.render_chat(QUESTION, TOOLS) + prefix
        assert reason == "tool_calls" and [c["function"]["name"] for c in calls] == ["calculator"]
        assert json.loads(calls[0]["function"]["arguments"]) == ARGUMENTS
    # The forced opening and the model's continuation are exactly the template's rendering of that call.
    call_turn = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": ARGUMENTS}}]}
    assert scripted.render_chat([*QUESTION, call_turn], TOOLS) == (
        scripted.prompts[-1] + script + EOS_TOKEN + "<|assistant|>\n")


def test_truncated_forced_call_of_a_random_model_stays_in_content(random_url):
    """The random model cannot finish the call's JSON in 6 tokens: all it wrote is content, never a 500."""
    body = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}},
            "max_tokens": 6, "temperature": 0}
    choice = chat(random_url, **body)["choices"][0]
    content = choice["message"]["content"]
    assert content.startswith(forced_call_prefix("calculator")) and len(content) > len(forced_call_prefix("calculator"))
    assert not choice["message"].get("tool_calls") and choice["finish_reason"] in ("stop", "length")
    chunks = stream_chunks(random_url, **body)
    assert joined(chunks, "content") == content and not streamed_calls(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_malformed_and_cut_off_calls_stay_in_content(url, scripted):
    broken = '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>'
    scripted.script = lambda prompt: "先查：" + broken + CALL
    choice = chat(url, tools=TOOLS)["choices"][0]
    assert choice["message"]["content"] == "先查：" + broken  # the valid call is parsed, the broken one kept
    assert [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [ARGUMENTS]
    chunks = stream_chunks(url, tools=TOOLS)
    assert joined(chunks, "content") == "先查：" + broken and len(streamed_calls(chunks)) == 1

    scripted.script = lambda prompt: CALL
    cut = scripted.decode_raw(scripted.encode(CALL)[:10])  # the budget ends inside the call
    choice = chat(url, tools=TOOLS, max_tokens=10)["choices"][0]
    assert choice["message"]["content"] == cut and not choice["message"].get("tool_calls")
    assert choice["finish_reason"] == "length"
    chunks = stream_chunks(url, tools=TOOLS, max_tokens=10)
    assert joined(chunks, "content") == cut and chunks[-1]["choices"][0]["finish_reason"] == "length"


ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": json.dumps(ARGUMENTS)}}]}
NAMED_UNKNOWN = {"type": "function", "function": {"name": "weather"}}
BAD_REQUESTS = {
    "tool without a function": ({"tools": [{"type": "function"}]}, "tools"),
    "tool name with spaces": ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    "unknown forced function": ({"tools": TOOLS, "tool_choice": NAMED_UNKNOWN}, "tool_choice.function.name"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "tool_choice of another shape": ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    "forced call with thinking": ({"tools": TOOLS, "tool_choice": "required", "enable_thinking": True}, "tool_choice"),
    "thinking switches disagree": ({"enable_thinking": False, **THINKING}, "enable_thinking"),
    "unknown template kwarg": ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs"),
    "tool message answering nothing": (
        {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_1", "content": "84"}]},
        "messages[1].tool_call_id"),
    "tool message without content": (
        {"messages": [*QUESTION, ASSISTANT_CALL, {"role": "tool", "tool_call_id": "call_1"}]}, "messages[2].content"),
    "call left unanswered": ({"messages": [*QUESTION, ASSISTANT_CALL, *QUESTION]}, "messages[2]"),
    "arguments not a JSON object": (
        {"messages": [*QUESTION, {**ASSISTANT_CALL, "tool_calls": [
            {**ASSISTANT_CALL["tool_calls"][0], "function": {"name": "calculator", "arguments": "{oops"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "84"}]},
        "messages[1].tool_calls[0].function.arguments"),
    "tool_calls on a user message": ({"messages": [{**QUESTION[0], "tool_calls": ASSISTANT_CALL["tool_calls"]}]},
                                     "messages[0].tool_calls"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_tool_requests_get_openai_errors(url, case):
    extra, param = BAD_REQUESTS[case]
    response = post(url + "/v1/chat/completions", {"messages": QUESTION, **extra})
    assert_openai_error(response, 400, param=param)
    if param == "tools":  # the message names the bad entry
        assert "tools[0]" in response.json()["error"]["message"]


def test_client_sees_400s_and_the_rest_stays_rejected(url, client):
    with pytest.raises(openai.BadRequestError, match="weather"):
        client.chat.completions.create(model=MODEL_ID, messages=QUESTION, tools=TOOLS, tool_choice=NAMED_UNKNOWN)
    assert_openai_error(post(url + "/v1/completions", {"prompt": "12乘7", "tools": TOOLS}), 400,
                        "unsupported_parameter", "tools")

