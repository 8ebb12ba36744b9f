"""Wire types shared by the node, the router and the SDK: OpenAI-shaped requests, responses and errors.

Requests are strict about the fields llamakit acts on (types, bounds) and tolerant of the rest, so that
the official `openai` client, which sends fields such as `n` or `presence_penalty`, works unchanged.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from llamakit.wire._lenient import Lenient
from llamakit.wire.errors import ApiError
from llamakit.wire.numbers import Bid, read_float
from llamakit.wire.tool_calls import MAX_TOOLS, Tool, ToolSetup, render_tool_messages, tool_setup

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "ResponseFormat",
    "StreamOptions",
    "Usage",
    "chat_chunk_body",
    "chat_completion_body",
    "completion_body",
    "completion_chunk_body",
    "parse_json",
    "parse_request",
    "validate_request",
]

MAX_STOP_STRINGS = 4
MAX_MODELS = 4  # names in a request's `models` (fallbacks), as OpenRouter takes a few
MAX_MODEL_NAME = 256
# What may reach llama.cpp's parsers and the stop matcher from one request: its grammar parser recurses once
# per nested group and crashes the process (a stack overflow) on deep nesting, so the sizes are bounded here.
MAX_STOP_CHARS = 256
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_GRAMMAR_DEPTH = 64
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_COUNT = 1024  # minItems, maxLength …: the JSON-schema converter spells out each repetition
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API allows
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
# OpenAI's `seed` is a 64-bit integer; llama.cpp takes 32 bits of it.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_Req = TypeVar("_Req", bound="GenerationRequest")
_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "dict", "list", "function-after", "function-before"})


_Lenient = Lenient


class StreamOptions(_Lenient):
    include_usage: bool = False


class UsageAccounting(_Lenient):
    """OpenRouter's `usage: {"include": true}`, which clients of OpenRouter (litellm's `openrouter/` models)
    send to get `usage.cost`. Every answer here carries it, so only `true` says what happens."""

    include: Literal[True]

    @field_validator("include", mode="before")
    @classmethod
    def _always(cls, value: Any) -> Any:
        if value is not True:
            raise ValueError(
                "usage is always reported here, with cost and cost_credits: send include true or leave usage out"
            )
        return value


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema_shape(value)
        return value


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class ToolCallFunction(_Lenient):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call

    def as_dict(self) -> dict[str, Any]:
        """The message as `render_tool_messages` and the chat template take it (content as text)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        """The message's text; OpenAI content parts of type `text` are joined, others are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces: list[str] = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(
                    400,
                    f"content part of type {part.get('type')!r} is not supported: only text parts are",
                    param="messages",
                )
            if not isinstance(part.get("text"), str):
                raise ApiError(400, "a content part of type 'text' needs a 'text' string", param="messages")
            pieces.append(part["text"])
        return "".join(pieces)


class GenerationRequest(_Lenient):
    """Fields common to chat and text completions (the sampling knobs and llamakit's extensions)."""

    # Any other field is refused (`check_fields`), so the API's description allows none.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"additionalProperties": False})

    model: str | None = None
    # OpenRouter's model fallbacks: tried in order after `model` (when given) until one can serve the request.
    models: list[str] | None = Field(default=None, min_length=1, max_length=MAX_MODELS)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    grammar: str | None = None
    response_format: ResponseFormat | None = None
    bid: Bid | None = None  # `true` is not a bid; "1.5" is, as in the header
    user: str | None = Field(default=None, max_length=100)  # kept on the usage record
    logit_bias: dict[str, StrictInt | StrictFloat] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # llama.cpp's multiplicative repetition penalty (llama-server's `repeat_penalty`, vLLM's `repetition_penalty`)
    repeat_penalty: float = Field(
        default=1.0, gt=0.0, le=2.0, validation_alias=AliasChoices("repeat_penalty", "repetition_penalty")
    )
    # OpenAI's fields that change nothing here by their nature, accepted at the values that say so
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = None
    usage: UsageAccounting | None = None  # OpenRouter's; the usage of every answer carries its cost

    # Request fields, by name, that llamakit refuses with a reason rather than drop (see docs/api.md, "Fields").
    REFUSED: ClassVar[dict[str, str]] = {
        "audio": "audio output is not supported: the models here produce text",
        "modalities": "only text is produced here",
        "prediction": "predicted outputs are not supported",
        "web_search_options": "there is no web search here",
        "reasoning_effort": "the models here do not reason in a separate channel",
        "verbosity": "the models here have no verbosity setting",
        "functions": "the deprecated 'functions' field is not supported: use 'tools'",
        "function_call": "the deprecated 'function_call' field is not supported: use 'tool_choice'",
        "metadata": "requests are not stored here, so there is nowhere to keep metadata",
        "prompt_cache_key": "llamakit routes a conversation to its cache by its text; the key is not used",
        "safety_identifier": "llamakit keeps 'user' on usage records; 'safety_identifier' is not used",
    }

    @classmethod
    def check_fields(cls, data: dict[str, Any]) -> None:
        """A 400 naming the first field that llamakit would otherwise drop silently: refused ones with their
        reason, unknown ones as unknown. `modalities: ["text"]` and `n: 1` say what happens anyway."""
        known = _field_names(cls)
        for key, value in data.items():
            if key in known or value is None:
                continue
            if key == "modalities" and value == ["text"]:
                continue
            reason = cls.REFUSED.get(key)
            if reason is None:
                reason = f"it is not a field of this endpoint (see {cls.DOCS})"
            raise ApiError(400, f"{key!r} is not supported: {reason}", param=key, code="unsupported_field")

    _ALIASES: ClassVar[frozenset[str]] = frozenset({"repetition_penalty"})
    DOCS: ClassVar[str] = "OpenAI's API reference; docs/api.md#fields lists the fields llamakit takes"

    @field_validator("store", mode="before")
    @classmethod
    def _not_stored(cls, value: Any) -> Any:
        if value is True:
            raise ValueError("requests are not stored here: send store false or leave it out")
        return value

    def logprob_count(self) -> int | None:
        """How many alternatives per token to report with its logprob; None when logprobs were not asked for."""
        return None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not name.strip() or len(name) > MAX_MODEL_NAME:
                raise ValueError(f"each model is a non-empty name of at most {MAX_MODEL_NAME} characters, got {name!r}")
        return value

    def model_names(self) -> list[str | None]:
        """The models the request may be served by, in order: `model` then `models`, each once; `[model]` (None:
        the router's default) without `models`."""
        if not self.models:
            return [self.model]
        return list(dict.fromkeys([self.model, *self.models] if self.model is not None else self.models))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return value

    @field_validator("grammar")
    @classmethod
    def _grammar_bounded(cls, value: str | None) -> str | None:
        if value is not None:
            check_grammar_shape(value, what="grammar")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_bounded(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}")
        for token, bias in value.items():
            if not token.isdigit() or len(token) > 9:
                raise ValueError(f"keys are token ids (non-negative integers as strings), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100, got {bias} for token {token}")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationRequest:
        if self.grammar is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give either 'grammar' or a JSON 'response_format', not both")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        """`max_tokens`, or OpenAI's newer `max_completion_tokens` when only that is given."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _tools_alone(self) -> ChatCompletionRequest:
        if self.tools and (self.grammar is not None or (self.response_format and self.response_format.type != "text")):
            raise ValueError("give either 'tools' or a 'grammar' / JSON 'response_format', not both")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs 'tools' to choose from")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            for tool in self.tools:
                check_schema_shape(tool.function.parameters)
            tool_setup(self.tools, self.tool_choice, parallel=self.parallel_tool_calls)  # a named choice must exist
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template gets them: earlier tool calls and results in the generic format,
        and the tools offered in a system message (first, or added to the first system message)."""
        messages = render_tool_messages([m.as_dict() for m in self.messages])
        setup = self.tool_setup()
        if setup is not None:
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + setup.system}
            else:
                messages.insert(0, {"role": "system", "content": setup.system})
        return messages

    def tool_setup(self) -> ToolSetup | None:
        return tool_setup(self.tools or [], self.tool_choice, parallel=self.parallel_tool_calls)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] | None = None  # the prompt is not repeated in the answer
    best_of: Literal[1] | None = None  # one candidate is generated
    suffix: None = None  # insertion is not supported

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt: `cached_tokens` came from the node's prompt cache, not decoded again."""

    cached_tokens: int = 0


class CostDetails(BaseModel):
    """What the price leaves out (OpenRouter's `cost_details`): `cache_discount`, what prompt tokens read from a
    cache took off it in the operator's currency, and `cache_discount_credits`, the exact credits."""

    cache_discount: float = 0.0
    cache_discount_credits: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    cost: float | None = None  # the price in the operator's currency (see llamakit.money.currency)
    cost_credits: int | None = None  # the exact credits the ledger moved
    cost_details: CostDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens),
        )


