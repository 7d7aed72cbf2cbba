"""`tinyllm serve`: the OpenAI API as the official `openai` client sees it, batching, overload, cancel, timeout, bad input."""

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
    SlowRuntime, assert_openai_error, build_chat_checkpoint, free_port, post, run_uvicorn,
)
from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import TransformersRuntime  # noqa: E402
from tinyllm_hf.inference.server import build_app  # noqa: E402

MODEL_ID = "tiny-chat"
HELLO = [{"role": "user", "content": "你好，今天怎么样？"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def backend(checkpoint):
    return TransformersRuntime.from_pretrained(checkpoint)


@contextlib.contextmanager
def serving(backend, api_key=None, **engine_kwargs):
    """(base URL, engine) of a server on a free loopback port; the engine thread is stopped afterwards."""
    engine = Engine(backend, **engine_kwargs)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID, api_key=api_key)) as url:
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
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_chat_request_gets_openai_error(server, case):
    body, status, code, param = BAD_REQUESTS[case]
    assert_openai_error(post(server[0] + "/v1/chat/completions", body), status, code, param)


def test_bad_requests_leave_the_server_serving(server, client):
    for body, *_ in BAD_REQUESTS.values():
        post(server[0] + "/v1/chat/completions", body)
    assert_openai_error(post(server[0] + "/v1/completions", {"prompt": ""}), 400, "invalid_value", "prompt")
    assert_openai_error(httpx.get(server[0] + "/v1/nothing"), 404, "not_found")
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_when_set(backend):
    with serving(backend, api_key="sk-right") as (url, _):
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert_openai_error(post(url + "/v1/chat/completions", {"messages": HELLO}), 401, "invalid_api_key")
        right = openai.OpenAI(base_url=url + "/v1", api_key="sk-right", max_retries=0)
        assert right.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2).choices


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
        assert not engine.running


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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Bound to 127.0.0.1 only: the startup line says so.
    assert f"http://127.0.0.1:{port}/v1" in proc.stderr.read()


def test_cli_rejects_a_missing_model(tmp_path, capsys):
    assert tinyllm(["serve", "--model", str(tmp_path / "nothing")]) == 1
    assert "config.json not found" in capsys.readouterr().err


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
