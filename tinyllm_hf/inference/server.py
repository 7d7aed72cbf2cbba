"""`tinyllm serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the batching engine in `engine.py`.

    tinyllm serve --model out/sft                                  # transformers backend, http://127.0.0.1:8000/v1
    tinyllm serve --model out/model-f16.gguf --backend llamacpp    # llama.cpp: much faster decoding on CPU
    tinyllm serve --model out/onnx-int8 --backend onnx             # an ONNX Runtime / OpenVINO export

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (OpenAI's request and response shapes,
`stream: true` as server-sent events ending with `data: [DONE]`), POST /v1/responses (the Responses API, translated
onto chat completions: responses.py), GET /health. Every error is a 4xx/5xx with OpenAI's
body `{"error": {"message", "type", "param", "code"}}`. Why this is our own server and not `transformers serve`:
docs/serving.md.

A request is checked in order of cost: the API key (before the body is read), the body's size (from Content-Length,
else while it streams in: 413 past `--max-body-bytes`), then, in a worker thread so the event loop keeps answering,
its JSON, its fields (strictly typed: `"3"` or `true` is no `max_tokens`), the chat template and the tokenizer.

Logprobs (chat's `logprobs` / `top_logprobs`, completions' legacy `logprobs`, with `echo` the prompt's too, and
`max_tokens: 0` with `echo` to score a prompt only, as lm-eval's local-completions model does) are the raw model
log-softmax, as vLLM reports them by default: docs/serving.md#logprobs.

Chat completions take OpenAI's `tools` / `tool_choice` and `tool` messages, and the thinking switch
(`chat_template_kwargs: {"enable_thinking": true}`, as vLLM and SGLang take it, or `enable_thinking`). The reply is
parsed by `tokenizer.reply` into `content`, `reasoning_content` and `tool_calls`; the server never runs a tool: the
client does, and sends the result back as a `tool` message, as with OpenAI.
"""

import argparse
import asyncio
import codecs
import dataclasses
import functools
import json
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from tinyllm_hf.errors import APIError, EngineOverloaded, MissingDependencyError, UsageError
from tinyllm_hf.inference.model_files import LOOPBACK_HOSTS, add_runtime_arguments, positive_int
from tinyllm_hf.inference.text_stream import Delta, ReplyStream, TextStream

# engine.py, runtime.py, tool_loop.py and the tokenizer package import torch: they are imported in the functions that
# use them, so that `tinyllm serve --help` answers without loading torch.
if TYPE_CHECKING:
    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.runtime import SamplingParams

MAX_N = 8  # choices per request: each one is a sequence in the batch
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 20  # top logprobs per token: OpenAI's limit for chat (vLLM's default for both endpoints)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# A prompt that fits a 4k-token context is ~40 KB of JSON even with every character \u-escaped; 1 MiB leaves room for
# tools and long histories while a body that could only be refused is never read into memory.
DEFAULT_MAX_BODY_BYTES = 1 << 20
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (runtime.SamplingParams.generator)
# After json.loads, a surrogate code point left in a str was a lone \ud800-\udfff escape (a pair becomes one
# character): UTF-8 cannot encode it, so the tokenizer would fail on it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------------------------------


def _param_path(loc: tuple) -> str:
    """pydantic's ('messages', 0, 'role') -> OpenAI's 'messages[0].role'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _is_union_label(part) -> bool:
    """pydantic adds the member type to the location of a union's errors: ('stop', 'list[str]', 0)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = _param_path(tuple(part for part in first["loc"] if not _is_union_label(part)))
    return APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")


def lone_surrogate_param(body: dict) -> str | None:
    """Where in the JSON `body` a string (or an object key) holds a lone surrogate; None if none does. A loop, not a
    recursion: json.loads accepts nesting deep enough to exhaust the stack of a recursive walk."""
    stack: list[tuple[tuple, object]] = [((), body)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                return _param_path(loc)
        elif isinstance(value, dict):
            for key, item in value.items():
                if LONE_SURROGATE.search(key):  # named escaped: the error body must be encodable itself
                    return _param_path((*loc, key.encode("utf-8", "backslashreplace").decode()))
                stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))
    return None


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from its Content-Length
    before anything is read, else (a chunked body) while it streams in, so an oversized body is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)


# ---------------------------------------------------------------------------------------------------------------------
# Requests. Unknown fields are ignored (as OpenAI does); fields we cannot honour are rejected, never silently dropped.
# ---------------------------------------------------------------------------------------------------------------------


