"""Wire types shared by the node, the router and the SDK: OpenAI-shaped requests, responses and errors.

Requests are strict about the fields llamakit acts on (types, bounds) and tolerant of the rest, so that
the official `openai` client, which sends fields such as `n` or `presence_penalty`, works unchanged.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ApiError",
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
    "error_body",
    "parse_json",
    "parse_request",
    "validate_request",
]

MAX_STOP_STRINGS = 4
_Req = TypeVar("_Req", bound="GenerationRequest")
_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "dict", "list", "function-after", "function-before"})


class ApiError(Exception):
    """An error a client caused or must handle, rendered as an OpenAI-shaped body with `status`.

    `extra` carries machine-readable details (for example the amount needed on a 402) that are merged
    into the error object so clients need not parse the message.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param, **self.extra)


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; OpenAI content parts of type `text` are joined, others are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces: list[str] = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    f"content part of type {part.get('type')!r} is not supported: only text parts are",
                    param="messages",
                )
            pieces.append(part["text"])
        return "".join(pieces)


class GenerationRequest(_Lenient):
    """Fields common to chat and text completions (the sampling knobs and llamakit's extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    grammar: str | None = None
    response_format: ResponseFormat | None = None
    bid: StrictInt | StrictFloat | None = None  # strict: `true` is not a bid
    user: str | None = None

    @field_validator("temperature", "top_p", "bid", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
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


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    cost: int | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens),
        )


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object from a request body, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def validate_request(model: type[_Req], data: dict[str, Any]) -> _Req:
    """Validate a parsed body against `model`, turning the first problem into a 400 that names the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic tags union members in the location ("bid.int"); the client's field is the first part.
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
        param = str(first["loc"][0]) if first["loc"] else None
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise ApiError(400, f"invalid request: {message}", param=param, code="invalid_value") from exc


def parse_request(model: type[_Req], raw: bytes) -> _Req:
    return validate_request(model, parse_json(raw))


def _created() -> int:
    return int(time.time())


def chat_completion_body(*, id: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": _created(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.model_dump(exclude_none=True),
    }


def completion_body(*, id: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": _created(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.model_dump(exclude_none=True),
    }


def chat_chunk_body(
    *,
    id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk with empty `choices`."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
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
) -> dict[str, Any]:
    """One streamed `text_completion` chunk; `text=None` makes the usage-only chunk."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {
        "id": id,
        "object": "text_completion",
        "created": _created(),
        "model": model,
        "choices": choices,
        "usage": None if usage is None else usage.model_dump(exclude_none=True),
    }