def check_grammar_shape(grammar: str, *, what: str) -> None:
    """Refuse a GBNF text that is too large or nests groups too deeply for llama.cpp's recursive parser.

    Raises ValueError (a 400 `invalid_grammar` at the HTTP layer) naming the limit. Only groups count:
    nesting through rules (`a ::= "(" a ")"`) is not recursion in the parser.
    """
    try:
        size = len(grammar.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"the {what} is not valid Unicode text (a lone surrogate at {exc.start})") from exc
    if size > MAX_GRAMMAR_BYTES:
        raise ValueError(f"the {what} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are allowed")
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in '"[':  # a literal or a character class: skip to its end, escapes included
            end = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != end:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_GRAMMAR_DEPTH:
                raise ValueError(
                    f"the {what} nests groups more than {MAX_GRAMMAR_DEPTH} deep; use named rules instead of deeper '('"
                )
        elif c == ")":
            depth -= 1
        i += 1


def check_schema_shape(schema: Any) -> None:
    """Refuse a JSON schema too large or too deep to turn into a grammar safely (ValueError naming the limit)."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are allowed")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            for key, value in node.items():
                counted = key in _SCHEMA_COUNTS and isinstance(value, int) and not isinstance(value, bool)
                if counted and not 0 <= value <= MAX_SCHEMA_COUNT:
                    raise ValueError(f"{key} is {value}; it must be between 0 and {MAX_SCHEMA_COUNT}")
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)


_SCHEMA_COUNTS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"})


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object from a request body, or a 400 that says what is wrong with it: not JSON, not an object,
    or nested more than MAX_BODY_DEPTH levels deep. A number no float holds as written is kept with its text
    (`wire.numbers.read_float`), so that a bid is read from its own digits."""
    try:
        data = json.loads(raw, parse_float=read_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except ValueError as exc:  # an integer of more than 4300 digits (Python's limit on int(str))
        raise ApiError(400, f"the request body holds a number too long to read: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if _deeper_than(data, MAX_BODY_DEPTH):
        raise ApiError(400, f"the request body nests more than {MAX_BODY_DEPTH} levels deep", code="invalid_json")
    return data


# No request of OpenAI's API nests nearly this deep; a body that does is refused before it is written again
# (to a node, into an error), where deeper JSON costs a RecursionError instead of an answer.
MAX_BODY_DEPTH = 128


def _deeper_than(data: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values() if isinstance(value, dict | list))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node if isinstance(item, dict | list))
    return False


def validate_request(model: type[_Req], data: dict[str, Any]) -> _Req:
    """Validate a parsed body against `model`, turning the first problem into a 400 that names the field; a
    field llamakit does not act on is a 400 too (`unsupported_field`), never dropped."""
    model.check_fields(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic tags union members in the location ("bid.int"); the client's field is the first part.
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
        param = str(first["loc"][0]) if first["loc"] else None
        said = first["msg"].removeprefix("Value error, ")  # pydantic's wording around a validator's own message
        if param is None:  # a check across fields names the field it is about first ("top_logprobs needs …")
            named = said.split(" ", 1)[0].strip("'")
            param = named if named in _field_names(model) else None
        message = f"{where}: {said}" if where else said
        code = _ERROR_CODES.get(param or "", "invalid_value") if first["type"] == "value_error" else "invalid_value"
        raise ApiError(400, f"invalid request: {message}", param=param, code=code) from exc


_ERROR_CODES = {"grammar": "invalid_grammar", "response_format": "invalid_schema"}


@functools.cache
def _field_names(model: type[GenerationRequest]) -> frozenset[str]:
    """The names `model` takes, aliases included, looked up once (`model_fields` is a descriptor call)."""
    return frozenset(model.model_fields) | model._ALIASES


def parse_request(model: type[_Req], raw: bytes) -> _Req:
    return validate_request(model, parse_json(raw))


def _created() -> int:
    return int(time.time())


def chat_completion_body(
    *,
    id: str,
    model: str,
    text: str | None,
    finish_reason: str,
    usage: Usage,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion`; with `tool_calls` the message carries them (and `content` may be None)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": _created(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage.model_dump(exclude_none=True),
    }


def completion_body(
    *,
    id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": _created(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage.model_dump(exclude_none=True),
    }


def chat_chunk_body(
    *,
    id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk with empty `choices`."""
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    )
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": _created(),
        "model": model,
        "choices": choices,
        "usage": None if usage is None else usage.model_dump(exclude_none=True),
    }


def completion_chunk_body(
    *,
    id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed `text_completion` chunk; `text=None` makes the usage-only chunk."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    return {
        "id": id,
        "object": "text_completion",
        "created": _created(),
        "model": model,
        "choices": choices,
        "usage": None if usage is None else usage.model_dump(exclude_none=True),
    }
