"""OpenAI's Responses API (`POST /v1/responses`) as a translation to and from chat completions.

A Responses request becomes a chat completion request (`chat_body`), which the router prices, holds, queues and
settles like any other; the chat answer, whole or streamed, becomes a Response object or the Responses event
stream (`ResponseEvents`). The shapes follow OpenAI's API spec (`CreateResponse`, `Response`,
`ResponseStreamEvent`) and what the `openai` Python client parses:

    input item                               chat message
    "text"                                   {"role": "user", "content": "text"}
    {"role", "content": str | [parts]}       {"role", "content": the parts' text}   (input_text / output_text)
    {"type": "function_call", "call_id",     an assistant message's tool_calls[i] =
     "name", "arguments"}                      {"id": call_id, "type": "function", "function": {name, arguments}}
    {"type": "function_call_output",         {"role": "tool", "tool_call_id": call_id, "content": output}
     "call_id", "output"}
    instructions                             a first system message

    chat answer                              Response output item
    message.content                          {"type": "message", "content": [{"type": "output_text", ...}]}
    message.tool_calls[i]                    {"type": "function_call", "call_id", "name", "arguments"}
    finish_reason "length"                   status "incomplete", incomplete_details.reason "max_output_tokens"
    usage.prompt_tokens / completion_tokens  usage.input_tokens / output_tokens (+ llamakit's cost, cost_credits)
    logprobs.content (with `include:         output_text.logprobs, and each output_text.delta's logprobs
     ["message.output_text.logprobs"]`)      (`top_logprobs` alternatives per token, 0-20)

Nothing is stored: `store: true`, `previous_response_id` and `conversation` are refused with a 400 that says so,
and so is every other field llamakit does not act on (never a silent drop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamakit.wire.completions import MAX_MODELS, MAX_TOP_LOGPROBS, ChatCompletionRequest, ChatMessage
from llamakit.wire.embeddings import validate_body
from llamakit.wire.errors import ApiError
from llamakit.wire.numbers import Bid

__all__ = [
    "RESPONSES_FIELDS",
    "ResponseEvents",
    "ResponsesRequest",
    "chat_body",
    "chat_chunks",
    "parse_responses_request",
    "response_from_chat",
    "responses_usage",
]

# The fields llamakit acts on; `bid` is llamakit's own. Any other field is a 400 naming it.
RESPONSES_FIELDS = frozenset(
    {
        "model",
        "models",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "stream",
        "store",
        "metadata",
        "user",
        "truncation",
        "include",
        "top_logprobs",
        "background",
        "bid",
    }
)

_NOT_KEPT = "llamakit does not keep responses"
# Fields with a reason of their own; the rest get the generic message.
_REFUSALS = {
    "previous_response_id": f"{_NOT_KEPT}, so there is none to continue: send the whole conversation in 'input'",
    "conversation": f"{_NOT_KEPT} or conversations: send the whole conversation in 'input'",
    "prompt": "stored prompt templates are not kept here: send the text in 'instructions' and 'input'",
    "reasoning": "no model served here reasons in a separate channel; leave 'reasoning' out",
    "max_tool_calls": "the number of tool calls is not limited here; leave 'max_tool_calls' out",
    "service_tier": "there is one tier; raise the 'bid' to be served sooner",
}


class FunctionTool(BaseModel):
    """A Responses function tool: `{"type": "function", "name", "description", "parameters", "strict"}`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON that satisfies `schema`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The fields of `POST /v1/responses` that llamakit acts on, with OpenAI's bounds."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    # OpenRouter's model fallbacks, as on chat completions (their names are checked there)
    models: list[str] | None = Field(default=None, min_length=1, max_length=MAX_MODELS)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    background: Literal[False] | None = None
    bid: Bid | None = None

    @property
    def format(self) -> TextFormat | None:
        return None if self.text is None else self.text.format

    @property
    def logprobs(self) -> bool:
        """Whether the output text carries its tokens' log probabilities: only when `include` asks for
        them, as OpenAI's API has it (`top_logprobs` alone sets how many alternatives, and returns none)."""
        return LOGPROBS_INCLUDE in (self.include or ())


LOGPROBS_INCLUDE = "message.output_text.logprobs"


