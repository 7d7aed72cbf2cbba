"""`/v1/responses` (OpenAI's Responses API) through the official `openai` client: text, streaming events, a function
call round trip (a ScriptedRuntime writes the call), and 400s for what the server does not serve."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "tinyllm-hf[serve]"')
openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")

from scripted_runtime import ScriptedRuntime  # noqa: E402
from serve_fixtures import IDIOM_ANSWER, IDIOM_QUESTION, assert_openai_error, build_chat_checkpoint, call_then_answer, post, run_uvicorn  # noqa: E402,E501
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import TransformersRuntime  # noqa: E402
from tinyllm_hf.inference.server import build_app  # noqa: E402

IDIOM_TOOL = {"type": "function", "name": "idiom_lookup", "description": "查成语",
              "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return TransformersRuntime.from_pretrained(build_chat_checkpoint(tmp_path_factory.mktemp("resp") / "model"))


def _serve(runtime):
    engine = Engine(runtime)
    try:
        with run_uvicorn(build_app(engine, "tiny-chat")) as url:
            yield url
    finally:
        engine.close()


@pytest.fixture(scope="module")
def url(backend):
    yield from _serve(backend)


@pytest.fixture(scope="module")
def scripted_url(backend):
    yield from _serve(ScriptedRuntime(backend, script=call_then_answer, max_batch_size=1))


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_text_response_matches_the_chat_completion(url):
    """One definition: the Responses reply is the chat completion's reply for the same messages."""
    response = client(url).responses.create(model="tiny-chat", input="你好", instructions="你是助手",
                                            temperature=0, max_output_tokens=12)
    chat = client(url).chat.completions.create(model="tiny-chat", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}])
    assert response.output_text == chat.choices[0].message.content and response.output_text
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_streamed_events_come_in_openai_order_and_add_up(url):
    kwargs = dict(model="tiny-chat", input=[{"role": "user", "content": "今天天气不错"}], temperature=0,
                  max_output_tokens=10)
    whole = client(url).responses.create(**kwargs)
    events = list(client(url).responses.create(stream=True, **kwargs))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_json_schema_text_format(url):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    response = client(url).responses.create(model="tiny-chat", input="你好", temperature=0, max_output_tokens=20,
                                            text={"format": {"type": "json_schema", "name": "r", "schema": schema}})
    assert isinstance(json.loads(response.output_text)["ok"], bool)


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_round_trip(scripted_url, stream):
    api = client(scripted_url)
    first = api.responses.create(model="tiny-chat", input=IDIOM_QUESTION, tools=[IDIOM_TOOL], stream=stream)
    if stream:
        events = list(first)
        assert "response.function_call_arguments.done" in [event.type for event in events]
        first = events[-1].response
        # The client's own stream helper rebuilds the same response from the events.
        with api.responses.stream(model="tiny-chat", input=IDIOM_QUESTION, tools=[IDIOM_TOOL]) as helper:
            assert [item.type for item in helper.get_final_response().output] == ["function_call"]
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "idiom_lookup" and json.loads(call.arguments) == {"word": "画蛇添足"} and call.call_id
    followup = [{"role": "user", "content": IDIOM_QUESTION}, call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": call.call_id, "output": "比喻做了多余的事"}]
    second = api.responses.create(model="tiny-chat", input=followup, tools=[IDIOM_TOOL])
    assert second.output_text == IDIOM_ANSWER and second.status == "completed"


def test_parallel_tool_calls_false_is_passed_on_and_echoed(scripted_url):
    response = client(scripted_url).responses.create(model="tiny-chat", input=IDIOM_QUESTION, tools=[IDIOM_TOOL],
                                                     parallel_tool_calls=False)
    assert response.parallel_tool_calls is False
    assert [item.type for item in response.output] == ["function_call"]
    assert client(scripted_url).responses.create(model="tiny-chat", input=IDIOM_QUESTION,
                                                 tools=[IDIOM_TOOL]).parallel_tool_calls is True


@pytest.mark.parametrize("body, param", [
    ({"input": "你好", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "你好", "store": True}, "store"),
    ({"input": "你好", "background": True}, "background"),
    ({"input": "你好", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "你好", "tools": [{"type": "function", "name": 3}]}, "tools[0].name"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"input": "你好", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "你好", "text": {"format": {"type": "json_schema", "name": "r", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
])
def test_unsupported_or_bad_fields_get_a_one_line_400(url, body, param):
    response = post(url + "/v1/responses", body)
    assert_openai_error(response, 400, param=param)
    assert "\n" not in response.json()["error"]["message"]
