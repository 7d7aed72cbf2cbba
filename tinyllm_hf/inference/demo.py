"""`tinyllm demo`: a Gradio web chat over the same engine as `tinyllm serve`.

    tinyllm demo --model out/sft                      # http://127.0.0.1:7860
    tinyllm demo --model out/model-f16.gguf --backend llamacpp

Tokens stream into the chat as they are generated; every turn sends the whole conversation (system prompt, earlier
user and assistant turns, the new message) through the model's chat template; the system prompt and the sampling
settings are editable; Stop ends the generation (the engine frees the sequence) and Clear starts a new conversation.
Several users share the engine, so their requests are decoded in one batch. `app.py` runs this demo on a Space.
"""

import argparse
import os
import queue
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tinyllm_hf.inference.model_files import add_runtime_arguments
from tinyllm_hf.inference.text_stream import TextStream

# engine.py and runtime.py import torch: they are imported in the functions that use them, so that `tinyllm demo
# --help` answers without loading torch.
if TYPE_CHECKING:
    from tinyllm_hf.inference.engine import Engine

TITLE = "tinyllm chat"


def message_text(content) -> str:
    """The text of a Gradio chat message, whose content is a string or a list of parts (`{"type": "text", ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(message_text(part) for part in content or [])


def conversation(system: str, history: list[dict], user: str) -> list[dict]:
    """Chat-template messages for the model: the system prompt (if any), every earlier turn, the new user message."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for turn in history:
        text = message_text(turn["content"])
        if turn["role"] in ("user", "assistant") and text.strip():
            messages.append({"role": turn["role"], "content": text})
    return messages + [{"role": "user", "content": user}]


def stream_reply(engine: "Engine", messages: list[dict], temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
    """The reply so far, growing token by token. Closing the generator (Stop, a closed tab) cancels the sequence."""
    from tinyllm_hf.inference.runtime import SamplingParams

    runtime = engine.runtime
    prompt = runtime.encode(runtime.render_chat(messages))
    budget = runtime.context_length - len(prompt)
    if budget <= 0:
        yield f"[The conversation is longer than the model's context of {runtime.context_length} tokens: press Clear.]"
        return
    deltas: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=min(int(max_tokens), budget), temperature=temperature, top_p=top_p)
    sequence = engine.submit(prompt, params, TextStream(runtime.decode_text, params.stop, deltas.put))
    reply = ""
    try:
        while True:
            delta = deltas.get()
            reply += delta.text
            if delta.finish_reason is not None:
                if delta.error:
                    reply += f"\n\n[{delta.finish_reason}: {delta.error}]"
                yield reply
                return
            if delta.text:
                yield reply
    finally:
        sequence.cancel()


def build_demo(engine: "Engine", title: str = TITLE, default_system: str | None = None):
    import gradio as gr

    if default_system is None:
        from tinyllm_hf.tokenizer import DEFAULT_SYSTEM_PROMPT as default_system

    def add_user_message(user: str, history: list[dict]):
        if not user.strip():
            return "", history
        return "", history + [{"role": "user", "content": user}]

    def respond(history: list[dict], system: str, temperature: float, top_p: float, max_tokens: int):
        if not history or history[-1]["role"] != "user":
            return
        messages = conversation(system, history[:-1], message_text(history[-1]["content"]))
        for reply in stream_reply(engine, messages, temperature, top_p, max_tokens):
            yield history + [{"role": "assistant", "content": reply}]

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


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """Start the Gradio server (in this thread unless `prevent_thread_lock=True`); returns what `launch` returns."""
    import gradio as gr

    # System fonts only: the default theme fetches Google Fonts, which an offline machine (or CI) cannot reach.
    theme = gr.themes.Default(font=["system-ui", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "sans-serif"])
    return demo.queue().launch(server_name=host, server_port=port, theme=theme, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm demo", description=__doc__.split("\n\n")[0])
    add_runtime_arguments(parser, "the demo")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--title", default=TITLE)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.runtime import load_backend

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    runtime = load_backend(args.backend, args.model, dtype=args.dtype, threads=args.threads)
    engine = Engine(runtime, max_batch_size=args.max_batch_size)
    try:
        launch(build_demo(engine, title=args.title), args.host, args.port)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm demo", main))
