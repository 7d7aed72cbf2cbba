"""`tinyllm serve`'s logprobs: chat's `logprobs` / `top_logprobs`, completions' `logprobs` with `echo` (prompt
logprobs) and `max_tokens` 0, checked against the model's own log-softmax; concurrent requests never mix them, and
only the rows that ask compute them; a reply cut inside a character; bad input."""

import concurrent.futures
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "tinyllm-hf[serve]"')
openai = pytest.importorskip("openai", reason="the API tests use the official openai client: pip install openai")

from scripted_runtime import ScriptedRuntime  # noqa: E402
from serve_fixtures import SlowRuntime, assert_openai_error, build_chat_checkpoint, post, run_uvicorn  # noqa: E402
from tinyllm_hf.inference import engine as engine_module  # noqa: E402
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime, generate  # noqa: E402
from tinyllm_hf.inference.server import build_app  # noqa: E402
from tinyllm_hf.inference.text_stream import incomplete_utf8_tail  # noqa: E402

MODEL_ID = "tiny-chat"
HELLO = [{"role": "user", "content": "你好，今天怎么样？"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return TransformersRuntime.from_pretrained(build_chat_checkpoint(tmp_path_factory.mktemp("logprobs") / "model"))


@pytest.fixture(scope="module")
def server(backend):
    engine = Engine(backend, max_batch_size=8)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(runtime, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's log-softmax at each position that predicts one of `tokens` (after `prompt`): (len(tokens), vocab)."""
    logits = runtime.logits(prompt + tokens)[len(prompt) - 1: len(prompt) + len(tokens) - 1]
    return torch.log_softmax(logits, dim=-1)


def greedy(runtime, prompt: list[int], max_tokens: int) -> list[int]:
    return generate(runtime, prompt, SamplingParams(max_tokens, temperature=0.0), eos_token_ids=())


def assert_chat_logprobs(runtime, content: list[dict], prompt: list[int], tokens: list[int], top: int) -> None:
    """`content` is chat's logprobs of `tokens` after `prompt`: values, bytes and the `top` most likely, in order."""
    expected = reference(runtime, prompt, tokens)
    assert len(content) == len(tokens)
    for entry, token, row in zip(content, tokens, expected):
        assert bytes(entry["bytes"]) == runtime.token_bytes(token)
        assert entry["token"] == runtime.token_bytes(token).decode("utf-8", errors="replace")
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        values, ids = row.topk(top)
        assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == [runtime.token_bytes(i) for i in ids.tolist()]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)


def test_chat_logprobs_are_the_models_log_softmax_streamed_or_not(client, backend):
    prompt = backend.encode_chat(HELLO)
    tokens = greedy(backend, prompt, 8)
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = [entry.model_dump() for entry in reply.choices[0].logprobs.content]
    assert_chat_logprobs(backend, content, prompt, tokens, 3)
    # Greedy: each token is the most likely one; its bytes add up to the reply (less an incomplete last character).
    assert all(entry["token"] == entry["top_logprobs"][0]["token"] for entry in content)
    data = b"".join(bytes(entry["bytes"]) for entry in content)
    assert reply.choices[0].message.content == data[: len(data) - incomplete_utf8_tail(data)].decode(errors="replace")

    stream = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed, text = [], ""
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None:
            streamed += [entry.model_dump() for entry in choice.logprobs.content]
            so_far = b"".join(bytes(entry["bytes"]) for entry in streamed)
            # A chunk carries the tokens of its text: the text so far is what the tokens so far spell.
            assert so_far.decode("utf-8", errors="replace").startswith(text)
    assert text == reply.choices[0].message.content
    assert [e["bytes"] for e in streamed] == [e["bytes"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)

    plain = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    # logprobs without top_logprobs: the sampled token's only.
    bare = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2, temperature=0, logprobs=True)
    assert [entry.top_logprobs for entry in bare.choices[0].logprobs.content] == [[], []]


def test_logprobs_are_of_the_raw_distribution_whatever_the_temperature(client, backend):
    prompt = backend.encode_chat(HELLO)
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=1.5, top_p=0.5,
                                           seed=3, logprobs=True, top_logprobs=2)
    content = [entry.model_dump() for entry in reply.choices[0].logprobs.content]
    # The sampled tokens, found back from their bytes (each token of this tokenizer has its own), scored by the model.
    by_bytes = {backend.token_bytes(i): i for i in range(backend.vocab_size)}
    assert len(by_bytes) == backend.vocab_size
    tokens = [by_bytes[bytes(entry["bytes"])] for entry in content]
    assert_chat_logprobs(backend, content, prompt, tokens, 2)


def test_completions_echo_gives_the_prompt_logprobs_and_max_tokens_0_only_the_prompt(client, backend):
    text = "这本书很好，我很喜欢。"
    prompt = backend.encode(text)
    reply = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(backend, prompt[:1], prompt[1:])
    for i, token in enumerate(prompt[1:], start=1):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i - 1, token].item(), abs=1e-4)
        top = logprobs.top_logprobs[i]
        assert logprobs.tokens[i] in top and len(top) in (2, 3)  # the 2 most likely and the token itself
        assert max(top.values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    # Offsets: where each token's text starts in the returned text.
    assert logprobs.text_offset[0] == 0
    for i, token_text in enumerate(logprobs.tokens[:-1]):
        if not token_text.startswith("bytes:"):  # a token with part of a character is named by its bytes
            assert text[logprobs.text_offset[i]:].startswith(token_text)

    # What lm-eval's local-completions sends: token ids (a batch of them), echo, logprobs 1, max_tokens 1. The
    # prompt's logprobs then the generated token's, whose text follows the echoed prompt.
    batch = [prompt, prompt[:4]]
    out = post(f"{client.base_url}completions", {"model": MODEL_ID, "prompt": batch, "echo": True,
                                                           "logprobs": 1, "max_tokens": 1, "temperature": 0})
    assert out.status_code == 200, out.text
    for choice, ids in zip(sorted(out.json()["choices"], key=lambda c: c["index"]), batch):
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(ids) + 1 and token_logprobs[0] is None
        assert token_logprobs[1:len(ids)] == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                           abs=1e-4)
        assert choice["text"].startswith(backend.decode_raw(ids))

    streamed = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=3, echo=True, logprobs=1,
                                         temperature=0, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].text == text and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    flat = [lp for chunk in chunks for lp in (chunk.choices[0].logprobs.token_logprobs if chunk.choices[0].logprobs else [])]
    whole = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=3, echo=True, logprobs=1, temperature=0)
    assert flat[1:] == pytest.approx(whole.choices[0].logprobs.token_logprobs[1:], abs=1e-5)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text

    # echo and max_tokens 0 without logprobs: the prompt, and no model run.
    only = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=0, echo=True)
    assert only.choices[0].text == text and only.choices[0].logprobs is None


