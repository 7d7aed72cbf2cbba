"""`tinyllm demo`: the conversation sent to the model, the Space app, and the chat UI driven in headless Chromium.

The browser test needs Debian's Chromium and Playwright's Python package (CI installs both):
    apt-get install -y chromium fonts-wqy-zenhei && pip install playwright
Screenshots land in test-artifacts/.
"""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason='the demo needs the serve extra: pip install "tinyllm-hf[serve]"')
httpx = pytest.importorskip("httpx")

from scripted_runtime import ScriptedRuntime  # noqa: E402
from serve_fixtures import (  # noqa: E402
    IDIOM_ANSWER,
    IDIOM_QUESTION,
    SlowRuntime,
    build_chat_checkpoint,
    call_then_answer,
    free_port,
)

from tinyllm_hf.inference.demo import build_demo, conversation, launch, reply_messages  # noqa: E402
from tinyllm_hf.inference.engine import Engine  # noqa: E402
from tinyllm_hf.inference.runtime import TransformersRuntime  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
APP = Path(__file__).resolve().parents[1] / "tinyllm_hf" / "inference" / "app.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_chat_checkpoint(tmp_path_factory.mktemp("demo") / "model")
    # The UI test needs a reply of many tokens; a zero EOS embedding (tied to the output layer) gives EOS a logit of 0
    # against the large logits of the other tokens, so the random model practically never stops early.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] = 0.0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(checkpoint):
    return TransformersRuntime.from_pretrained(checkpoint)


class RecordingEngine(Engine):
    """An engine that remembers every prompt it was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[list[int]] = []

    def submit(self, prompt_ids, params, sink):
        self.prompts.append(list(prompt_ids))
        return super().submit(prompt_ids, params, sink)


def test_conversation_keeps_every_turn_and_gradio_text_parts():
    history = [
        {"role": "user", "content": "第一问"},
        {"role": "assistant", "content": [{"type": "text", "text": "第一答"}]},
    ]
    assert conversation("  你是助手 ", history, "第二问") == [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "第一问"},
        {"role": "assistant", "content": "第一答"},
        {"role": "user", "content": "第二问"},
    ]
    assert conversation("", [], "问")[0]["role"] == "user"  # an empty system prompt leaves the template's default


def test_reply_sends_the_whole_history_and_grows(backend):
    engine = RecordingEngine(backend)
    try:
        messages = conversation("你是助手", [{"role": "user", "content": "第一问"},
                                            {"role": "assistant", "content": "第一答"}], "第二问")
        # Tools off: the random model's reply is one round of text (tests/test_demo.py runs the tool calls).
        replies = [reply for (reply,) in reply_messages(engine, messages, None, temperature=0.0, top_p=1.0,
                                                        max_tokens=12)]
        prompt = backend.tokenizer.decode(engine.prompts[0])
        assert prompt == backend.render_chat(messages)
        assert prompt.index("第一问") < prompt.index("第一答") < prompt.index("第二问")
        texts = [reply["content"] for reply in replies]
        assert len(texts) > 1 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))

        # Closing the generator early (the Stop button) cancels the sequence in the engine.
        stream = reply_messages(engine, messages, None, temperature=0.0, top_p=1.0, max_tokens=200)
        next(stream)
        stream.close()
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.finished["cancelled"] == 1
    finally:
        engine.close()


def test_space_app_runs_unchanged(checkpoint):
    port = free_port()
    env = {**os.environ, "TINYLLM_MODEL": str(checkpoint), "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, page = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200, proc.stderr.read().decode() if proc.poll() else None
        assert "tinyllm chat" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} not found: apt-get install -y chromium fonts-wqy-zenhei (CI installs it)")


@contextlib.contextmanager
def demo_page(engine, **demo_args):
    """The demo on `engine`, served on a free port and opened in headless Chromium; yields the page."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    demo = build_demo(engine, **demo_args)
    _, url, _ = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"]
            )
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url, wait_until="domcontentloaded")  # Gradio keeps a connection open: never "networkidle"
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            yield page
            browser.close()
    finally:
        demo.close()
        engine.close()