class _Request(BaseModel):
    """Every part of a request: strictly typed (pydantic's lax mode would read `"3"`, `true` or `3.0` as a count and
    `1` or `"true"` as a flag), except that a float field takes an integer, as JSON writes 1 for 1.0."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class CalledFunction(_Request):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object as a string, as OpenAI writes it


class ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: CalledFunction


class Message(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant message with tool_calls
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer
    reasoning_content: str | None = None  # assistant messages, as this server returns them with thinking on

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")  # OpenAI's rule for the name
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema(self) -> dict | None:
        """The JSON schema the reply must follow; None for plain text."""
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs a 'json_schema' object",
                               param="response_format.json_schema", code="invalid_value")
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class _Common(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # 0 only with echo, on /v1/completions
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # below runtime.GREEDY_BELOW_TEMPERATURE: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: ResponseFormat | None = None  # constrained decoding (grammar.py); vLLM takes it on completions
    _grammar = PrivateAttr(None)  # response_format compiled for the model (Service.compile_response_format)

    def unsupported(self) -> dict[str, bool]:
        """Each field this server cannot honour: whether the request uses it."""
        return {
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
            "functions": bool(self.functions),
        }

    def check_supported(self) -> None:
        for name, used in self.unsupported().items():
            if used:
                raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        """(SamplingParams.logprobs, SamplingParams.prompt_logprobs): what to report with the tokens (None: nothing;
        k: each token's logprob and the k most likely in its place)."""
        return None, None

    def check_seed(self) -> None:
        """The seeds of all n choices (`choice_seeds`) must be seeds torch takes, not only the first."""
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise APIError(400, f"'seed' + n - 1 must be at most {MAX_SEED}: choice i is sampled with seed + i",
                           param="seed", code="invalid_value")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"'stop' takes at most {MAX_STOP} strings", param="stop", code="invalid_value")
        if any(not stop for stop in stops):
            raise APIError(400, "'stop' strings must not be empty", param="stop", code="invalid_value")
        return tuple(stops)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients send this instead of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    # false: the reply ends after its first tool call (several calls in one reply are parsed otherwise)
    parallel_tool_calls: bool | None = None
    # The thinking switch, as vLLM and SGLang take it (chat_template_kwargs) and as a plain field.
    chat_template_kwargs: dict | None = None
    enable_thinking: bool | None = None

    def end_after(self) -> tuple[str, ...]:
        from tinyllm_hf.tokenizer.chat_template import TOOL_CALL_END

        return (TOOL_CALL_END,) if self.tools and self.parallel_tool_calls is False else ()

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def thinking(self) -> bool:
        kwargs = dict(self.chat_template_kwargs or {})
        from_kwargs = kwargs.pop("enable_thinking", None)
        if kwargs:
            raise APIError(400, f"chat_template_kwargs takes only enable_thinking, not {', '.join(sorted(kwargs))}",
                           param="chat_template_kwargs", code="unsupported_parameter")
        if from_kwargs is not None and not isinstance(from_kwargs, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs.enable_thinking", code="invalid_value")
        if None not in (from_kwargs, self.enable_thinking) and from_kwargs != self.enable_thinking:
            raise APIError(400, "enable_thinking and chat_template_kwargs.enable_thinking disagree",
                           param="enable_thinking", code="invalid_value")
        return bool(self.enable_thinking if self.enable_thinking is not None else from_kwargs)


class CompletionRequest(_Common):
    # Text, or token ids (what lm-eval's local-completions sends): one prompt or a list of them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the legacy form: how many top logprobs per token
    suffix: str | None = None

    def unsupported(self) -> dict[str, bool]:
        return {**super().unsupported(), "tools": bool(self.tools)}  # tools need a chat template

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "'max_tokens' 0 is allowed only with 'echo': true (to score the prompt)",
                           param="max_tokens", code="invalid_value")
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


# ---------------------------------------------------------------------------------------------------------------------
# The service: validation, prompt building, and turning engine deltas into OpenAI responses
# ---------------------------------------------------------------------------------------------------------------------


