"""`tinyllm demo`: a Gradio web chat over the same engine as `tinyllm serve`.

    tinyllm demo --model out/sft                      # http://127.0.0.1:7860
    tinyllm demo --model out/model-f16.gguf --backend llamacpp

    tinyllm demo --model out/sft --tools off          # no tools offered to the model
    tinyllm demo --model out/sft --host 0.0.0.0 --auth user:secret   # on the network: a login first

Tokens stream into the chat as they are generated; every turn sends the whole conversation (system prompt, earlier
user and assistant turns, the new message) through the model's chat template; the system prompt and the sampling
settings are editable; Stop ends the generation (the engine frees the sequence) and Clear starts a new conversation.
Several users share the engine, so their requests are decoded in one batch; Gradio's queue of waiting replies is
bounded (`--max-queue`: past it a user is told the queue is full), and `--auth USER:PASSWORD` (or
$TINYLLM_DEMO_AUTH) puts Gradio's login in front of the chat. `app.py` runs this demo on a Space.

With tools on (the default) the model is offered the built-in tools (`tinyllm_hf.tasks.tools`: idiom, word and
歇后语 lookups, a calculator) and each reply runs the tool loop (`tool_loop.tool_loop`, generating through the
engine's `stream_batch`): every call the model makes appears in the chat as a collapsible message titled with the
call and holding its result, and the answer the model writes after the results streams below them. Earlier turns go
back to the model as the user's messages and the assistant's answers; their tool calls and results stay in the chat
only (a small model's context is 256 tokens).
"""

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tinyllm_hf.errors import EngineOverloaded, GenerationError, UsageError
from tinyllm_hf.inference.model_files import LOOPBACK_HOSTS, add_runtime_arguments, positive_int
from tinyllm_hf.inference.text_stream import held_back

# engine.py and runtime.py import torch: they are imported in the functions that use them, so that `tinyllm demo
# --help` answers without loading torch.
if TYPE_CHECKING:
    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.tool_loop import Toolbox

TITLE = "tinyllm chat"
AUTH_ENV = "TINYLLM_DEMO_AUTH"  # USER:PASSWORD for the login, for `tinyllm demo` and the Space app
DEFAULT_MAX_QUEUE = 64  # replies waiting in Gradio's queue (beyond those generating) before a user is turned away


def message_text(content) -> str:
    """The text of a Gradio chat message, whose content is a string or a list of parts (`{"type": "text", ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(message_text(part) for part in content or [])


def is_tool_message(turn: dict) -> bool:
    """Whether a chat message is a tool call the demo showed (titled with the call), not text the model wrote."""
    return bool((turn.get("metadata") or {}).get("title"))


def conversation(system: str, history: list[dict], user: str) -> list[dict]:
    """Chat-template messages for the model: the system prompt (if any), every earlier turn, the new user message.

    Of an earlier reply that called tools, only the text the model wrote goes back (its pieces before and after the
    calls joined into one assistant turn); the calls and their results stay in the chat."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for turn in history:
        text = message_text(turn["content"])
        if is_tool_message(turn) or turn["role"] not in ("user", "assistant") or not text.strip():
            continue
        if turn["role"] == "assistant" and messages and messages[-1]["role"] == "assistant":
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": turn["role"], "content": text})
    return messages + [{"role": "user", "content": user}]


def tool_call_token(runtime) -> int:
    """The id of `<tool_call>`, where the demo stops streaming a round's text (the call is shown once it ran)."""
    from tinyllm_hf.tokenizer.chat_template import TOOL_CALL_START  # the tokenizer package loads torch

    ids = runtime.encode(TOOL_CALL_START)
    if len(ids) != 1:
        raise UsageError(f"this model's tokenizer has no {TOOL_CALL_START} token (it predates tool use): "
                         "run the demo with --tools off")
    return ids[0]


def shown_text(runtime, tokens: list[int], call_token: int | None) -> str:
    """The text of one round's tokens as the chat shows it: up to the first tool call, control tokens dropped, an
    unfinished UTF-8 character held back until its last byte comes."""
    if call_token in tokens:
        tokens = tokens[:tokens.index(call_token)]
    text = runtime.decode_text(tokens)
    return text[:len(text) - held_back(text, ())]


