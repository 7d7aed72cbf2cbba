"""`tinyllm serve`: the OpenAI API as the official `openai` client sees it, batching, overload, cancel, timeout, bad
input, containment (one request's failure never fails its batch-mates) and the request limits."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "tinyllm-hf[serve]"')
openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import (  # noqa: E402
    GatedRuntime, PoisonedRuntime, Recorder, SlowRuntime, assert_openai_error, build_chat_checkpoint, free_port,
    non_loopback_address, post, refuses_connections, run_uvicorn, send_partial,
)
from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import (  # noqa: E402
    GREEDY_BELOW_TEMPERATURE, SamplingParams, TransformersRuntime, sample_token,
)
from tinyllm_hf.inference.server import DEFAULT_MAX_BODY_BYTES, MAX_SEED, build_app  # noqa: E402

MODEL_ID = "tiny-chat"
HELLO = [{"role": "user", "content": "你好，今天怎么样？"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def backend(checkpoint):
    return TransformersRuntime.from_pretrained(checkpoint)


@contextlib.contextmanager
def serving(backend, api_key=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES, **engine_kwargs):
    """(base URL, engine) of a server on a free loopback port; the engine thread is stopped afterwards."""
    engine = Engine(backend, **engine_kwargs)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID, api_key=api_key, max_body_bytes=max_body_bytes)) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(backend):
    with serving(backend, max_batch_size=8) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def hf_greedy_text(checkpoint, messages, max_new_tokens: int) -> tuple[int, str]:
    """(prompt tokens, greedy reply) from transformers' own `generate` on the chat template: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return ids["input_ids"].shape[1], tokenizer.decode(new, skip_special_tokens=True)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------------
