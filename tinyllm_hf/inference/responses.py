"""`/v1/responses`, OpenAI's Responses API, as a translation onto the chat-completions path of `server.py`.

A Responses request (`input` as a string or a list of items, `instructions`, `max_output_tokens`, function `tools`,
`text.format`) becomes a chat-completions request (`ResponsesRequest.chat_body`): message items are messages,
`function_call` items an assistant message's tool calls, `function_call_output` items `tool` messages. It is then
rendered, generated and parsed exactly as a chat completion is. `ResponseBuilder` turns the reply - its content deltas
and completed tool calls - into the Responses output items and the event sequence the `openai` client reads
(response.created ... response.completed); a reply that is not streamed runs through the same builder at once.

Nothing is stored: `previous_response_id`, `store: true`, `background`, `conversation`, built-in tools (web search,
file search, ...) and the rest in `ResponsesRequest.unsupported` are refused with a 400 naming the field.
"""

import json
import time
import uuid
from typing import Literal

from pydantic import Field, ValidationError

from tinyllm_hf.errors import APIError
from tinyllm_hf.inference.server import MAX_SEED, MIN_SEED, JsonSchemaFormat, _is_union_label, _param_path, _Request

# ---------------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------------


class InputPart(_Request):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class FunctionTool(_Request):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint; a small model has one verbosity


ITEM_TYPES = {None: MessageItem, "message": MessageItem, "function_call": FunctionCallItem,
              "function_call_output": FunctionCallOutputItem}