def tool_message(name: str, arguments: dict, result: str) -> dict:
    """A tool call as a chat message: Gradio shows the title on a collapsible box holding the result."""
    call = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in arguments.items())
    return {"role": "assistant", "content": result, "metadata": {"title": f"调用 {name}({call})", "status": "done"}}


def invalid_call_message(call: dict) -> dict:
    """A tool call the loop could not run (bad JSON, cut off, no name), shown as the model wrote it."""
    return {"role": "assistant", "content": f"```\n{call['text']}\n```",
            "metadata": {"title": f"无效的工具调用：{call['error']}", "status": "done"}}


END_NOTES = {
    "context": "[The conversation is longer than the model's context of {context} tokens: press Clear.]",
    "tool_rounds": "[Stopped after {rounds} rounds of tool calls.]",
    "time": "[Stopped: the reply took longer than {seconds:g} seconds.]",
}


def reply_messages(engine: "Engine", messages: list[dict], toolbox: "Toolbox | None", temperature: float,
                   top_p: float, max_tokens: int) -> Iterator[list[dict]]:
    """The reply so far as chat messages, growing as the model generates: each round's text streams into an
    assistant message, each tool call becomes a message titled with the call and holding its result, and the answer
    follows them. `toolbox=None` offers no tools (one round). Closing the generator (Stop, a closed tab) cancels the
    sequence in the engine."""
    from tinyllm_hf.inference.runtime import SamplingParams
    from tinyllm_hf.inference.tool_loop import (
        DEFAULT_MAX_ROUNDS,
        DEFAULT_REPLY_SECONDS,
        TokenEvent,
        ToolEvent,
        tool_loop,
    )

    runtime = engine.runtime
    call_token = tool_call_token(runtime) if toolbox else None
    params = SamplingParams(max_tokens=int(max_tokens), temperature=temperature, top_p=top_p)
    events = tool_loop(runtime, [messages], toolbox, [params], max_tokens=int(max_tokens),
                       generate_round=engine.stream_batch, max_seconds=DEFAULT_REPLY_SECONDS)
    shown: list[dict] = []  # the messages of the rounds that are over
    tokens: list[int] = []  # the tokens of the round being generated
    text = ""

    def with_text() -> list[dict]:
        return shown + [{"role": "assistant", "content": text}] if text else shown

    try:
        for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event.token)
                grown = shown_text(runtime, tokens, call_token)
                if grown != text:
                    text = grown
                    yield with_text()
            elif isinstance(event, ToolEvent):  # the round's text (if any) stays above its calls
                shown, tokens, text = with_text() + [tool_message(event.name, event.arguments, event.result)], [], ""
                yield shown
            else:  # the DoneEvent: the answer is complete
                final = with_text() + [invalid_call_message(call) for call in event.reply["invalid_tool_calls"]]
                note = END_NOTES.get(event.finish_reason, "").format(
                    context=runtime.context_length, rounds=DEFAULT_MAX_ROUNDS, seconds=DEFAULT_REPLY_SECONDS)
                if note:
                    final.append({"role": "assistant", "content": note})
                yield final or [{"role": "assistant", "content": ""}]  # an empty reply still shows as one
    except (GenerationError, EngineOverloaded) as err:  # a timeout, a failure or a full queue ends this reply only
        yield with_text() + [{"role": "assistant", "content": f"[{err}]"}]
    finally:
        events.close()  # closes the engine's round too, which cancels its sequence


