"""OpenAI's answers as llamakit sends them, as pydantic models: what `/openapi.json` says a client gets.

The node writes these bodies as dicts on its hot path (`wire.completions.chat_completion_body` and the chunk
writers; `wire.embeddings.embedding_body`; `wire.responses.ResponseEvents`), and the router passes them on with
the usage's `cost` and `cost_credits` added. The models name the fields a client may rely on and their types;
they allow fields they do not name, as OpenAI's clients do. The schemathesis run in the tests
(tests/router/test_openapi_fuzz.py) checks every answer against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamakit.wire.completions import Usage

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "CreateEmbeddingResponse",
    "ErrorBody",
    "Response",
    "ResponseStreamEvent",
    "TextCompletion",
    "TextCompletionChunk",
]


class _Open(BaseModel):
    """A body with the fields it names and any others (clients must tolerate fields they do not know)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str = Field(description="what was wrong and what to do")
    type: str = Field(description="OpenAI's error type: invalid_request_error, authentication_error, …")
    param: str | None = Field(description="the request field (or query parameter, or header) at fault")
    code: str | None = Field(description="llamakit's error code (docs/api.md#errors lists them)")


class ErrorBody(_Open):
    """Every error, from every route: OpenAI's shape, with details such as `needed` and `balance` on a 402."""

    error: ErrorDetail


class FunctionCall(_Open):
    name: str
    arguments: str = Field(description="the call's arguments as JSON text")


class AnswerToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatAnswerMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[AnswerToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: ChatAnswerMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(_Open):
    """`POST /v1/chat/completions`, whole: OpenAI's `chat.completion`, its usage priced (`cost`, `cost_credits`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Open):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    """One `data:` event of a chat stream; the last before `[DONE]` carries the usage when the request asked
    for it (`stream_options.include_usage`), with empty `choices`. A stream that fails after its first token
    ends with an `{"error": …}` event (ErrorBody's shape)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class TextCompletion(_Open):
    """`POST /v1/completions`, whole: OpenAI's `text_completion`, its usage priced."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class TextCompletionChunk(_Open):
    """One `data:` event of a text completion's stream (the usage one has empty `choices`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 bytes")


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int
    cost: float | None = None
    cost_credits: int | None = None


class CreateEmbeddingResponse(_Open):
    """`POST /v1/embeddings`: one embedding per input, in input order."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ResponseUsage(_Open):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] | None = None
    output_tokens_details: dict[str, int] | None = None
    cost: float | None = None
    cost_credits: int | None = None


class Response(_Open):
    """`POST /v1/responses`, whole: OpenAI's Response object (`wire.responses.ResponseEvents.response`)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None


class ResponseStreamEvent(_Open):
    """One event of a Responses stream (`event: <type>` and `data: <this>`), numbered by `sequence_number`;
    `response.completed`, `response.incomplete` or `response.failed` ends it, with the whole Response."""

    type: str
    sequence_number: int