class Service:
    def __init__(self, engine: "Engine", model_id: str):
        self.engine = engine
        self.runtime = engine.runtime
        self.model_id = model_id
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(
                404, f"The model '{model}' does not exist; this server serves '{self.model_id}'",
                param="model", code="model_not_found",
            )

    def parse(self, raw: bytes, model_class: type[_Common]) -> _Common:
        """The request `raw` (the body's bytes) holds, checked: JSON, text UTF-8 can encode, its fields, this model."""
        return self.check(self.load(raw), model_class)

    def parse_responses(self, raw: bytes):
        """(the /v1/responses request `raw` holds, the same as a ChatRequest), both checked (`responses.py`)."""
        from tinyllm_hf.inference.responses import ResponsesRequest

        try:
            request = ResponsesRequest.model_validate(self.load(raw))
        except ValidationError as exc:
            raise validation_error(exc) from None
        request.check_supported()
        return request, self.check(request.chat_body(), ChatRequest)

    def load(self, raw: bytes) -> dict:
        """The JSON object the body `raw` holds, its text checked to be text UTF-8 can encode."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "The request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object", code="invalid_json")
        param = lone_surrogate_param(body)
        if param is not None:
            raise APIError(400, f"Invalid value for '{param}': a string holds a lone UTF-16 surrogate (a \\ud800-"
                           "\\udfff escape without its pair), which is no Unicode text", param=param,
                           code="invalid_value")
        return body

    def check(self, body: dict, model_class: type[_Common]) -> _Common:
        """`body` as a `model_class` request, checked: its fields, this model, its response_format."""
        try:
            parsed = model_class.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        parsed.check_supported()
        parsed.check_seed()
        self.check_logprobs(parsed)
        self.check_model(parsed.model)
        self.compile_response_format(parsed)
        return parsed

    def check_logprobs(self, request: _Common) -> None:
        """Prompt logprobs need a runtime that keeps every prompt position's logits (llama.cpp, as served, does not)."""
        _, prompt_logprobs = request.reported_logprobs()
        if prompt_logprobs is not None and not self.runtime.prompt_logits:
            raise APIError(400, f"'echo' with 'logprobs' (the prompt's logprobs) is not available with the "
                           f"{self.runtime.backend} runtime, which keeps the last position's logits only; serve a "
                           "checkpoint or an ONNX export for it", param="echo", code="unsupported_parameter")

    def encode_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt of a completions request (lists of ids are checked against the vocabulary)."""
        if not request.prompt:
            raise APIError(400, "'prompt' must be a non-empty string, list of token ids, or list of them",
                           param="prompt", code="invalid_value")
        prompts = []
        for prompt in request.prompts():
            if not prompt:
                raise APIError(400, "'prompt' must be a non-empty string, list of token ids, or list of them",
                               param="prompt", code="invalid_value")
            if isinstance(prompt, str):
                prompts.append(self.runtime.encode(prompt))
            elif not all(0 <= token < self.runtime.vocab_size for token in prompt):
                raise APIError(400, f"'prompt' holds a token id outside this model's vocabulary (0 to "
                               f"{self.runtime.vocab_size - 1})", param="prompt", code="invalid_value")
            else:
                prompts.append(list(prompt))
        return prompts

    def chat_prompt(self, request: ChatRequest) -> "ChatPrompt":
        from tinyllm_hf.tokenizer.reply import parse_reply

        thinking = request.thinking()
        tools, prefix = offered_tools(request, thinking)
        messages = chat_messages(request.messages)
        try:
            # The tool name in a forced call's prefix is safe template text: check_tool_schemas allows only
            # letters, digits, _ and - in names.
            ids = self.runtime.encode_chat(messages, tools, thinking, continuation=prefix)
        except Exception as exc:  # the template's own raise_exception (e.g. a system message in the middle)
            raise APIError(400, f"messages do not fit the chat template: {exc}", param="messages") from None
        if tools:
            parse = functools.partial(parse_reply, thinking=thinking)
        elif thinking:
            parse = reasoning_reply
        else:
            parse = None
        return ChatPrompt(ids, prefix, parse, tool_calls=bool(tools))

    def sampling(self, request: _Common, prompt_len: int, default_max: int | None) -> "SamplingParams":
        """Sampling settings for one prompt, checking it and the requested tokens fit the context."""
        from tinyllm_hf.inference.runtime import SamplingParams

        context = self.runtime.context_length
        if prompt_len >= context:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens, but the prompt has {prompt_len} tokens",
                param="messages" if isinstance(request, ChatRequest) else "prompt", code="context_length_exceeded",
            )
        requested = getattr(request, "max_completion_tokens", None)
        requested = request.max_tokens if requested is None else requested
        if requested is not None and prompt_len + requested > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; you requested {prompt_len + requested} "
                f"({prompt_len} in the prompt, {requested} for the completion)",
                param="max_tokens", code="context_length_exceeded",
            )
        max_tokens = min(default_max or context, context - prompt_len) if requested is None else requested
        logprobs, prompt_logprobs = request.reported_logprobs()
        end_after = request.end_after() if isinstance(request, ChatRequest) else ()
        return SamplingParams(max_tokens, request.temperature, request.top_p, stop=request.stop_strings(),
                              end_after=end_after, seed=request.seed, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs,
                              grammar=request._grammar)

    def compile_response_format(self, request: _Common) -> None:
        """Check `request.response_format` and compile it for this model's tokenizer into `request._grammar`."""
        from tinyllm_hf.inference.grammar import Grammar, json_grammar

        schema = request.response_format.schema() if request.response_format is not None else None
        if schema is None:
            return
        if isinstance(request, ChatRequest) and request.tools and request.tool_choice != "none":
            raise APIError(400, "response_format cannot be combined with tools on this server (the grammar would rule "
                           "out tool calls): send one or the other", param="response_format", code="unsupported_parameter")
        if isinstance(request, ChatRequest) and request.thinking():
            raise APIError(400, "response_format cannot be combined with enable_thinking (the grammar would rule out "
                           "the reasoning)", param="response_format", code="unsupported_parameter")
        param = "response_format.json_schema.schema" if request.response_format.type == "json_schema" else "response_format"
        try:
            request._grammar = Grammar(self.runtime.grammar_tokenizer, json_grammar(schema))
        except MissingDependencyError as exc:
            raise APIError(400, f"response_format cannot be honoured: {exc}", param="response_format",
                           code="unsupported_parameter") from None
        except UsageError as exc:
            raise APIError(400, f"Invalid '{param}': {exc}", param=param, code="invalid_value") from None

    def submit_all(self, jobs: list[tuple[list[int], "SamplingParams"]], on_delta, raw: bool = False) -> list:
        """Submit every choice; if the queue fills midway, cancel what was submitted and answer 503. `raw`: decode
        with the control tokens kept, for a reply that is parsed (tool calls, reasoning)."""
        decode = self.runtime.decode_raw if raw else self.runtime.decode_text
        sequences = []
        try:
            for index, (prompt, params) in enumerate(jobs):
                stream = TextStream(decode, params.stop, lambda delta, i=index: on_delta(i, delta),
                                    self.runtime.token_bytes, params.end_after)
                sequences.append(self.engine.submit(prompt, params, stream))
        except EngineOverloaded as exc:
            for seq in sequences:
                seq.cancel()
            raise APIError(503, str(exc), type="server_error", code="server_overloaded") from None
        return sequences