def build_demo(engine: "Engine", title: str = TITLE, default_system: str | None = None, tools: bool = True):
    """The Gradio app; `tools`: offer the model the built-in tools and run the tool loop on each reply."""
    import gradio as gr

    from tinyllm_hf.inference.tool_loop import Toolbox

    if default_system is None:
        from tinyllm_hf.tokenizer import DEFAULT_SYSTEM_PROMPT as default_system
    toolbox = Toolbox.builtin() if tools else None
    if toolbox:
        tool_call_token(engine.runtime)  # a model without the tool tokens fails here, not on the first message

    def add_user_message(user: str, history: list[dict]):
        if not user.strip():
            return "", history
        return "", history + [{"role": "user", "content": user}]

    def respond(history: list[dict], system: str, temperature: float, top_p: float, max_tokens: int):
        if not history or history[-1]["role"] != "user":
            return
        messages = conversation(system, history[:-1], message_text(history[-1]["content"]))
        for reply in reply_messages(engine, messages, toolbox, temperature, top_p, max_tokens):
            yield history + reply

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}")
        chatbot = gr.Chatbot(elem_id="chatbot", height=420, label="chat")
        with gr.Row():
            prompt = gr.Textbox(elem_id="prompt", placeholder="输入消息，回车发送", show_label=False, scale=8)
            send = gr.Button("Send", elem_id="send", variant="primary", scale=1)
            stop = gr.Button("Stop", elem_id="stop", scale=1)
            clear = gr.Button("Clear", elem_id="clear", scale=1)
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(default_system, label="System prompt", elem_id="system", lines=2)
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top_p")
            max_tokens = gr.Slider(1, engine.runtime.context_length, value=min(256, engine.runtime.context_length),
                                   step=1, label="max new tokens")

        settings = [system, temperature, top_p, max_tokens]
        runs = [
            trigger(add_user_message, [prompt, chatbot], [prompt, chatbot], queue=False)
            .then(respond, [chatbot, *settings], chatbot, concurrency_limit=engine.max_batch_size)
            for trigger in (prompt.submit, send.click)
        ]
        stop.click(None, cancels=runs, queue=False)
        # Clear goes through the queue after the cancel: its empty chat then reaches the browser on the same event
        # stream as the cancelled reply's last chunks, after them. Unqueued, it could arrive first and be overwritten.
        clear.click(None, cancels=runs, queue=False).then(lambda: ([], ""), None, [chatbot, prompt])
    return demo


def parse_auth(text: str) -> tuple[str, str]:
    """`USER:PASSWORD` (--auth or $TINYLLM_DEMO_AUTH) as the (user, password) Gradio's login takes; the password may
    hold colons. The error never repeats the text: it holds a password."""
    user, colon, password = text.partition(":")
    if not (colon and user and password):
        raise UsageError(f"--auth / ${AUTH_ENV} must be USER:PASSWORD, with a user and a password that are not empty")
    return user, password


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, auth: tuple[str, str] | None = None,
           max_queue: int = DEFAULT_MAX_QUEUE, **kwargs):
    """Start the Gradio server (in this thread unless `prevent_thread_lock=True`) behind Gradio's login if `auth`
    is given, with at most `max_queue` replies waiting; returns what `launch` returns."""
    import gradio as gr

    # System fonts only: the default theme fetches Google Fonts, which an offline machine (or CI) cannot reach.
    theme = gr.themes.Default(font=["system-ui", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "sans-serif"])
    if host not in LOOPBACK_HOSTS and auth is None:
        print(f"tinyllm demo: warning: listening on {host} without --auth (or ${AUTH_ENV})", file=sys.stderr)
    return demo.queue(max_size=max_queue).launch(server_name=host, server_port=port, theme=theme, auth=auth, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm demo", description=__doc__.split("\n\n")[0])
    add_runtime_arguments(parser, "the demo")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--title", default=TITLE)
    parser.add_argument("--tools", choices=("on", "off"), default="on",
                        help="offer the model the built-in dictionary and calculator tools (default: on)")
    parser.add_argument("--auth", default=os.environ.get(AUTH_ENV), metavar="USER:PASSWORD",
                        help=f"require this login before the chat (default: ${AUTH_ENV}, else no login)")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help=f"replies waiting for the model before users are told the queue is full "
                        f"(default: {DEFAULT_MAX_QUEUE})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth) if args.auth else None  # before the model loads: a typo fails in a second
    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.runtime import load_backend

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    runtime = load_backend(args.backend, args.model, dtype=args.dtype, threads=args.threads,
                           trust_remote_code=args.trust_remote_code, rope_scaling=args.rope_scaling,
                           streams=args.max_batch_size)
    engine = Engine(runtime, max_batch_size=args.max_batch_size)
    try:
        launch(build_demo(engine, title=args.title, tools=args.tools == "on"), args.host, args.port, auth=auth,
               max_queue=args.max_queue)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm demo", main))