def test_concurrent_requests_get_their_own_logprobs_and_only_rows_that_ask_compute_them(backend, monkeypatch):
    prompts = [backend.encode_chat([{"role": "user", "content": f"第{i}个问题：{'为什么' * (i + 1)}"}]) for i in range(6)]
    computed = []
    real = engine_module.token_logprobs
    monkeypatch.setattr(engine_module, "token_logprobs", lambda logits, *a: computed.append(len(logits)) or real(logits, *a))
    slow = SlowRuntime(backend, delay=0.02)  # no EOS: every request runs its whole budget, side by side
    engine = Engine(slow, max_batch_size=8)
    widths = []
    decode = slow.decode
    slow.decode = lambda tokens, state: widths.append(len(tokens)) or decode(tokens, state)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            def ask(i):
                body = {"messages": [{"role": "user", "content": f"第{i}个问题：{'为什么' * (i + 1)}"}], "max_tokens": 6,
                        "temperature": 0}
                if i % 2 == 0:
                    body |= {"logprobs": True, "top_logprobs": i // 2 + 1}
                else:
                    body |= {"temperature": 1.0, "seed": i}  # bystanders that sample
                return post(url + "/v1/chat/completions", body).json()

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                replies = list(pool.map(ask, range(6)))
    finally:
        engine.close()
    assert max(widths) >= 3, "the requests never shared a decode step"
    for i, reply in enumerate(replies):
        logprobs = reply["choices"][0]["logprobs"]
        if i % 2:
            assert logprobs is None
            continue
        tokens = greedy(backend, prompts[i], 6)
        assert_chat_logprobs(backend, logprobs["content"], prompts[i], tokens, i // 2 + 1)
    assert computed == [1] * (3 * 6)  # one row's logits per token of the three that asked, never a bystander's


# A reply cut by max_tokens inside a character


def split_character_reply(runtime) -> tuple[str, int]:
    """A reply and a token budget that ends it inside a character (the tiny tokenizer splits rare characters)."""
    reply = "饕餮盛宴，魑魅魍魉。"
    tokens = runtime.encode(reply)
    for cut in range(1, len(tokens)):
        if incomplete_utf8_tail(b"".join(map(runtime.token_bytes, tokens[:cut]))):
            return reply, cut
    raise AssertionError(f"the tokenizer keeps every character of {reply!r} whole")


def test_a_reply_cut_inside_a_character_ends_before_it_and_its_bytes_stay_in_the_logprobs(backend):
    reply, cut = split_character_reply(backend)
    scripted = ScriptedRuntime(backend, lambda prompt: reply + "\ufffd")  # and a U+FFFD the model wrote itself
    tokens = scripted.encode(reply + "\ufffd")
    data = b"".join(map(backend.token_bytes, tokens[:cut]))
    complete = data[: len(data) - incomplete_utf8_tail(data)].decode(errors="replace")
    engine = Engine(scripted)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for chat in (True, False):
                create = client.chat.completions.create if chat else client.completions.create
                request = {"messages": HELLO} if chat else {"prompt": "你好"}
                whole = create(model=MODEL_ID, max_tokens=cut, logprobs=True if chat else 0, **request)
                stream = create(model=MODEL_ID, max_tokens=cut, stream=True, **request)
                text = whole.choices[0].message.content if chat else whole.choices[0].text
                streamed = "".join((c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in stream)
                assert text == streamed == complete and whole.choices[0].finish_reason == "length"
                # Nothing is lost: the incomplete character's bytes are in the last token's logprob.
                named = whole.choices[0].logprobs.content if chat else whole.choices[0].logprobs.tokens
                if chat:
                    assert b"".join(bytes(entry.bytes) for entry in named) == data
                else:
                    assert named[-1].startswith("bytes:") and "".join(named[:-1]) in complete
            # The whole reply, ending in a U+FFFD the model wrote (complete bytes): kept.
            full = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=len(tokens) + 1)
            assert full.choices[0].message.content == reply + "\ufffd"
    finally:
        engine.close()


# Bad input: one-line 400s naming the field


@pytest.mark.parametrize(("path", "body", "param"), [
    ("chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat/completions", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": HELLO, "logprobs": 1}, "logprobs"),
    ("chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "书", "logprobs": True}, "logprobs"),
    ("completions", {"prompt": "书", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "书", "logprobs": "1"}, "logprobs"),
    ("completions", {"prompt": "书", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": [1, 10**6]}, "prompt"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
])
def test_bad_logprobs_requests_are_one_line_400s_naming_the_field(server, path, body, param):
    response = post(f"{server[0]}/v1/{path}", {"model": MODEL_ID, **body})
    assert_openai_error(response, 400, param=param)
    message = response.json()["error"]["message"]
    assert "\n" not in message and param in message, message


def test_echo_with_logprobs_is_a_400_naming_a_runtime_without_prompt_logits(backend):
    class LastLogitsOnly(ScriptedRuntime):  # as llama.cpp is served: the last position's logits only
        backend = "llamacpp"
        prompt_logits = False

    engine = Engine(LastLogitsOnly(backend, lambda prompt: "好"))
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            response = post(url + "/v1/completions", {"prompt": "书", "echo": True, "logprobs": 1, "max_tokens": 1})
            assert_openai_error(response, 400, "unsupported_parameter", "echo")
            assert "llamacpp" in response.json()["error"]["message"]
            ok = post(url + "/v1/completions", {"prompt": "书", "logprobs": 1, "max_tokens": 1}).json()
            assert ok["choices"][0]["logprobs"]["token_logprobs"] == [0.0]  # generated tokens' logprobs still work
    finally:
        engine.close()


def test_json_of_logprobs_is_plain_json(server):
    # Values are floats and ints only (no NaN / tensors): the body parses as strict JSON.
    response = post(server[0] + "/v1/completions", {"prompt": "书", "echo": True, "logprobs": 1, "max_tokens": 1})
    json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in the body"))


# lm-evaluation-harness through the server: its local-completions model scores prompts with echo + logprobs


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.mark.skipif(not (FIXTURES / "ceval").is_dir(), reason=f"benchmark fixtures not found at {FIXTURES}")
def test_lm_eval_local_completions_against_the_server_agrees_with_lm_eval_hf(tiny_tokenizer_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from conftest import tiny_config
    from tinyllm_hf import TinyllmForCausalLM
    from tinyllm_hf.evaluation import harness

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = tiny_config(tokenizer, max_position_embeddings=2048)  # room for a whole question, never truncated
    config.initializer_range = 0.5  # peaked option scores: the argmax is robust to float noise
    torch.manual_seed(0)
    TinyllmForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("TINYLLM_CEVAL_DIR", str(FIXTURES / "ceval"))
    task = "tinyllm_ceval_chinese_language_and_literature"  # its questions are short: seconds for a few of them

    def evaluate(model: str, model_args: dict) -> dict:
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=[task], num_fewshot=0, limit=8, device="cpu", log_samples=True,
            task_manager=TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False),
            bootstrap_iters=0,  # no stderr estimates: they take longer than the evaluation
        )

    hf = evaluate("hf", {"pretrained": str(tmp_path / "model"), "dtype": "float32", "trust_remote_code": True})
    engine = Engine(TransformersRuntime.from_pretrained(tmp_path / "model"), max_batch_size=4)
    try:
        with run_uvicorn(build_app(engine, MODEL_ID)) as url:
            # Its default: prompts as token ids, 4 to a request (a list of lists), echo, logprobs 1, max_tokens 1.
            served = evaluate("local-completions", {
                "base_url": f"{url}/v1/completions", "model": MODEL_ID, "tokenizer_backend": "huggingface",
                "tokenizer": str(tmp_path / "model"), "batch_size": 4, "max_retries": 1,
            })
    finally:
        engine.close()
    assert served["results"][task]["acc,none"] == hf["results"][task]["acc,none"]
    theirs = {sample["doc_id"]: [resp[0][0] for resp in sample["resps"]] for sample in hf["samples"][task]}
    ours = {sample["doc_id"]: [resp[0][0] for resp in sample["resps"]] for sample in served["samples"][task]}
    assert sorted(ours) == sorted(theirs) == list(range(8))
    for doc_id, scores in theirs.items():
        assert ours[doc_id] == pytest.approx(scores, abs=1e-3)
    assert len({round(score, 3) for scores in theirs.values() for score in scores}) > 8  # real, distinct scores