# ---------------------------------------------------------------------------------------------------------------------
# Tools and thinking: what the prompt offers, and the reply read back as a message (`tokenizer.reply` parses it)
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatPrompt:
    """A chat request rendered for the model: the prompt's ids, and how its reply is read."""

    ids: list[int]
    prefix: str = ""  # the reply's forced opening (tool_choice "required" or a named function), ending the prompt
    parse: Callable[[str], dict] | None = None  # raw reply (prefix included) -> its message fields; None: plain text
    tool_calls: bool = False  # whether the reply is parsed for tool calls


def forced_call_prefix(name: str | None) -> str:
    """The opening of a tool call, as the chat template writes it: with `name` the model writes only the arguments;
    without, it picks the function's name first."""
    from tinyllm_hf.tokenizer.chat_template import TOOL_CALL_START

    if name is None:
        return TOOL_CALL_START + '{"name": "'
    return TOOL_CALL_START + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def offered_tools(request: ChatRequest, thinking: bool) -> tuple[list[dict] | None, str]:
    """(the tools the prompt shows, the forced opening of the reply) for the request's tools and tool_choice."""
    from tinyllm_hf.inference.tool_loop import check_tool_schemas

    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice 'required' or a named function needs 'tools'", param="tool_choice",
                           code="invalid_value")
        return None, ""
    try:
        tools = check_tool_schemas(request.tools)
    except UsageError as exc:
        raise APIError(400, f"Invalid 'tools': {exc}", param="tools", code="invalid_value") from None
    if choice in (None, "auto"):
        return tools, ""
    if choice == "none":  # the model is not shown the tools, and its reply is not read for calls
        return None, ""
    if thinking:
        # A forced call opens the reply, where the reasoning would be.
        raise APIError(400, "tool_choice 'required' or a named function cannot be combined with enable_thinking",
                       param="tool_choice", code="invalid_value")
    if choice == "required":
        return tools, forced_call_prefix(None)
    names = [tool["function"]["name"] for tool in tools]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not in tools "
                       f"({', '.join(names)})", param="tool_choice.function.name", code="invalid_value")
    return tools, forced_call_prefix(choice.function.name)