@needs_chromium
def test_chat_in_headless_chromium(backend):
    ARTIFACTS.mkdir(exist_ok=True)
    # A short pause per token keeps each reply streaming long enough to watch it grow and to press Stop mid-way.
    engine = RecordingEngine(SlowRuntime(backend, delay=0.02))
    bot = "#chatbot [data-testid='bot']"
    # Tools off: a random model's reply is text (the tool calls are scripted, in the test below and tests/test_demo.py).
    with demo_page(engine, tools=False) as page:
        # Record the reply's length at every DOM change: a streamed reply passes through several lengths.
        page.evaluate("""() => {
            window.replyLengths = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll("#chatbot [data-testid='bot']");
                if (bots.length) window.replyLengths.push(bots[bots.length - 1].innerText.length);
            }).observe(document.querySelector("#chatbot"), {childList: true, subtree: true, characterData: true});
        }""")

        # Turn 1: type, press Enter, watch the reply stream in, press Stop before it completes.
        page.fill("#prompt textarea", "你好，请介绍一下你自己")
        page.press("#prompt textarea", "Enter")
        page.wait_for_function(f"() => document.querySelector(\"{bot}\")?.innerText.length > 20", timeout=60_000)
        page.click("#stop")
        deadline = time.monotonic() + 10
        while engine.finished["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.finished["cancelled"] == 1, "Stop did not cancel the generation"
        lengths = [n for n in page.evaluate("window.replyLengths") if n > 0]
        assert len(set(lengths)) >= 3, f"the reply did not stream: lengths seen {lengths}"
        first_reply = page.locator(bot).last.inner_text()

        # Turn 2: the model receives the first turn too.
        page.fill("#prompt textarea", "再说一遍")
        page.click("#send")
        page.wait_for_function(f"() => document.querySelectorAll(\"{bot}\").length == 2", timeout=60_000)
        page.wait_for_function(f"() => document.querySelectorAll(\"{bot}\")[1].innerText.length > 5", timeout=60_000)
        second_prompt = backend.tokenizer.decode(engine.prompts[1])
        assert "你好，请介绍一下你自己" in second_prompt and "再说一遍" in second_prompt
        assert second_prompt.count("<|assistant|>") == 2 and first_reply.strip()
        page.screenshot(path=str(ARTIFACTS / "demo-chat.png"))

        # Clear empties the conversation.
        page.click("#clear")
        page.wait_for_function(f"() => document.querySelectorAll(\"{bot}\").length == 0", timeout=30_000)


@needs_chromium
def test_tool_call_shows_in_headless_chromium(backend):
    from tinyllm_hf.tasks.tools import idiom_lookup

    ARTIFACTS.mkdir(exist_ok=True)
    # The model never runs; the tool list fills most of the tiny model's 256 tokens.
    engine = Engine(ScriptedRuntime(backend, call_then_answer, max_batch_size=1, context_length=1024))
    with demo_page(engine) as page:
        page.fill("#prompt textarea", IDIOM_QUESTION)
        page.press("#prompt textarea", "Enter")
        chat = page.locator("#chatbot")
        chat.get_by_text('调用 idiom_lookup(word="画蛇添足")').wait_for(timeout=60_000)
        chat.get_by_text(IDIOM_ANSWER).wait_for(timeout=60_000)
        chat.get_by_text('调用 idiom_lookup(word="画蛇添足")').click()  # open the box: the result is inside
        chat.get_by_text(idiom_lookup("画蛇添足")).wait_for(timeout=30_000)
        page.wait_for_timeout(500)  # the box opens with an animation
        page.screenshot(path=str(ARTIFACTS / "demo-tool-call.png"))