def parse_responses_request(data: dict[str, Any]) -> ResponsesRequest:
    """Validate a parsed `POST /v1/responses` body; a 400 naming the field for anything llamakit does not do.
    `null` means "not given", as in OpenAI's schema where every optional field is nullable."""
    data = {k: v for k, v in data.items() if v is not None}
    for name in sorted(data):
        if name not in RESPONSES_FIELDS:
            reason = _REFUSALS.get(name, "llamakit does not act on it; remove it")
            raise ApiError(400, f"{name!r} is not supported on /v1/responses: {reason}", param=name, code=_UNSUPPORTED)
    if data.get("store") is True:
        raise ApiError(
            400,
            f"{_NOT_KEPT}: send 'store': false or leave it out (nothing can be retrieved by id later)",
            param="store",
            code=_UNSUPPORTED,
        )
    if data.get("background") is True:
        raise ApiError(400, "background responses are not supported: leave 'background' out", param="background")
    if data.get("truncation") not in (None, "disabled"):
        raise ApiError(
            400, "only 'truncation': 'disabled' is supported: a too-long input is refused", param="truncation"
        )
    include = data.get("include")
    for item in include if isinstance(include, list) else ():
        if item != LOGPROBS_INCLUDE:
            raise ApiError(
                400,
                f"'include' asks for {item!r}, which llamakit does not make; it can include {LOGPROBS_INCLUDE!r}",
                param="include",
                code=_UNSUPPORTED,
            )
    if "input" not in data:
        raise ApiError(400, "'input' is required: a string, or a list of messages and items", param="input")
    req = validate_body(ResponsesRequest, data)
    if not req.tools and req.tool_choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {req.tool_choice!r} needs 'tools' to choose from", param="tool_choice")
    if req.tools or _has_tool_items(req.input):
        chat_fields = ChatCompletionRequest.model_fields
        if "tools" not in chat_fields or "tool_calls" not in ChatMessage.model_fields:
            raise ApiError(
                400,
                "function tools need tool calling on chat completions, which this llamakit does not have yet",
                param="tools",
                code=_UNSUPPORTED,
            )
    return req


_UNSUPPORTED = "unsupported_field"  # as protocol.py names it for chat and completions


def _has_tool_items(items: str | list[dict[str, Any]]) -> bool:
    return not isinstance(items, str) and any(i.get("type") in _TOOL_ITEMS for i in items)


_TOOL_ITEMS = ("function_call", "function_call_output")
_ROLES = ("user", "assistant", "system", "developer")