# The API through the official client
# ---------------------------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_greedy_matches_transformers_generate(client, checkpoint):
    prompt_tokens, expected = hf_greedy_text(checkpoint, HELLO, max_new_tokens=12)
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    # The prompt went through the checkpoint's chat template (which adds the default system prompt).
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_chat_stream_sends_the_same_text_as_sse(client, server):
    full = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # On the wire: server-sent events ending with the [DONE] sentinel.
    raw = post(server[0] + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 5, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"


def test_seed_reproduces_sampling_and_n_gives_indexed_choices(client):
    kwargs = dict(model=MODEL_ID, messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.95)
    first = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert client.chat.completions.create(seed=7, **kwargs).choices[0].message.content == first
    assert client.chat.completions.create(seed=8, **kwargs).choices[0].message.content != first
    reply = client.chat.completions.create(seed=7, n=3, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.choices[0].message.content == first  # choice i uses seed + i
    assert len({c.message.content for c in reply.choices}) == 3


def test_stop_string_cuts_the_reply_and_is_never_streamed(client):
    full = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2, f"the greedy reply is too short to pick a stop string from: {text!r}"
    expected = text[: text.find(stop)]
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_completions_echo_and_prompt_lists(client):
    reply = client.completions.create(model=MODEL_ID, prompt="这本书", max_tokens=6, temperature=0, echo=True)
    assert reply.choices[0].text.startswith("这本书") and len(reply.choices[0].text) > 3
    reply = client.completions.create(model=MODEL_ID, prompt=["这本书", "人际关系"], n=2, max_tokens=4, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    stream = client.completions.create(model=MODEL_ID, prompt="这本书", max_tokens=6, temperature=0, stream=True)
    plain = client.completions.create(model=MODEL_ID, prompt="这本书", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_concurrent_requests_are_batched_without_mixing_answers(client, server):
    prompts = [f"第{i}个问题：{'为什么' * (i + 1)}" for i in range(6)]
    alone = {}
    for p in prompts:
        alone[p] = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0
        ).choices[0].message.content
    together, seen_batch = {}, []

    def ask(p):
        together[p] = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0
        ).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen_batch.append(len(server[1].running))
        time.sleep(0.005)
    assert together == alone
    assert max(seen_batch) > 1, "concurrent requests were never decoded in the same batch"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a 4xx with OpenAI's error body, and the server keeps serving
# ---------------------------------------------------------------------------------------------------------------------


BAD_REQUESTS = {
    "invalid json": ('{"messages": [', 400, "invalid_json", None),
    "not an object": ("[1, 2]", 400, "invalid_json", None),
    "missing messages": ({"model": MODEL_ID}, 400, "invalid_value", "messages"),
    "no messages": ({"messages": []}, 400, "invalid_value", "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
    "empty content": ({"messages": [{"role": "user", "content": "  "}]}, 400, "invalid_value", "messages[0].content"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages[0].content"),
    "max_tokens above context": ({"messages": HELLO, "max_tokens": 10_000}, 400, "context_length_exceeded", "max_tokens"),
    "prompt longer than context": (
        {"messages": [{"role": "user", "content": "这本书太好了" * 200}]}, 400, "context_length_exceeded", "messages"
    ),
    "system after user": (
        {"messages": [*HELLO, {"role": "system", "content": "late"}]}, 400, None, "messages"
    ),
    "temperature out of range": ({"messages": HELLO, "temperature": 5}, 400, "invalid_value", "temperature"),
    "too many stop strings": ({"messages": HELLO, "stop": list("abcde")}, 400, "invalid_value", "stop"),
    "functions unsupported": ({"messages": HELLO, "functions": [{"name": "f"}]}, 400, "unsupported_parameter",
                              "functions"),
    "unknown model": ({"model": "gpt-4", "messages": HELLO}, 404, "model_not_found", "model"),
    # Strict types: pydantic's lax mode would read each of these as a number or a flag.
    "max_tokens true": ({"messages": HELLO, "max_tokens": True}, 400, "invalid_value", "max_tokens"),
    "max_tokens a string": ({"messages": HELLO, "max_tokens": "3"}, 400, "invalid_value", "max_tokens"),
    "max_tokens a float": ({"messages": HELLO, "max_tokens": 3.0}, 400, "invalid_value", "max_tokens"),
    "n a string": ({"messages": HELLO, "n": "2"}, 400, "invalid_value", "n"),
    "temperature a string": ({"messages": HELLO, "temperature": "0.5"}, 400, "invalid_value", "temperature"),
    "top_p true": ({"messages": HELLO, "top_p": True}, 400, "invalid_value", "top_p"),
    "stream 1": ({"messages": HELLO, "stream": 1}, 400, "invalid_value", "stream"),
    "include_usage a string": ({"messages": HELLO, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
                               "invalid_value", "stream_options.include_usage"),
    "seed a string": ({"messages": HELLO, "seed": "7"}, 400, "invalid_value", "seed"),
    # Seeds torch's generator cannot take: a 500 before.
    "seed 2**64": ({"messages": HELLO, "seed": 2**64}, 400, "invalid_value", "seed"),
    "seed below -2**63": ({"messages": HELLO, "seed": -(2**63) - 1}, 400, "invalid_value", "seed"),
    "seed + n - 1 past 2**64 - 1": ({"messages": HELLO, "seed": MAX_SEED, "n": 2}, 400, "invalid_value", "seed"),
    # Lone surrogates (JSON escapes UTF-8 cannot encode): a 500 in the tokenizer before.
    "lone surrogate in content": ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_value",
                                  "messages[0].content"),
    "lone surrogate in a text part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
                                      400, "invalid_value", "messages[0].content[0].text"),
    "lone surrogate in a tool": ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f\ud83d"}}]},
                                 400, "invalid_value", "tools[0].function.name"),
    "lone surrogate in a stop string": ({"messages": HELLO, "stop": ["\ud800"]}, 400, "invalid_value", "stop[0]"),
    "lone surrogate in a key": ({"messages": HELLO, "\ud800": 1}, 400, "invalid_value", "\\ud800"),
    "nested too deeply": ('{"messages": ' + "[" * 100_000, 400, "invalid_json", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_chat_request_gets_openai_error(server, case):
    body, status, code, param = BAD_REQUESTS[case]
    assert_openai_error(post(server[0] + "/v1/chat/completions", body), status, code, param)


def test_bad_requests_leave_the_server_serving(server, client):
    for body, *_ in BAD_REQUESTS.values():
        post(server[0] + "/v1/chat/completions", body)
    assert_openai_error(post(server[0] + "/v1/completions", {"prompt": ""}), 400, "invalid_value", "prompt")
    assert_openai_error(post(server[0] + "/v1/completions", {"prompt": "\udfff"}), 400, "invalid_value", "prompt")
    assert_openai_error(post(server[0] + "/v1/completions", {"prompt": "书", "echo": "yes"}), 400, "invalid_value",
                        "echo")
    assert_openai_error(httpx.get(server[0] + "/v1/nothing"), 404, "not_found")
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_ints_count_as_floats_and_every_seed_torch_takes_samples(server):
    """Strict types reject only what OpenAI does: a float field takes an integer (JSON writes 1.0 as 1), and seeds
    span torch's whole range, negative ones included."""
    for fields in ({"temperature": 0}, {"temperature": 1, "top_p": 1}, {"seed": MAX_SEED}, {"seed": -(2**63), "n": 2},
                   {"seed": MAX_SEED - 1, "n": 2}):
        response = post(server[0] + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, **fields})
        assert response.status_code == 200, (fields, response.text)
    paired = post(server[0] + "/v1/chat/completions",  # a surrogate pair is one character, not a lone surrogate
                  '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}')
    assert paired.status_code == 200, paired.text


def test_api_key_is_required_when_set(backend):
    with serving(backend, api_key="sk-right") as (url, _):
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert_openai_error(post(url + "/v1/chat/completions", {"messages": HELLO}), 401, "invalid_api_key")
        right = openai.OpenAI(base_url=url + "/v1", api_key="sk-right", max_retries=0)
        assert right.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2).choices


# ---------------------------------------------------------------------------------------------------------------------
# Request limits: the key and the body's size are checked before the body is read; parsing and tokenizing run in a
# worker thread, never on the event loop
# ---------------------------------------------------------------------------------------------------------------------


CHAT = "/v1/chat/completions"


def test_a_body_over_the_limit_gets_413_before_it_is_read(backend):
    with serving(backend, max_body_bytes=4096) as (url, _):
        # Content-Length over the limit: answered with no body byte sent.
        started = time.monotonic()
        declared = send_partial(url, CHAT, {"content-length": str(10**9)})
        assert_openai_error(declared, 413, "request_too_large")
        assert "4096 bytes" in declared.json()["error"]["message"] and time.monotonic() - started < 5
        # Chunked (no Content-Length): refused once the chunks pass the limit, though the body has not ended.
        chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
        chunked = send_partial(url, CHAT, {"transfer-encoding": "chunked"}, [chunk] * 5)
        assert_openai_error(chunked, 413, "request_too_large")
        # Under the limit, both ways, the request is served.
        assert post(url + CHAT, {"messages": HELLO, "max_tokens": 2}).status_code == 200
        small = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        assert httpx.post(url + CHAT, content=iter([small[:10], small[10:]]), timeout=60).status_code == 200


def test_a_wrong_key_is_refused_before_the_body_is_read(backend):
    with serving(backend, api_key="sk-right", max_body_bytes=4096) as (url, _):
        started = time.monotonic()
        assert_openai_error(send_partial(url, CHAT, {"content-length": str(10**9), "authorization": "Bearer sk-no"}),
                            401, "invalid_api_key")
        assert time.monotonic() - started < 5
        # The right key with the same body: then the size is what is wrong.
        assert_openai_error(send_partial(url, CHAT, {"content-length": str(10**9), "authorization": "Bearer sk-right"}),
                            413, "request_too_large")


@pytest.mark.parametrize("path, body, tokenizer", [
    (CHAT, {"messages": [{"role": "user", "content": "这本书" * 50_000}]}, "encode_chat"),  # ~450 KB: under the limit
    ("/v1/completions", {"prompt": "这本书", "max_tokens": 2}, "encode"),
])
def test_tokenizing_runs_off_the_event_loop(backend, path, body, tokenizer):
    """While a prompt is being tokenized (here: held at a gate), /health and the event loop still answer."""
    gated = GatedRuntime(backend, tokenizer)
    with serving(gated) as (url, _):
        answers = []
        request = threading.Thread(target=lambda: answers.append(post(url + path, body)))
        request.start()
        assert gated.entered.wait(timeout=30), "the request never reached the tokenizer"
        try:
            health = httpx.get(url + "/health", timeout=3)  # on the event loop, encode would block this
            assert health.status_code == 200 and health.json()["status"] == "ok"
        finally:
            gated.release.set()
        request.join(timeout=60)
        assert gated.threads and "MainThread" not in gated.threads
        if path == CHAT:  # the long prompt is tokenized, then refused for the context, not for its size
            assert_openai_error(answers[0], 400, "context_length_exceeded", "messages")
        else:
            assert answers[0].status_code == 200, answers[0].text


# ---------------------------------------------------------------------------------------------------------------------
# One request never fails its batch-mates: poison sampling settings, NaN logits, a prefill that raises
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_temperatures_sample_greedily():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert not torch.isfinite(logits / 1e-45).all()  # what made torch.multinomial raise
    for temperature in (1e-45, 1e-30, GREEDY_BELOW_TEMPERATURE / 2):
        params = SamplingParams(max_tokens=1, temperature=temperature)
        assert sample_token(logits, params, params.generator()) == 1
    params = SamplingParams(max_tokens=1, temperature=GREEDY_BELOW_TEMPERATURE, seed=0)
    assert sample_token(logits, params, params.generator()) == 1  # sampled, at a temperature that still samples argmax


BYSTANDERS = [  # (prompt, sampling): greedy and seeded, streamed and not; each must give its answer alone
    ("第一个问题：为什么", {"temperature": 0}),
    ("第二个问题：怎么样", {"temperature": 0, "stream": True}),
    ("第三个问题：是什么", {"temperature": 0.8, "seed": 3}),
    ("第四个问题：在哪里", {"temperature": 1.0, "top_p": 0.9, "seed": 4, "stream": True}),
]
BYSTANDER_TOKENS = 40


def ask(url: str, prompt: str, sampling: dict, max_tokens: int = BYSTANDER_TOKENS) -> tuple[str, str]:
    """(text, finish reason) of one chat request, streamed or not; an error fails the test."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **sampling}
    response = post(url + CHAT, body)
    assert response.status_code == 200, response.text
    if not sampling.get("stream"):
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    events = [json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: {")]
    assert not any("error" in event for event in events), events
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events)
    return text, events[-1]["choices"][0]["finish_reason"]


@contextlib.contextmanager
def bystanders_running(url: str, engine: Engine):
    """Runs BYSTANDERS concurrently; yields once all of them are in the batch, then checks that each finished with
    its whole answer, the one it gives alone."""
    alone = [ask(url, prompt, sampling) for prompt, sampling in BYSTANDERS]
    assert all(reason == "length" for _, reason in alone)  # SlowRuntime has no EOS: every answer is the full budget
    together = [None] * len(BYSTANDERS)

    def run(i):
        together[i] = ask(url, *BYSTANDERS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(BYSTANDERS))]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(engine.running) == len(BYSTANDERS))
    yield
    assert all(thread.is_alive() for thread in threads), "a bystander finished before the test's requests ran beside it"
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone


def test_a_temperature_too_small_to_sample_is_greedy_beside_running_requests(backend):
    """temperature 1e-45 passed validation and overflowed the sampler, which ended every sequence of its batch; it is
    greedy now (docs/serving.md), and the requests sharing its batch finish with their own answers."""
    with serving(SlowRuntime(backend, delay=0.03)) as (url, engine):
        poison = ("毒药", {"temperature": 1e-45, "seed": 1})
        greedy = ask(url, poison[0], {"temperature": 0}, max_tokens=5)
        with bystanders_running(url, engine):
            assert ask(url, *poison, max_tokens=5) == greedy
            assert ask(url, poison[0], {**poison[1], "stream": True}, max_tokens=5) == greedy
        assert engine.finished["error"] == 0


def test_a_row_that_cannot_be_sampled_fails_alone(backend):
    """NaN logits (a broken row) make the sampler raise: that request gets a 500 (an SSE error event when streamed),
    and the requests sharing its batch go on."""
    poison = backend.encode("毒药")
    with serving(PoisonedRuntime(SlowRuntime(backend, delay=0.03), poison)) as (url, engine):
        with bystanders_running(url, engine):
            body = {"prompt": "毒药", "max_tokens": 5, "temperature": 0.7}
            failed = post(url + "/v1/completions", body)
            assert_openai_error(failed, 500, "internal_error")
            assert "sampling failed" in failed.json()["error"]["message"]
            streamed = post(url + "/v1/completions", {**body, "stream": True})
            events = [json.loads(line[6:]) for line in streamed.text.split("\n") if line.startswith("data: {")]
            assert "sampling failed" in events[-1]["error"]["message"]
        assert engine.finished["error"] == 2


def test_a_prefill_that_fails_fails_only_its_own_sequence(backend):
    """A prompt whose prefill raises, admitted in the same batch as a healthy new one while another runs: the batched
    prefill is retried one sequence at a time, so only the poisoned one fails."""
    poison = backend.encode("毒药")
    gated = GatedRuntime(PoisonedRuntime(SlowRuntime(backend, delay=0.02), poison, fail_prefill=True), "prefill")
    engine = Engine(gated)
    try:
        params = SamplingParams(max_tokens=20, temperature=0.0)
        running, poisoned, newcomer = Recorder(), Recorder(), Recorder()
        engine.submit(backend.encode("第一个问题"), params, running)
        assert gated.entered.wait(timeout=10)  # `running` is in prefill; the next two wait and are admitted together
        engine.submit(poison, params, poisoned)
        engine.submit(backend.encode("第二个问题"), params, newcomer)
        gated.release.set()
        for recorder in (running, poisoned, newcomer):
            assert recorder.finished.wait(timeout=30)
        assert poisoned.reason == "error" and "prefill failed" in poisoned.error
        assert (running.reason, len(running.tokens)) == ("length", 20)
        assert (newcomer.reason, len(newcomer.tokens)) == ("length", 20)
        assert engine.finished == {"error": 1, "length": 2}
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------------------------
# Load: bounded queue, cancel on disconnect, timeout
# ---------------------------------------------------------------------------------------------------------------------


def test_full_queue_answers_503_not_a_hang(backend):
    with serving(SlowRuntime(backend), max_batch_size=1, max_queue=1) as (url, engine):
        body = {"messages": HELLO, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)
            wait_for(lambda: len(engine.running) == 1)
            waiting = threading.Thread(target=post, args=(url + "/v1/chat/completions", {**body, "max_tokens": 2}))
            waiting.start()
            wait_for(lambda: engine.waiting.qsize() == 1)
            started = time.monotonic()
            response = post(url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
            assert time.monotonic() - started < 5
            assert_openai_error(response, 503, "server_overloaded")
            assert response.headers["retry-after"] == "1"
        waiting.join(timeout=30)


def test_long_request_of_a_connected_client_completes(backend):
    with serving(SlowRuntime(backend)) as (url, engine):
        response = post(url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 30})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 30
        assert engine.finished == {"length": 1}


def test_client_disconnect_cancels_generation(backend):
    with serving(SlowRuntime(backend), max_batch_size=4) as (url, engine):
        body = {"messages": HELLO, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            wait_for(lambda: len(engine.running) == 1)
        wait_for(lambda: not engine.running)
        assert engine.finished["cancelled"] == 1

        # A non-streaming request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        wait_for(lambda: engine.finished["cancelled"] == 2)
        wait_for(lambda: not engine.running)  # the engine counts a finish before it drops the row from the batch


def test_request_timeout_gives_504_and_stream_error(backend):
    with serving(SlowRuntime(backend), request_timeout=0.5) as (url, engine):
        body = {"messages": HELLO, "max_tokens": 200}
        assert_openai_error(post(url + "/v1/chat/completions", body), 504, "timeout")
        raw = post(url + "/v1/chat/completions", {**body, "stream": True})
        events = [json.loads(line[6:]) for line in raw.text.split("\n") if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout" and raw.text.rstrip().endswith("data: [DONE]")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_serves_on_loopback_by_default(checkpoint):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyllm_hf.cli", "serve", "--model", str(checkpoint), "--port", str(port)],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline, response = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert response is not None and response.json()["data"][0]["id"] == checkpoint.name
        # Bound to 127.0.0.1 only: this machine's network address (if it has one) refuses the port.
        address = non_loopback_address()
        assert address is None or refuses_connections(address, port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in proc.stderr.read()


def test_cli_rejects_a_missing_model(tmp_path, capsys):
    assert tinyllm(["serve", "--model", str(tmp_path / "nothing")]) == 1
    assert f"model not found: {tmp_path / 'nothing'}" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--max-body-bytes", "--max-queue", "--max-batch-size", "--threads"])
def test_cli_rejects_sizes_below_one_before_loading(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        tinyllm(["serve", "--model", str(tmp_path / "nothing"), option, "0"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert f"argument {option}: must be at least 1, got 0" in line


# ---------------------------------------------------------------------------------------------------------------------
# Other backends: the same API and the same greedy reply as the transformers backend
# ---------------------------------------------------------------------------------------------------------------------


def _llamacpp_backend(checkpoint, tmp_path):
    pytest.importorskip("llama_cpp", reason='the llamacpp backend needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"')
    pytest.importorskip("gguf", reason='GGUF export needs the quant extra: pip install "tinyllm-hf[quant]"')
    from tinyllm_hf.inference.runtime import LlamaCppRuntime
    from tinyllm_hf.export.gguf import export_gguf

    return LlamaCppRuntime(export_gguf(checkpoint, tmp_path / "model-f16.gguf", "f16"))


def _onnx_backend(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason='the onnx backend needs the quant extra: pip install "tinyllm-hf[quant]"')
    pytest.importorskip("onnxscript", reason='the onnx backend needs the quant extra: pip install "tinyllm-hf[quant]"')
    from tinyllm_hf.inference.runtime import ExportedRuntime
    from tinyllm_hf.export.quantize import quantize_checkpoint

    return ExportedRuntime(quantize_checkpoint(checkpoint, tmp_path / "onnx", "onnx"))


@pytest.mark.parametrize("make_backend", [_llamacpp_backend, _onnx_backend], ids=["llamacpp", "onnx"])
def test_other_backends_serve_the_same_greedy_reply(make_backend, checkpoint, client, tmp_path):
    expected = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=16, temperature=0)
    with serving(make_backend(checkpoint, tmp_path)) as (url, engine):
        other = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = other.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == expected.choices[0].message.content
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
        stream = other.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=16, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.choices[0].message.content
        assert engine.max_batch_size == 1  # these runtimes decode one sequence at a time: requests queue


@pytest.mark.parametrize("make_backend", [_llamacpp_backend, _onnx_backend], ids=["llamacpp", "onnx"])
def test_other_backends_give_logprobs_and_llamacpp_refuses_prompt_logprobs(make_backend, checkpoint, client, tmp_path):
    """Generated tokens' logprobs on every backend (llama.cpp's f16 weights round them); the prompt's where the
    runtime keeps every position's logits (onnx), a one-line 400 naming the backend where it does not (llamacpp)."""
    expected = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2).choices[0].logprobs.content
    scored = {"prompt": "这本书很好", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    reference = post(f"{client.base_url}completions", scored).json()["choices"][0]["logprobs"]["token_logprobs"]
    with serving(make_backend(checkpoint, tmp_path)) as (url, engine):
        other = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        content = other.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2).choices[0].logprobs.content
        tolerance = 5e-2 if engine.runtime.backend == "llamacpp" else 1e-3
        assert [entry.bytes for entry in content] == [entry.bytes for entry in expected]
        assert [entry.logprob for entry in content] == pytest.approx([entry.logprob for entry in expected], abs=tolerance)
        assert [len(entry.top_logprobs) for entry in content] == [2] * len(content)
        response = post(url + "/v1/completions", scored)
        if engine.runtime.backend == "llamacpp":
            assert_openai_error(response, 400, "unsupported_parameter", "echo")
            assert "llamacpp" in response.json()["error"]["message"]
        else:
            token_logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert token_logprobs[0] is None and token_logprobs[1:] == pytest.approx(reference[1:], abs=1e-3)