def _bad_message(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def chat_messages(messages: list[Message]) -> list[dict]:
    """The request's messages as the chat template takes them, checked as OpenAI checks them: every tool call of an
    assistant message is answered by a `tool` message (its tool_call_id) before the conversation goes on, and tool
    call arguments are JSON objects."""
    rendered, pending = [], {}  # pending: id -> function name of the calls not answered yet
    for i, message in enumerate(messages):
        where, text = f"messages[{i}]", message.text()
        if message.role == "tool":
            if message.content is None:
                raise _bad_message(f"{where}.content", f"{where}.content is missing: a tool message holds the result")
            if message.tool_call_id not in pending:
                raise _bad_message(f"{where}.tool_call_id", f"{where} answers tool_call_id {message.tool_call_id!r}, "
                                   "which is no unanswered call of the assistant message before it")
            name = pending.pop(message.tool_call_id)
            rendered.append({"role": "tool", "name": name, "tool_call_id": message.tool_call_id, "content": text})
            continue
        if pending:
            raise _bad_message(where, f"{where} comes before the results of the tool calls {', '.join(pending)}")
        if message.tool_calls and message.role != "assistant":
            raise _bad_message(f"{where}.tool_calls", f"{where}: only assistant messages carry tool_calls")
        if not text.strip() and not message.tool_calls:
            raise _bad_message(f"{where}.content", f"{where}.content is empty")
        entry = {"role": "system" if message.role == "developer" else message.role, "content": text}
        if message.role == "assistant" and message.reasoning_content:
            entry["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            entry["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = None
                if not isinstance(arguments, dict):
                    param = f"{where}.tool_calls[{j}].function.arguments"
                    raise _bad_message(param, f"{param} must be a JSON object (as a string)")
                entry["tool_calls"].append({"type": "function",
                                            "function": {"name": call.function.name, "arguments": arguments}})
                pending[call.id] = call.function.name
        rendered.append(entry)
    if pending:
        raise _bad_message("messages", f"the tool calls {', '.join(pending)} have no tool message with their result")
    return rendered


def reasoning_reply(text: str) -> dict:
    """A reply read for its reasoning only (thinking on, no tools offered): tool-call text stays in the content."""
    from tinyllm_hf.tokenizer.reply import split_reasoning

    reasoning, content = split_reasoning(text, thinking=True)
    return {"content": content, "reasoning_content": reasoning, "tool_calls": []}


def openai_tool_call(call: dict) -> dict:
    """A parsed call (`tokenizer.reply`) in OpenAI's shape: a fresh id, the arguments as a JSON string."""
    function = call["function"]
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": function["name"], "arguments": json.dumps(function["arguments"], ensure_ascii=False)}}


def reply_message(reply: dict) -> dict:
    """OpenAI's assistant message for a parsed reply (content is null when the reply is only tool calls)."""
    message = {"role": "assistant", "content": reply["content"]}
    if reply["reasoning_content"] is not None:
        message["reasoning_content"] = reply["reasoning_content"]
    if reply["tool_calls"]:
        message["content"] = reply["content"] or None
        message["tool_calls"] = [openai_tool_call(call) for call in reply["tool_calls"]]
    return message


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Distinct seeds for the n choices of one request, reproducible when the request is seeded."""
    return [None if seed is None else seed + i for i in range(n)]


def abort_error(delta: Delta) -> APIError:
    if delta.finish_reason == "timeout":
        return APIError(504, delta.error or "request timed out", type="server_error", code="timeout")
    return APIError(500, delta.error or "generation failed", type="server_error", code="internal_error")


def chat_logprobs(runtime, logprobs: list) -> list[dict]:
    """Chat's `logprobs.content` for `runtime.TokenLogprob`s: each token's text, logprob and bytes (a token that holds
    part of a character shows U+FFFD in its text; its bytes are exact), and its `top_logprobs`."""
    def entry(token: int, logprob: float) -> dict:
        data = runtime.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(*top) for top in lp.top]} for lp in logprobs]


def legacy_token(data: bytes) -> str:
    """A token as the completions API names it: its text, or where it holds part of a character `bytes:\\xe4\\xbd`
    (OpenAI's spelling), so that the partial tokens in one `top_logprobs` dict do not collide on U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


class LegacyLogprobs:
    """The completions API's `logprobs` of one choice (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`),
    made chunk by chunk: `text_offset` counts the characters of the choice's text before each token (the echoed
    prompt included). `top_logprobs` holds the most likely tokens and the token itself, as OpenAI's does; where two
    share a name, the likelier one's logprob."""

    def __init__(self, runtime):
        self.runtime, self.offset = runtime, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a character's first bytes

    def format(self, tokens: list[int], logprobs: list) -> dict:
        """For `tokens` and their logprobs (`runtime.TokenLogprob`, or None for a prompt's first token)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob in zip(tokens, logprobs, strict=True):
            data = self.runtime.token_bytes(token)
            text = legacy_token(data)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(data))
            if logprob is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for top_token, value in [*logprob.top, (token, logprob.logprob)]:  # most likely first
                top.setdefault(legacy_token(self.runtime.token_bytes(top_token)), value)
            out["token_logprobs"].append(logprob.logprob)
            out["top_logprobs"].append(top)
        return out


async def collect(service: Service, request, jobs, disconnect_check: float = 0.5, raw: bool = False):
    """Run `jobs` to completion: (texts, finish_reasons, completion_tokens, logprobs, prompt_logprobs), the last two
    per choice as the engine reported them (empty and None unless asked). Cancels them if the client goes away."""
    from tinyllm_hf.inference.engine import FINISHED_OK

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sequences = service.submit_all(jobs, lambda i, d: loop.call_soon_threadsafe(events.put_nowait, (i, d)), raw)
    texts, reasons, tokens = [""] * len(jobs), [None] * len(jobs), [0] * len(jobs)
    logprobs, prompt_logprobs = [[] for _ in jobs], [None] * len(jobs)
    next_check = time.monotonic() + disconnect_check
    try:
        while None in reasons:
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    # Nobody reads this answer; raising ends the wait, and `finally` frees the batch rows.
                    raise APIError(499, "client closed the request", code="client_disconnected")
                next_check = time.monotonic() + disconnect_check
            try:
                index, delta = await asyncio.wait_for(events.get(), disconnect_check)
            except asyncio.TimeoutError:
                continue
            texts[index] += delta.text
            logprobs[index] += delta.logprobs
            if delta.prompt_logprobs is not None:
                prompt_logprobs[index] = delta.prompt_logprobs
            if delta.finish_reason:
                if delta.finish_reason not in FINISHED_OK:
                    raise abort_error(delta)
                reasons[index], tokens[index] = delta.finish_reason, delta.completion_tokens
    finally:
        for seq in sequences:
            seq.cancel()  # no-op for finished sequences; stops the rest (disconnect, error in a sibling choice)
    return texts, reasons, tokens, logprobs, prompt_logprobs


def sse_data(payload: dict) -> str:
    # ASCII-escaped JSON: a raw U+2028 or U+0085 in generated text would end the line for some SSE readers.
    return f"data: {json.dumps(payload)}\n\n"


async def stream_events(service: Service, jobs, make_chunk, usage_chunk, raw: bool = False, sse=sse_data,
                        done: str = "data: [DONE]\n\n"):
    """SSE lines for `jobs`: the chunks of each delta (`make_chunk(index, delta)`, delta None for each choice's first;
    it answers a chunk, a list of them, or None: nothing to send yet), then those of `usage_chunk` (if given) and
    `done`. `sse` writes one chunk. Cancelling the generator
    (Starlette does when the client disconnects) cancels the sequences."""
    from tinyllm_hf.inference.engine import FINISHED_OK

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sequences = service.submit_all(jobs, lambda i, d: loop.call_soon_threadsafe(events.put_nowait, (i, d)), raw)

    def lines(chunks) -> str:
        return "".join(map(sse, chunks if isinstance(chunks, list) else [chunks]))

    async def generate():
        remaining, tokens = len(jobs), [0] * len(jobs)
        try:
            for index in range(len(jobs)):
                first = make_chunk(index, None)
                if first:
                    yield lines(first)
            while remaining:
                index, delta = await events.get()
                if delta.finish_reason and delta.finish_reason not in FINISHED_OK:
                    yield sse(abort_error(delta).body())
                    break
                if delta.text or delta.finish_reason or delta.logprobs or delta.prompt_logprobs is not None:
                    chunk = make_chunk(index, delta)
                    if chunk:
                        yield lines(chunk)
                if delta.finish_reason:
                    remaining -= 1
                    tokens[index] = delta.completion_tokens
            else:
                if usage_chunk is not None:
                    yield lines(usage_chunk(sum(tokens)))
            if done:
                yield done
        finally:
            for seq in sequences:
                seq.cancel()

    return generate()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


def build_app(engine: "Engine", model_id: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = Service(engine, model_id)
    app = FastAPI(title="tinyllm", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        error = APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    async def check_api_key(request: Request):
        # A route dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware wraps `receive` so that
        # `request.is_disconnected()` reports a disconnect for every live request, which would cancel them all.
        # It runs before the route reads the body (routes take the Request, no body parameter): a wrong key is
        # answered at once, whatever the body's size.
        if api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def parse(request: Request, model_class):
        # Parsing a body of up to --max-body-bytes, like rendering and tokenizing its prompt, takes a worker thread:
        # on the event loop it would stall /health and every stream while it runs.
        return await asyncio.to_thread(service.parse, await read_body(request, max_body_bytes), model_class)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": engine.waiting.qsize()}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": service.created, "owned_by": "tinyllm"}

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str):
        service.check_model(name)
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        chat = await asyncio.to_thread(service.chat_prompt, body)
        prompt = chat.ids
        params = service.sampling(body, len(prompt), default_max=None)
        jobs = [(prompt, _with_seed(params, seed)) for seed in choice_seeds(body.seed, body.n)]
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        raw = chat.parse is not None

        if body.stream:
            replies = [ReplyStream(chat.parse, chat.prefix, chat.tool_calls) for _ in jobs] if raw else None

            def message_delta(index, text, finish_reason) -> dict:
                if not raw:
                    return {"content": text} if text else {}
                fields, calls = replies[index].feed(text, final=finish_reason is not None)
                delta = dict(fields)
                if calls:  # each call whole, once it is closed; its index counts the calls of this choice
                    first = replies[index].calls_sent - len(calls)
                    delta["tool_calls"] = [{"index": first + k, **openai_tool_call(call)}
                                           for k, call in enumerate(calls)]
                return delta

            def make_chunk(index, event):
                if event is None:
                    delta, finish_reason = {"role": "assistant", "content": ""}, None
                else:
                    finish_reason = event.finish_reason
                    delta = message_delta(index, event.text, finish_reason)
                    if not (delta or finish_reason or event.logprobs):
                        return None
                if finish_reason and raw and replies[index].calls_sent:
                    finish_reason = "tool_calls"
                scored = event is not None and body.logprobs
                logprobs = {"content": chat_logprobs(service.runtime, event.logprobs)} if scored else None
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                return {"id": response_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_id, "choices": [choice]}

            def usage_chunk(completion_tokens):
                return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [], "usage": usage(len(prompt), completion_tokens)}

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = await stream_events(service, jobs, make_chunk, usage_chunk if include_usage else None, raw)
            return StreamingResponse(events, media_type="text/event-stream")

        texts, reasons, tokens, logprobs, _ = await collect(service, request, jobs, raw=raw)
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            message = reply_message(chat.parse(chat.prefix + text)) if raw else {"role": "assistant", "content": text}
            choice_logprobs = {"content": chat_logprobs(service.runtime, logprobs[i])} if body.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": choice_logprobs,
                            "finish_reason": "tool_calls" if message.get("tool_calls") else reason})
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model_id,
                "choices": choices, "usage": usage(len(prompt), sum(tokens))}

    @v1.post("/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        if body.suffix:
            raise APIError(400, "'suffix' is not supported by this server", param="suffix", code="unsupported_parameter")
        prompts = await asyncio.to_thread(service.encode_prompts, body)
        texts = [prompt if isinstance(prompt, str) else service.runtime.decode_raw(ids)
                 for prompt, ids in zip(body.prompts(), prompts)] if body.echo else None
        jobs = []
        for prompt in prompts:  # choice index = prompt index * n + j, as OpenAI numbers them
            params = service.sampling(body, len(prompt), default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
            jobs += [(prompt, _with_seed(params, seed)) for seed in choice_seeds(body.seed, body.n)]
        prompt_tokens = sum(map(len, prompts))
        echoes = [texts[i // body.n] if body.echo else "" for i in range(len(jobs))]
        scored = body.logprobs is not None
        legacy = [LegacyLogprobs(service.runtime) for _ in jobs]

        def generated_logprobs(index: int, logprobs: list) -> dict | None:
            return legacy[index].format([lp.token for lp in logprobs], logprobs) if scored else None

        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            def make_chunk(index, event):
                if event is None:  # the echo comes first: at once, or with the prompt's logprobs once computed
                    if not echoes[index] or (scored and body.echo):
                        return None
                    text, finish_reason, logprobs = echoes[index], None, None
                elif event.prompt_logprobs is not None:
                    text, finish_reason = echoes[index], None
                    logprobs = legacy[index].format(jobs[index][0], event.prompt_logprobs)
                else:
                    text, finish_reason = event.text, event.finish_reason
                    logprobs = generated_logprobs(index, event.logprobs)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [choice]}

            def usage_chunk(completion_tokens):
                return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                        "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = await stream_events(service, jobs, make_chunk, usage_chunk if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")

        outputs, reasons, tokens, logprobs, prompt_logprobs = await collect(service, request, jobs)
        choices = []
        for i, (text, reason) in enumerate(zip(outputs, reasons)):
            choice_logprobs = None
            if scored:
                prompt_part = legacy[i].format(jobs[i][0], prompt_logprobs[i]) if body.echo else None
                choice_logprobs = generated_logprobs(i, logprobs[i])
                if prompt_part is not None:
                    choice_logprobs = {key: prompt_part[key] + part for key, part in choice_logprobs.items()}
            choices.append({"index": i, "text": echoes[i] + text, "logprobs": choice_logprobs, "finish_reason": reason})
        return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                "choices": choices, "usage": usage(prompt_tokens, sum(tokens))}

    @v1.post("/responses")
    async def responses(request: Request):
        from tinyllm_hf.inference.responses import ResponseBuilder, sse_event

        body, chat_body = await asyncio.to_thread(service.parse_responses, await read_body(request, max_body_bytes))
        chat = await asyncio.to_thread(service.chat_prompt, chat_body)
        params = service.sampling(chat_body, len(chat.ids), default_max=None)
        jobs, raw = [(chat.ids, params)], chat.parse is not None
        builder = ResponseBuilder(body, model_id)

        if body.stream:
            reply = ReplyStream(chat.parse, chat.prefix, chat.tool_calls) if raw else None
            finish = []

            def make_events(index, event):
                if event is None:
                    return builder.start()
                text, finish_reason = event.text, event.finish_reason
                if finish_reason:
                    finish.append(finish_reason)
                if reply is None:
                    return builder.add(text, [])
                fields, calls = reply.feed(text, final=finish_reason is not None)
                return builder.add(fields.get("content", ""), [openai_tool_call(call) for call in calls])

            def final_events(completion_tokens):
                return builder.finish(finish[0], len(chat.ids), completion_tokens)

            events = await stream_events(service, jobs, make_events, final_events, raw, sse=sse_event, done="")
            return StreamingResponse(events, media_type="text/event-stream")

        (text,), (reason,), (tokens,), _, _ = await collect(service, request, jobs, raw=raw)
        message = reply_message(chat.parse(chat.prefix + text)) if raw else {"content": text}
        builder.add(message["content"] or "", message.get("tool_calls", []))
        builder.finish(reason, len(chat.ids), tokens)
        return builder.response()

    app.include_router(v1)
    return app


def _with_seed(params: "SamplingParams", seed: int | None) -> "SamplingParams":
    return dataclasses.replace(params, seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm serve", description=__doc__.split("\n\n")[0])
    add_runtime_arguments(parser, "the server")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TINYLLM_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $TINYLLM_API_KEY, else no key)")
    parser.add_argument("--served-model-name", help="model id clients send (default: the --model file or folder name)")
    parser.add_argument("--max-queue", type=positive_int, default=64, help="waiting sequences before answering 503")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is abandoned")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from tinyllm_hf.inference.engine import Engine
    from tinyllm_hf.inference.runtime import load_backend

    runtime = load_backend(args.backend, args.model, dtype=args.dtype, threads=args.threads,
                           trust_remote_code=args.trust_remote_code, rope_scaling=args.rope_scaling,
                           streams=args.max_batch_size)
    if args.host not in LOOPBACK_HOSTS and not args.api_key:
        print(f"tinyllm serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    engine = Engine(runtime, args.max_batch_size, args.max_queue, args.request_timeout)
    model_id = args.served_model_name or Path(args.model).name
    app = build_app(engine, model_id, args.api_key, args.max_body_bytes)
    print(f"tinyllm serve: {model_id} ({runtime.backend}) at http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    from tinyllm_hf.cli import run_command

    sys.exit(run_command("tinyllm serve", main))