def _content_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or parts of type input_text / output_text / refusal."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", param="input")
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text", part.get("refusal")) if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "refusal") or not isinstance(text, str):
            raise ApiError(
                400,
                f"{where}.content[{j}] of type {kind!r} is not supported: only text parts "
                "(input_text, output_text) are",
                param="input",
            )
        pieces.append(text)
    return "".join(pieces)


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages of a Responses request (see the module's table); 400 naming `input[i]` when an item
    is of a kind llamakit cannot render."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", param="input")
            messages.append({"role": role, "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": _text_field(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _text_field(item, "name", where),
                    "arguments": _text_field(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # calls made in the same turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, where)
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", where), "content": text})
        else:
            raise ApiError(
                400,
                f"{where} of type {kind!r} is not supported: input items are messages, function_call and "
                f"function_call_output"
                + (f" ({_NOT_KEPT}, so none can be referenced)" if kind == "item_reference" else ""),
                param="input",
            )
    if not messages:
        raise ApiError(400, "'input' is empty: give at least one message", param="input")
    return messages


def _text_field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name} must be a string", param="input")
    return value


def chat_body(req: ResponsesRequest, *, stream: bool) -> dict[str, Any]:
    """The chat completion request a Responses request means. A stream always asks for usage: the Responses
    events end with it (`response.completed`)."""
    body: dict[str, Any] = {"messages": chat_messages(req)}
    if req.model is not None:
        body["model"] = req.model
    if req.models is not None:
        body["models"] = req.models
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "bid", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in req.tools
        ]
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tools and req.tool_choice is not None:  # without tools, "auto" and "none" mean the same: no calls
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
    fmt = req.format
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise ApiError(400, "text.format of type 'json_schema' needs a 'schema'", param="text")
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if req.logprobs:
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """`auto` / `none` / `required` as they are; `{"type": "function", "name"}` as chat's
    `{"type": "function", "function": {"name"}}`."""
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(
        400,
        f"tool_choice {choice!r} is not supported: give 'auto', 'none', 'required' or "
        '{"type": "function", "name": …}',
        param="tool_choice",
    )


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage in the Responses shape: input/output tokens, cached input tokens, and llamakit's `cost` (the
    price in the operator's currency) and `cost_credits`."""
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    details = usage.get("prompt_tokens_details") or {}
    shaped: dict[str, Any] = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0) or 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
    for name in ("cost", "cost_credits", "cost_details"):
        if usage.get(name) is not None:
            shaped[name] = usage[name]
    return shaped


class ResponseEvents:
    """Turns a chat completion's stream (chunks as the router forwards them, usage chunk with `cost` included)
    into the Responses event stream, numbered by `sequence_number`:

        response.created, response.in_progress,
        per text:  response.output_item.added, response.content_part.added, response.output_text.delta …,
                   response.output_text.done, response.content_part.done, response.output_item.done
        per call:  response.output_item.added, response.function_call_arguments.delta …,
                   response.function_call_arguments.done, response.output_item.done
        response.completed (or response.incomplete at max_output_tokens, response.failed on an error)

    Items are written one after the other, as OpenAI writes them: an item's `response.output_item.done` comes
    before the next item's `response.output_item.added` (clients that follow "the current item" rely on it), so
    a chunk for a new item (a new tool-call index, or text after a call) ends the item before it.

    The last event's `response` is the whole Response object, which is also the body of a call not streamed.
    """

    def __init__(self, req: ResponsesRequest, *, response_id: str, model: str) -> None:
        self.req = req
        self.id = response_id
        self.model = model
        self.created_at = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.finished = False
        self.last: dict[str, Any] | None = None
        # Output index of the one item being written: the items before it are done, as OpenAI streams them.
        self._current: int | None = None
        self._calls: dict[int, int] = {}  # chat tool-call index → output index
        self._suffix = response_id.removeprefix("resp_")

    def response(self, status: str, *, usage: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """The Response object as it stands, with `status`."""
        req = self.req
        fmt = req.format
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": [dict(item) for item in self.output] if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "top_logprobs": req.top_logprobs if req.top_logprobs is not None else 0,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "background": False,
            "usage": usage,
            **extra,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        self.last = event
        return event

    def opening(self) -> list[dict[str, Any]]:
        response = self.response("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events one chat chunk (or an `{"error": …}` event) makes; none once the response has ended."""
        if self.finished:
            return []
        error = chunk.get("error")
        if isinstance(error, dict):
            return self._failed(error)
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            # A completion-shaped chunk (`text`) is read as content too, as the SDK reads either shape.
            text = delta.get("content") or choice.get("text")
            if text:
                events += self._text(text, _logprob_entries(choice.get("logprobs")))
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            events += self._finish(chunk["usage"])
        return events

    def closing(self) -> list[dict[str, Any]]:
        """The events that end a stream that had no usage chunk (the client did not get one)."""
        return [] if self.finished else self._finish(None)

    def _text(self, piece: str, logprobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self._current is None or self.output[self._current]["type"] != "message":
            yield from self._close_current()  # text after a call is a new message: the call ends here
            yield from self._open_message()
        index = self._current
        assert index is not None
        item = self.output[index]
        part = item["content"][0]
        part["text"] += piece
        if self.req.logprobs:
            part["logprobs"] += logprobs
        yield self._event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=piece,
            logprobs=_event_logprobs(logprobs) if self.req.logprobs else [],
        )

    def _open_message(self) -> Iterator[dict[str, Any]]:
        """Start a message item (the item being written must have ended): `msg_<suffix>`, and for a message
        after another (text, calls, text) `msg_<suffix>_<output index>`, as item ids are unique in a Response."""
        index = self._current = len(self.output)
        seen = any(item["type"] == "message" for item in self.output)
        item_id = f"msg_{self._suffix}_{index}" if seen else f"msg_{self._suffix}"
        item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant"}
        self.output.append({**item, "content": []})
        yield self._event("response.output_item.added", output_index=index, item={**item, "content": []})
        yield self._event(
            "response.content_part.added",
            item_id=item_id,
            output_index=index,
            content_index=0,
            part=_text_part(""),
        )
        self.output[index]["content"] = [_text_part("")]

    def _close_current(self, status: str = "completed") -> Iterator[dict[str, Any]]:
        """End the item being written, if any, with `status` ("incomplete": cut at max_output_tokens)."""
        if self._current is None:
            return
        index, self._current = self._current, None
        if self.output[index]["type"] == "message":
            yield from self._close_text(index, status)
        else:
            yield from self._close_call(index, status)

    def _close_text(self, index: int, status: str) -> Iterator[dict[str, Any]]:
        item = self.output[index]
        item["status"] = status
        part = item["content"][0]
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        logprobs = _event_logprobs(part["logprobs"])
        yield self._event("response.output_text.done", **common, text=part["text"], logprobs=logprobs)
        yield self._event("response.content_part.done", **common, part=dict(part))
        yield self._event("response.output_item.done", output_index=index, item=_copy(item))

    def _call(self, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        function = call.get("function") or {}
        position = call.get("index", len(self._calls))
        index = self._calls.get(position)
        if index is None:
            yield from self._close_current()  # the text of a turn, or the call before, ends where a call begins
            index = self._calls[position] = self._current = len(self.output)
            item = {
                "type": "function_call",
                "id": f"fc_{self._suffix}_{position}",
                "call_id": call.get("id") or f"call_{self._suffix}_{position}",
                "name": function.get("name") or "",
                "arguments": "",
                "status": "in_progress",
            }
            self.output.append(item)
            yield self._event("response.output_item.added", output_index=index, item=dict(item))
        elif function.get("name"):
            self.output[index]["name"] += function["name"]
        arguments = function.get("arguments")
        if arguments:
            self.output[index]["arguments"] += arguments
            # A piece of a call that has ended (llama.cpp and OpenAI finish a call before the next) is kept in
            # the Response, but not streamed: no event of an item may follow its response.output_item.done.
            if index == self._current:
                yield self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.output[index]["id"],
                    output_index=index,
                    delta=arguments,
                )

    def _close_call(self, index: int, status: str) -> Iterator[dict[str, Any]]:
        item = self.output[index]
        item["status"] = status  # "incomplete" for a call cut at max_output_tokens: its arguments are partial
        yield self._event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            name=item["name"],
            arguments=item["arguments"],
        )
        yield self._event("response.output_item.done", output_index=index, item=dict(item))

    def _finish(self, usage: dict[str, Any] | None) -> list[dict[str, Any]]:
        incomplete = self.finish_reason == "length"
        events: list[dict[str, Any]] = []
        if not self.output:  # an empty answer is an empty message, as a whole answer shows it
            events += self._open_message()
        events += self._close_current("incomplete" if incomplete else "completed")
        self.finished = True
        shaped = responses_usage(usage)
        if incomplete:
            response = self.response("incomplete", usage=shaped, incomplete_details={"reason": "max_output_tokens"})
            events.append(self._event("response.incomplete", response=response))
        else:
            response = self.response("completed", usage=shaped, completed_at=int(time.time()))
            events.append(self._event("response.completed", response=response))
        return events

    def _failed(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        self.finished = True
        failure = {
            "code": error.get("code") or "server_error",
            "message": error.get("message") or "the response failed",
        }
        return [self._event("response.failed", response=self.response("failed", error=failure))]


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _logprob_entries(logprobs: Any) -> list[dict[str, Any]]:
    """A chat choice's `logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`): the shape of
    a Responses `output_text`'s `logprobs` too; [] when the choice has none."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [entry for entry in content if isinstance(entry, dict)] if isinstance(content, list) else []


def _event_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries as the `response.output_text.delta` and `.done` events carry them: `token`, `logprob` and
    `top_logprobs` of `token` and `logprob` (no `bytes`, per OpenAI's ResponseTextDeltaEvent)."""
    return [
        {
            "token": entry.get("token"),
            "logprob": entry.get("logprob"),
            "top_logprobs": [
                {"token": top.get("token"), "logprob": top.get("logprob")} for top in entry.get("top_logprobs") or ()
            ],
        }
        for entry in entries
    ]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "content": [dict(p) for p in item.get("content", [])]}


def chat_chunks(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat completion as the chunks a stream of it would have been (content, tool calls, finish,
    usage): what `ResponseEvents` reads, for an answer that was not streamed."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {}
    text = message.get("content") or choice.get("text")
    if text:
        delta["content"] = text
    calls = message.get("tool_calls") or []
    if calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
    finish = choice.get("finish_reason") or "stop"
    chunks = [{"choices": [{"index": 0, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": finish}]}]
    if answer.get("usage"):
        chunks.append({"choices": [], "usage": answer["usage"]})
    return chunks


def response_from_chat(req: ResponsesRequest, answer: dict[str, Any], *, response_id: str) -> dict[str, Any]:
    """The Response object of a whole chat completion `answer` (its usage carrying llamakit's `cost`)."""
    events = ResponseEvents(req, response_id=response_id, model=str(answer.get("model") or req.model or ""))
    for chunk in chat_chunks(answer):
        events.feed(chunk)
    events.closing()
    assert events.last is not None  # _finish always emits the closing event
    response: dict[str, Any] = events.last["response"]
    return response
