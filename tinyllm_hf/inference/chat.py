"""`tinyllm chat`: talk to a chat model in the terminal, the reply streamed token by token.

    tinyllm chat --model outputs/sft-quickstart [--system "你是一个诗人。"] [--temperature 0.7] [--greedy]

The conversation is rendered with the model's own chat template (the one SFT trained with), so every turn sees the
whole history; the oldest turns are dropped when the history no longer fits the model's context. A folder holding a
LoRA adapter (adapter_config.json) is loaded on top of its base model. The built-in tools (dictionary lookups and a
calculator, `tinyllm_hf.tasks.tools`) are on by default: the model may call them, each call and its result is shown,
and the answer follows (`inference/tool_loop.py`). Commands: /reset starts a new conversation, /system TEXT changes
the system prompt (and resets), /tools on|off, /think on|off (the thinking switch), /exit (or Ctrl-D) quits.
"""

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tinyllm_hf.errors import UsageError
from tinyllm_hf.inference.model_files import AUTO_BACKEND, BACKENDS, positive_int
from tinyllm_hf.inference.text_stream import TextStream
from tinyllm_hf.model_utils import add_trust_remote_code_argument
from tinyllm_hf.rope_scaling import SPEC_HELP
from tinyllm_hf.runs import ADAPTER_CONFIG_FILE
from tinyllm_hf.trainers.merge import adapter_base

# inference.runtime imports torch: it is imported in the functions that run the model, so that `tinyllm chat --help`
# answers without loading torch.
if TYPE_CHECKING:
    from tinyllm_hf.inference.runtime import SamplingParams, TransformersRuntime

HELP = ("commands: /reset (new conversation), /system TEXT (new system prompt, new conversation), /tools on|off, "
        "/think on|off, /help, /exit")