def _revalidate(model_class: type[_Request], value: dict, where: str) -> None:
    """Raise the 400 naming what is wrong in `value`, an item the request's union left as a plain dict because it
    fits none of its item types (`where`: its place in the request)."""
    try:
        model_class.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = f"{where}.{_param_path(tuple(part for part in first['loc'] if not _is_union_label(part)))}"
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value") from None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem | dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)  # not OpenAI's, as chat completions take it
    stream: bool = False
    tools: list[FunctionTool | dict] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    user: str | None = None
    metadata: dict | None = None  # echoed back, as OpenAI does
    # Refused when used (`unsupported`).
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    reasoning: dict | None = None
    include: list | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    truncation: Literal["auto", "disabled"] | None = None

    def unsupported(self) -> dict[str, bool]:
        return {
            "previous_response_id": self.previous_response_id is not None,  # nothing is stored to continue from
            "store": bool(self.store),
            "background": bool(self.background),
            "conversation": self.conversation is not None,
            "prompt": self.prompt is not None,
            "reasoning": self.reasoning is not None,
            "include": bool(self.include),
            "top_logprobs": bool(self.top_logprobs),
            "max_tool_calls": self.max_tool_calls is not None,
            "truncation": self.truncation == "auto",
        }

    def check_supported(self) -> None:
        for name, used in self.unsupported().items():
            if used:
                raise APIError(400, f"'{name}' is not supported by this server's /v1/responses", param=name,
                               code="unsupported_parameter")
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, dict) and tool.get("type") == "function":
                _revalidate(FunctionTool, tool, f"tools[{i}]")
            if isinstance(tool, dict):  # not a function tool: web_search, file_search, mcp, ...
                raise APIError(400, f"tools[{i}] of type {tool.get('type')!r} is not supported: this server runs no "
                               "built-in tools, only function tools the client executes", param=f"tools[{i}].type",
                               code="unsupported_parameter")
        for i, item in enumerate(self.input if isinstance(self.input, list) else []):
            item_class = ITEM_TYPES.get(item.get("type")) if isinstance(item, dict) else None
            if item_class is not None:
                _revalidate(item_class, item, f"input[{i}]")
            if isinstance(item, dict):
                raise APIError(400, f"input[{i}] of type {item.get('type')!r} is not supported: input items are "
                               "messages, function_call and function_call_output", param=f"input[{i}].type",
                               code="unsupported_parameter")

    def messages(self) -> list[dict]:
        """The input as chat-completions messages: the instructions first, consecutive function calls as one
        assistant message's tool calls."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        return messages

    def chat_body(self) -> dict:
        """This request as a chat-completions request body."""
        body = {"model": self.model, "messages": self.messages(), "max_completion_tokens": self.max_output_tokens,
                "seed": self.seed, "user": self.user}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": tool.name, **({"description": tool.description} if tool.description is not None else {}),
                "parameters": tool.parameters or {"type": "object", "properties": {}}}} for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        text_format = self.text.format if self.text is not None else None
        if text_format is not None and text_format.type == "json_schema":
            if text_format.name is None or text_format.schema_ is None:
                raise APIError(400, "text.format of type json_schema needs 'name' and 'schema'", param="text.format",
                               code="invalid_value")
            schema = JsonSchemaFormat.model_validate(text_format.model_dump(by_alias=True, exclude={"type"},
                                                                            exclude_none=True))
            body["response_format"] = {"type": "json_schema", "json_schema": schema.model_dump(by_alias=True)}
        elif text_format is not None:
            body["response_format"] = {"type": text_format.type}
        return {key: value for key, value in body.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------------------
# The response and its events
# ---------------------------------------------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """The output items of one reply and the events that build them: `start()`, then `add(content, calls)` for each
    piece of the reply (content text, tool calls in chat-completions form, each complete), then `finish(reason,
    input_tokens, output_tokens)`; each returns its events. `response()` is the Response object at any point."""

    def __init__(self, request: ResponsesRequest, model_id: str):
        self.request, self.model_id = request, model_id
        self.id, self.created = _id("resp"), int(time.time())
        self.output: list[dict] = []
        self.status, self.usage, self.incomplete = "in_progress", None, None
        self.text_item: dict | None = None  # the message item being written, while it is open
        self.sequence = 0

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def response(self) -> dict:
        request = self.request
        text_format = request.text.format.model_dump(by_alias=True, exclude_none=True) \
            if request.text is not None and request.text.format is not None else {"type": "text"}
        tool_choice = request.tool_choice or "auto"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status,
            "model": self.model_id, "output": [dict(item) for item in self.output], "error": None,
            "incomplete_details": self.incomplete, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens, "metadata": request.metadata or {},
            "parallel_tool_calls": request.parallel_tool_calls is not False, "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": request.temperature if request.temperature is not None else 1.0,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "text": {"format": text_format},
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "truncation": "disabled", "usage": self.usage, "user": request.user,
        }

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def _open_text(self) -> list[dict]:
        self.text_item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                          "content": []}
        self.output.append(self.text_item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=dict(self.text_item)),
                self._event("response.content_part.added", item_id=self.text_item["id"], output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _close_text(self, status: str) -> list[dict]:
        item, index = self.text_item, len(self.output) - 1
        self.text_item = None
        text = item.pop("text", "")
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item.update(status=status, content=[part])
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=dict(item))]

    def add(self, content: str, calls: list[dict]) -> list[dict]:
        events = []
        if content:
            if self.text_item is None:
                events += self._open_text()
            self.text_item["text"] = self.text_item.get("text", "") + content
            events.append(self._event("response.output_text.delta", item_id=self.text_item["id"],
                                      output_index=len(self.output) - 1, content_index=0, delta=content, logprobs=[]))
        for call in calls:
            if self.text_item is not None:
                events += self._close_text("completed")
            function = call["function"]
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                    "name": function["name"], "arguments": ""}
            self.output.append(item)
            index = len(self.output) - 1
            events.append(self._event("response.output_item.added", output_index=index, item=dict(item)))
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=function["arguments"]))
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=function["arguments"]))
            item.update(arguments=function["arguments"], status="completed")
            events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return events

    def finish(self, reason: str, input_tokens: int, output_tokens: int) -> list[dict]:
        """`reason`: the chat finish reason ("stop", "length" or "tool_calls")."""
        status = "incomplete" if reason == "length" else "completed"
        events = []
        if not self.output:  # an empty reply is still one (empty) message
            events += self._open_text()
        if self.text_item is not None:
            events += self._close_text(status)
        self.status = status
        self.incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        self.usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens}
        return events + [self._event(f"response.{status}", response=self.response())]


def sse_event(event: dict) -> str:
    """One Responses event as server-sent events write it (the `event:` line names its type, as OpenAI's do)."""
    return f"event: {event.get('type', 'error')}\ndata: {json.dumps(event)}\n\n"
