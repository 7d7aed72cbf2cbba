"""`tinyllm demo`'s replies without a browser: the tool loop through the serving engine, tool calls as chat messages;
and its login (--auth / $TINYLLM_DEMO_AUTH) and bounded queue (--max-queue).

The model is the tiny random checkpoint with scripted replies (`scripted_runtime.ScriptedRuntime`): its tokenizer and
chat template are real, and it writes a tool call to a new question and an answer once the tool's result is in its
prompt, so the engine, the tool loop, the built-in tools and the demo's messages all run as with a trained model.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripted_runtime import ScriptedRuntime  # noqa: E402
from serve_fixtures import (  # noqa: E402
    IDIOM_ANSWER, IDIOM_CALL, IDIOM_QUESTION, call_then_answer, free_port, non_loopback_address, refuses_connections,
)

from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.errors import GenerationError, UsageError  # noqa: E402
from tinyllm_hf.inference.demo import (  # noqa: E402
    AUTH_ENV,
    DEFAULT_MAX_QUEUE,
    build_demo,
    build_parser,
    conversation,
    launch,
    parse_auth,
    reply_messages,
    tool_call_token,
    tool_message,
)
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import (  # noqa: E402
    SamplingParams,
    TransformersRuntime,
    stream_batch,
)
from tinyllm_hf.inference.tool_loop import Toolbox, run_tool_loop  # noqa: E402
from tinyllm_hf.tasks.tools import idiom_lookup  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import (  # noqa: E402
    ASSISTANT_TOKEN,
    TOOL_CALL_START,
    TOOL_TOKEN,
    TOOLS_TOKEN,
)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return TransformersRuntime.from_pretrained(tiny_model_dir)


@pytest.fixture
def runtime(backend):
    # The model never runs, so its context can be longer: the tiny tokenizer spends most of the tiny model's 256
    # tokens on a prompt that lists the built-in tools. One sequence at a time: the engine queues, never merges.
    return ScriptedRuntime(backend, call_then_answer, max_batch_size=1, context_length=1024)


def run_reply(runtime, toolbox, **engine_args) -> list[list[dict]]:
    engine = Engine(runtime, **engine_args)
    try:
        return list(reply_messages(engine, conversation("", [], IDIOM_QUESTION), toolbox, temperature=0.7, top_p=0.9,
                                   max_tokens=64))
    finally:
        engine.close()


def test_a_tool_call_and_its_result_show_before_the_streamed_answer(backend, runtime):
    replies = run_reply(runtime, Toolbox.builtin())
    result = idiom_lookup("画蛇添足")
    call, answer = replies[-1]
    assert call == tool_message("idiom_lookup", {"word": "画蛇添足"}, result)
    assert call["metadata"]["title"] == '调用 idiom_lookup(word="画蛇添足")' and call["content"] == result
    assert answer == {"role": "assistant", "content": IDIOM_ANSWER}
    # The call is shown alone first (it ran before the answer began), then the answer grows token by token.
    assert replies[0] == [call]
    answers = [reply[1]["content"] for reply in replies[1:]]
    assert len(answers) >= 3 and all(b.startswith(a) for a, b in zip(answers, answers[1:]))
    # The call's markup never streams as text: the round that calls a tool shows nothing until the call has run.
    assert not any(TOOL_CALL_START in m["content"] or '"arguments"' in m["content"] for r in replies for m in r)
    # The model was shown the tools, then read the result in its second prompt.
    assert TOOLS_TOKEN in runtime.prompts[0]
    assert runtime.prompts[1].endswith(f"{TOOL_TOKEN}\n{result}\n{ASSISTANT_TOKEN}\n")


def test_tools_off_offers_no_tools_and_runs_one_round(backend, runtime):
    (reply,) = run_reply(runtime, None)[-1:]
    assert TOOLS_TOKEN not in runtime.prompts[0] and len(runtime.prompts) == 1
    # Without tools a call is only text (control tokens dropped, as every plain reply is shown).
    assert reply == [{"role": "assistant", "content": backend.decode_text(backend.encode(IDIOM_CALL))}]


def test_engine_stream_batch_generates_as_runtime_stream_batch(runtime):
    """The engine-backed round yields what the runtime's own loop yields, the ending EOS included, so the tool loop
    on it ends its conversations the same way ("stop" after an EOS, "length" at the budget)."""
    prompts = [runtime.encode(runtime.render_chat([{"role": "user", "content": q}])) for q in ("你好", IDIOM_QUESTION)]
    engine = Engine(runtime)
    try:
        for budget in (64, 3):
            params = SamplingParams(max_tokens=budget, temperature=0.7, seed=1)
            got = list(engine.stream_batch(prompts, [params, params]))
            for row, prompt in enumerate(prompts):
                expected = [token for _, token in stream_batch(runtime, [prompt], [params])]
                assert [token for r, token in got if r == row] == expected
            assert (got[-1][1] in runtime.eos_token_ids) == (budget == 64)

        messages, params = [[{"role": "user", "content": IDIOM_QUESTION}]], [SamplingParams(max_tokens=64)]
        default = run_tool_loop(runtime, messages, Toolbox.builtin(), params)
        through_engine = run_tool_loop(runtime, messages, Toolbox.builtin(), params, generate_round=engine.stream_batch)
        assert through_engine == default and default[0].finish_reason == "stop" and default[0].content == IDIOM_ANSWER
    finally:
        engine.close()


def test_an_engine_failure_ends_the_reply_with_its_reason(runtime):
    *_, reply = run_reply(runtime, Toolbox.builtin(), request_timeout=0.0)
    assert reply[-1]["content"] == "[generation timeout: the request timed out while waiting in the queue]"
    engine = Engine(runtime, request_timeout=0.0)
    try:
        with pytest.raises(GenerationError, match="timeout"):
            list(engine.stream_batch([runtime.encode("你好")], [SamplingParams(max_tokens=4)]))
    finally:
        engine.close()


def test_earlier_turns_send_the_answers_and_keep_tool_calls_in_the_chat():
    history = [
        {"role": "user", "content": IDIOM_QUESTION},
        {"role": "assistant", "content": "我查一下。"},
        tool_message("idiom_lookup", {"word": "画蛇添足"}, "结果"),
        {"role": "assistant", "content": IDIOM_ANSWER, "metadata": None},
    ]
    assert conversation("", history, "谢谢") == [
        {"role": "user", "content": IDIOM_QUESTION},
        {"role": "assistant", "content": "我查一下。\n" + IDIOM_ANSWER},
        {"role": "user", "content": "谢谢"},
    ]


def test_tools_are_on_unless_turned_off_and_need_the_tool_tokens(runtime):
    assert build_parser().parse_args(["--model", "m"]).tools == "on"
    assert build_parser().parse_args(["--model", "m", "--tools", "off"]).tools == "off"
    assert runtime.decode_raw([tool_call_token(runtime)]) == TOOL_CALL_START

    class OlderTokenizer:  # one trained before the tool tokens: <tool_call> is several ordinary tokens
        def encode(self, text):
            return list(text.encode())

    with pytest.raises(UsageError, match="--tools off"):
        tool_call_token(OlderTokenizer())


# ---------------------------------------------------------------------------------------------------------------------
# Login and queue
# ---------------------------------------------------------------------------------------------------------------------


def test_auth_is_user_colon_password_and_a_bad_one_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    assert parse_auth("ada:s3:cret") == ("ada", "s3:cret")  # the password may hold colons
    for bad in ("ada", ":s3cret", "ada:"):
        with pytest.raises(UsageError, match="USER:PASSWORD") as error:
            parse_auth(bad)
        assert "s3cret" not in str(error.value)  # the error never repeats a password
    missing_model = str(tmp_path / "nothing")  # loading it would fail: the auth check must come first
    for argv, env in ((["--auth", "ada"], None), ([], "ada")):
        if env is None:
            monkeypatch.delenv(AUTH_ENV, raising=False)
        else:
            monkeypatch.setenv(AUTH_ENV, env)
        assert tinyllm(["demo", "--model", missing_model, *argv]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("tinyllm demo: error: --auth / $TINYLLM_DEMO_AUTH must be USER:PASSWORD")
    monkeypatch.setenv(AUTH_ENV, "ada:s3cret")
    assert build_parser().parse_args(["--model", "m"]).auth == "ada:s3cret"
    assert build_parser().parse_args(["--model", "m"]).max_queue == DEFAULT_MAX_QUEUE
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--max-queue", "0"])


def test_space_app_refuses_a_bad_auth_secret_before_loading(monkeypatch):
    from tinyllm_hf.inference import app

    monkeypatch.setenv(AUTH_ENV, "no-colon")
    monkeypatch.setenv("TINYLLM_MODEL", "/nonexistent/model")
    with pytest.raises(SystemExit, match="must be USER:PASSWORD"):
        app.main()
    monkeypatch.setenv(AUTH_ENV, "ada:s3cret")
    assert app.login() == ("ada", "s3cret")


def test_launched_demo_listens_on_loopback_asks_for_the_login_and_bounds_its_queue(backend):
    pytest.importorskip("gradio", reason='the demo needs the serve extra: pip install "tinyllm-hf[serve]"')
    httpx = pytest.importorskip("httpx")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    engine = Engine(backend)
    demo = build_demo(engine, tools=False)
    try:
        _, url, _ = launch(demo, port=free_port(), auth=("ada", "s3cret"), max_queue=3, prevent_thread_lock=True,
                           quiet=True)
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        address = non_loopback_address()  # bound to 127.0.0.1 by default: the network address refuses the port
        assert url.startswith("http://127.0.0.1:") and (address is None or refuses_connections(address, port))
        with httpx.Client(base_url=url, timeout=30) as browser:
            assert browser.get("config").status_code == 401  # the app's config (and its events) need the login
            assert browser.post("login", data={"username": "ada", "password": "wrong"}).status_code == 400
            assert browser.post("login", data={"username": "ada", "password": "s3cret"}).status_code == 200
            assert browser.get("config").status_code == 200
        assert demo._queue.max_size == 3  # past it Gradio answers "Queue is full" instead of queueing
    finally:
        demo.close()
        engine.close()
