"""`response_format` (JSON mode, JSON schemas) on `tinyllm serve`: constrained decoding through llguidance.

A random model writes no JSON by itself (the baseline below checks so); under the grammar every reply that ends with
finish_reason "stop" is valid JSON, a schema's keys, types and enums hold, other rows of the batch are unchanged, and
bad formats get one-line 400s."""

import concurrent.futures
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "tinyllm-hf[serve]"')
pytest.importorskip("llguidance", reason='constrained decoding needs llguidance: pip install "tinyllm-hf[serve]"')
openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")

from serve_fixtures import assert_openai_error, build_chat_checkpoint, post, run_uvicorn  # noqa: E402
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.grammar import Grammar, json_grammar  # noqa: E402
from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime, generate  # noqa: E402
from tinyllm_hf.inference.server import build_app  # noqa: E402

PROMPTS = ["你好", "这本书怎么样？", "今天天气不错", "给我讲个故事", "这个手机好用吗", "推荐一部电影"]
REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["正面", "负面"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "recommend": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["价格", "质量", "服务"]}, "maxItems": 2},
    },
    "required": ["sentiment", "score", "recommend", "tags"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}


def check_review(value) -> None:
    """`value` fits REVIEW (jsonschema is no dependency of the project: the schema is small enough to check by hand)."""
    assert isinstance(value, dict) and set(value) == {"sentiment", "score", "recommend", "tags"}, value
    assert value["sentiment"] in ("正面", "负面")
    assert isinstance(value["score"], int) and not isinstance(value["score"], bool) and 0 <= value["score"] <= 100
    assert isinstance(value["recommend"], bool)
    assert len(value["tags"]) <= 2 and all(tag in ("价格", "质量", "服务") for tag in value["tags"])


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return TransformersRuntime.from_pretrained(build_chat_checkpoint(tmp_path_factory.mktemp("json") / "model"))


@pytest.fixture(scope="module")
def url(runtime):
    engine = Engine(runtime)
    try:
        with run_uvicorn(build_app(engine, "tiny-chat")) as base:
            yield base
    finally:
        engine.close()


def chat(url: str, prompt: str, **body) -> dict:
    response = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **body})
    assert response.status_code == 200, response.text
    return response.json()


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_without_response_format_the_random_model_writes_no_json(url):
    """The baseline: the grammar, not the model, makes the replies below JSON."""
    replies = [chat(url, prompt, temperature=0, max_tokens=40)["choices"][0]["message"]["content"] for prompt in PROMPTS]
    assert not any(parses(reply) for reply in replies), replies


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_json_schema_replies_follow_the_schema(url, sampling):
    for prompt in PROMPTS:
        choice = chat(url, prompt, response_format=SCHEMA_FORMAT, max_tokens=80, **sampling)["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # the grammar ended the reply, well before the budget
        check_review(json.loads(choice["message"]["content"]))


def test_json_object_replies_are_json_objects(url):
    """Every reply the grammar finished is a JSON object; one cut by max_tokens says "length", as OpenAI's do."""
    finished = 0
    for prompt in PROMPTS:
        for seed in range(3):
            choice = chat(url, prompt, response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                          max_tokens=150)["choices"][0]
            text = choice["message"]["content"]
            assert text.startswith("{")
            if choice["finish_reason"] == "stop":
                finished += 1
                assert isinstance(json.loads(text), dict), text
            else:
                assert choice["finish_reason"] == "length" and not parses(text)
    assert finished >= len(PROMPTS)


def test_openai_client_streams_a_schema_reply_and_completions_take_it_too(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, response_format=SCHEMA_FORMAT,
                                           temperature=0, max_tokens=80)
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, response_format=SCHEMA_FORMAT,
                                            temperature=0, max_tokens=80, stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    check_review(json.loads(whole.choices[0].message.content))
    # vLLM's extension: /v1/completions takes response_format as well, and each of n choices has its own grammar.
    completion = post(url + "/v1/completions", {"prompt": PROMPTS[0], "response_format": SCHEMA_FORMAT, "n": 3,
                                                "max_tokens": 80, "temperature": 1.0, "seed": 3}).json()
    for choice in completion["choices"]:
        assert choice["finish_reason"] == "stop"
        check_review(json.loads(choice["text"]))


def test_constrained_and_plain_requests_share_a_batch_without_mixing(url):
    """Alone, then all at once (one batch): a bystander's greedy answer and each constrained answer are unchanged."""
    requests = [dict(prompt=prompt, temperature=0, max_tokens=40) for prompt in PROMPTS[:3]]
    requests += [dict(prompt=prompt, temperature=0, max_tokens=80, response_format=SCHEMA_FORMAT) for prompt in PROMPTS[3:]]
    requests += [dict(prompt=PROMPTS[0], temperature=0, max_tokens=80, response_format={"type": "json_object"})]

    def answer(body):
        return chat(url, body.pop("prompt"), **body)["choices"][0]["message"]["content"]

    alone = [answer(dict(body)) for body in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(answer, [dict(body) for body in requests]))
    assert together == alone
    assert not any(parses(text) for text in alone[:3]) and all(parses(text) for text in alone[3:-1])


def test_offline_generation_honours_the_grammar(runtime):
    """`runtime.generate` (the loop evaluation and the tool loop run) takes the same grammar as the server."""
    grammar = Grammar(runtime.grammar_tokenizer, json_grammar(REVIEW))
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    tokens = generate(runtime, ids, SamplingParams(80, temperature=0.0, grammar=grammar))
    check_review(json.loads(runtime.decode_text(tokens)))
    assert runtime.grammar_tokenizer is runtime.grammar_tokenizer  # built once per loaded model


@pytest.mark.parametrize("response_format, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "r"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": ["object"]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": REVIEW}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"not": {"type": "string"}}}},
     "response_format.json_schema.schema"),  # a keyword llguidance cannot enforce
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "string", "pattern": "(?=a)"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema"),
])
def test_bad_response_format_gets_a_one_line_400(url, response_format, param):
    response = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                   "response_format": response_format})
    assert_openai_error(response, 400, param=param)
    assert "\n" not in response.json()["error"]["message"]


def test_response_format_with_tools_or_thinking_is_refused(url):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {"messages": [{"role": "user", "content": "你好"}], "response_format": {"type": "json_object"}}
    assert_openai_error(post(url + "/v1/chat/completions", {**body, "tools": [tool]}), 400, param="response_format")
    assert_openai_error(post(url + "/v1/chat/completions", {**body, "enable_thinking": True}), 400,
                        param="response_format")
    plain = post(url + "/v1/chat/completions", {**body, "response_format": {"type": "text"}, "max_tokens": 5})
    assert plain.status_code == 200