def load_chat_model(path: str, device: str | None = None, dtype: str = "float32",
                    trust_remote_code: bool = False, rope_scaling: str | None = None) -> "TransformersRuntime":
    """The runtime of a model folder, a LoRA adapter folder (applied to its base) or a Hub id; code shipped in the
    folder (or the adapter's base) runs only with `trust_remote_code`. `rope_scaling` ("yarn:4", ...) rescales the
    model's RoPE for a longer conversation."""
    import torch

    from tinyllm_hf.inference.runtime import TransformersRuntime
    from tinyllm_hf.model_utils import check_local_path, get_model, get_tokenizer

    check_local_path(path)
    tokenizer = get_tokenizer(path, trust_remote_code=trust_remote_code, needs_chat_template=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (Path(path) / ADAPTER_CONFIG_FILE).is_file():
        from peft import PeftModel

        base = get_model(adapter_base(Path(path)), dtype=dtype, trust_remote_code=trust_remote_code,
                         rope_scaling=rope_scaling)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = get_model(path, dtype=dtype, trust_remote_code=trust_remote_code, rope_scaling=rope_scaling)
    return TransformersRuntime(model.to(device), tokenizer)


class ChatSession:
    """A conversation with a model: the history, the system prompt, the tools and how replies are sampled.

    `max_new_tokens=None` lets each reply use the rest of the context after its prompt; a number is a fixed budget
    (the prompt's oldest turns are then dropped to leave room for it). `toolbox`: the tools the model may call
    (`inference.tool_loop.Toolbox`; None: none). `thinking`: the thinking switch (`enable_thinking`)."""

    def __init__(self, runtime, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 sampling: "SamplingParams | None" = None, toolbox=None, thinking: bool = False):
        from tinyllm_hf.inference.runtime import SamplingParams

        self.runtime = runtime
        self.system_prompt = system_prompt  # None: the chat template's default system prompt
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingParams(max_tokens=1, temperature=0.0)  # max_tokens is set per reply
        self.toolbox = toolbox
        self.tools_on = toolbox is not None
        self.thinking = thinking
        self.history: list[dict] = []
        self.context = runtime.context_length
        if max_new_tokens is not None and max_new_tokens >= self.context:
            raise UsageError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({self.context}); "
                             f"leave it out to use the rest of the context after the prompt")

    def reset(self, system_prompt: str | None = None) -> None:
        self.history = []
        if system_prompt is not None:
            self.system_prompt = system_prompt

    @property
    def active_toolbox(self):
        return self.toolbox if self.tools_on else None

    def messages(self, history: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + history

    def fitted_history(self, user_text: str) -> list[dict]:
        """The history plus `user_text`, its oldest exchanges (a user message and everything up to the next one)
        dropped until the prompt leaves room for the reply in the context."""
        history = [*self.history, {"role": "user", "content": user_text}]
        tools = self.active_toolbox.schemas if self.active_toolbox else None
        room = self.max_new_tokens or 1
        while True:
            ids = self.runtime.encode_chat(self.messages(history), tools, self.thinking)
            if len(ids) + room <= self.context:
                self.history = history[:-1]
                return history
            if len(history) == 1:
                raise UsageError(f"the message is too long: {len(ids)} tokens with the system prompt, and the "
                                 f"model's context is {self.context} (of which {room} for the reply)")
            next_user = next((i for i in range(1, len(history)) if history[i]["role"] == "user"), len(history) - 1)
            history = history[next_user:]

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the (fitted) conversation plus `user_text`, ending with the assistant's header."""
        tools = self.active_toolbox.schemas if self.active_toolbox else None
        return self.runtime.encode_chat(self.messages(self.fitted_history(user_text)), tools, self.thinking)

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the reply to `user_text` in pieces as it is generated - tool calls and their results as lines of
        their own - and add the whole exchange (calls and results included) to the history."""
        from tinyllm_hf.inference.tool_loop import DEFAULT_REPLY_SECONDS, DoneEvent, TokenEvent, ToolEvent, tool_loop
        from tinyllm_hf.tokenizer.chat_template import TOOL_CALL_START

        history = self.fitted_history(user_text)
        # The id of <tool_call> (none where the tokenizer lacks it): a call is shown as a line, never as raw JSON.
        call_start = set(ids) if len(ids := self.runtime.encode(TOOL_CALL_START)) == 1 else set()
        pieces: list[str] = []
        new: list[int] = []
        text = TextStream(self.runtime.decode_text, (), lambda delta: pieces.append(delta.text),
                          self.runtime.token_bytes)
        shown = True  # False once the round's tool call begins: calls are shown as ToolEvents, not as raw JSON
        done = None
        for event in tool_loop(self.runtime, [self.messages(history)], self.active_toolbox, [self.sampling],
                               self.max_new_tokens, enable_thinking=self.thinking,
                               max_seconds=DEFAULT_REPLY_SECONDS):
            if isinstance(event, TokenEvent):
                if event.token in self.runtime.eos_token_ids or not shown:
                    continue
                if event.token in call_start:
                    shown = False
                    text.on_finish(new, "stop", None)
                    continue
                new.append(event.token)
                text.on_token(new)
                text.on_progress(new)
            elif isinstance(event, ToolEvent):
                arguments = ", ".join(f"{k}={v}" for k, v in event.arguments.items())
                pieces.append(f"\n[调用 {event.name}({arguments})]\n[结果] {event.result}\n")
                new, shown = [], True
                text = TextStream(self.runtime.decode_text, (), lambda delta: pieces.append(delta.text),
                          self.runtime.token_bytes)
            elif isinstance(event, DoneEvent):
                done = event
                if shown:
                    text.on_finish(new, "stop", None)
                if event.finish_reason in ("tool_rounds", "context", "time"):
                    pieces.append(f"\n({FINISH_NOTES[event.finish_reason]})")
                elif event.reply["tool_calls"] and self.active_toolbox is None:
                    pieces.append(f"\n({FINISH_NOTES['tools_off']})")
            yield from filter(None, pieces)
            pieces.clear()
        self.history = history + done.messages


# What the user is told when the tool loop stops a reply early.
FINISH_NOTES = {
    "tool_rounds": "the model kept calling tools; stopped after the round limit",
    "context": "the conversation no longer fits the model's context: /reset to start a new one",
    "time": "the reply took longer than its time limit and was stopped",
    "tools_off": "the model asked for a tool, but tools are off: /tools on",
}


def repl(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], object] = None) -> int:
    """The interactive loop: read a line, answer it (streamed), until /exit or end of input."""
    write = write or (lambda text: print(text, end="", flush=True))
    write(f"{HELP}\n")
    while True:
        try:
            line = read("\n你: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            write(f"{HELP}\n")
        elif line == "/reset":
            session.reset()
            write("(new conversation)\n")
        elif line.startswith("/system"):
            session.reset(line.removeprefix("/system").strip() or None)
            write(f"(system prompt: {session.system_prompt or 'the default'}; new conversation)\n")
        elif line in ("/tools on", "/tools off"):
            if line == "/tools on" and session.toolbox is None:
                write("(this session has no tools: start it with --tools on)\n")
            else:
                session.tools_on = line == "/tools on"
                write(f"(tools {'on' if session.tools_on else 'off'})\n")
        elif line in ("/think on", "/think off"):
            session.thinking = line == "/think on"
            write(f"(thinking {'on' if session.thinking else 'off'})\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
        else:
            write("助手: ")
            try:
                for piece in session.stream(line):
                    write(piece)
            except ValueError as err:
                write(f"({err})")
            write("\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyllm chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (or LoRA adapter folder, or Hub id)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="reply length limit (default: the rest of the model's context after the prompt)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable replies)")
    p.add_argument("--tools", choices=("on", "off"), default="on",
                   help="offer the built-in tools (dictionary lookups, calculator) to the model (default: on)")
    p.add_argument("--think", action="store_true", help="start with thinking on (the model reasons before answering)")
    p.add_argument("--backend", choices=(AUTO_BACKEND, *BACKENDS), default=AUTO_BACKEND,
                   help="auto (default): the fastest runtime that reproduces a float32 checkpoint folder, measured "
                        "once and saved (inference/runtime_choice.py); transformers for adapters, Hub ids, "
                        "--rope-scaling, other dtypes and devices; or name one")
    p.add_argument("--threads", type=positive_int, help="CPU threads per decode step (default: the runtime's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR", help=SPEC_HELP)
    add_trust_remote_code_argument(p)
    return p


def sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The reply sampling the flags ask for (its max_tokens is set per reply, from the context left)."""
    from tinyllm_hf.inference.runtime import SamplingParams

    if args.greedy:
        return SamplingParams(1, temperature=0.0, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return SamplingParams(1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_chat_runtime(args: argparse.Namespace):
    """The runtime `--backend` asks for: auto measures a plain float32 checkpoint folder (`runtime_choice`), a named
    llamacpp/onnx backend loads its file, and everything else (adapters, Hub ids, --rope-scaling, other dtypes or
    devices, `--backend transformers`) goes through `load_chat_model`."""
    from tinyllm_hf.inference.runtime_choice import choose_runtime, is_auto_eligible

    if args.backend == AUTO_BACKEND and is_auto_eligible(args.model, args.dtype, args.rope_scaling,
                                                         args.trust_remote_code, args.device):
        return choose_runtime(args.model, streams=1, threads=args.threads)
    if args.backend in ("llamacpp", "onnx"):
        from tinyllm_hf.inference.runtime import load_backend

        return load_backend(args.backend, args.model, threads=args.threads, trust_remote_code=args.trust_remote_code)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    runtime = load_chat_model(args.model, args.device, args.dtype, args.trust_remote_code, args.rope_scaling)
    if args.backend == AUTO_BACKEND:
        print("runtime: transformers (the one runtime for this model folder and these options)", file=sys.stderr)
    return runtime


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime = load_chat_runtime(args)
    from tinyllm_hf.inference.tool_loop import Toolbox

    toolbox = Toolbox.builtin() if args.tools == "on" else None
    session = ChatSession(runtime, args.system, args.max_new_tokens, sampling_params(args), toolbox, args.think)
    return repl(session)


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm chat", main))
