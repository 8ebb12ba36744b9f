"""One logical call, independent of sync or async I/O: the body it sends, its idempotency key and
attempts, how the router's answer (whole or streamed) becomes a `Generation`, and the `UsageRecord` it
ends as, whether it worked or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from time import perf_counter
from typing import Any, Final, Literal, TypedDict
from urllib.parse import unquote

import httpx
from pydantic import BaseModel, ValidationError

from llamakit.sdk._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    StreamInterruptedError,
)
from llamakit.sdk._logprobs import MAX_TOP_LOGPROBS, TokenLogprob, logprobs_of
from llamakit.sdk._models import Embeddings, Generation, Info, PassedOver, TokenUsage
from llamakit.sdk._types import EmbeddingInput, Messages, NotGiven, Timeout
from llamakit.sdk._usage import UsageRecord, utc_now
from llamakit.wire.headers import (
    BID_HEADER,
    COST_CREDITS_HEADER,
    COST_HEADER,
    CURRENCY_HEADER,
    NODE_HEADER,
    PASSED_OVER_HEADER,
    QUEUE_HEADER,
    REQUEST_ID_HEADER,
)

__all__ = [
    "AUTO_BID_STEP",
    "DEFAULT_MAX_BID",
    "Call",
    "EmbedOptions",
    "GenerateOptions",
    "Kind",
    "RequestOptions",
    "SseDecoder",
    "StreamState",
    "auto_bid",
    "chat_messages",
    "transport_error",
]

Kind = Literal["generate", "chat", "embed"]


# The AO client's rule: out-bid the last dispatched multiplier by 0.5 % while others are waiting.
AUTO_BID_STEP: Final = 1.005
# "auto" with no cap could bid up forever against another auto bidder; this is the cap when none is set.
DEFAULT_MAX_BID: Final = 2.0


class RequestOptions(TypedDict, total=False):
    """Keyword options of every call: `timeout` (seconds, an `httpx.Timeout`, or None for no limit; the
    client's when not given) and `max_retries` (the client's when not given)."""

    timeout: Timeout | NotGiven
    max_retries: int | NotGiven


class GenerateOptions(RequestOptions, total=False):
    """Keyword options every generation call takes (`generate`, `chat`, their streams and async twins).

    Sampling: `model` (the client's, else the router's default), `models` (fallbacks, as OpenRouter's: tried in
    order after `model` when it cannot serve the call, which is billed at the fees of the one that served it;
    `Generation.model` says which, `passed_over` why the others did not), `max_tokens`, `temperature`, `top_p`,
    `stop`, `seed`; `user` (OpenAI's: who the call is for, kept on the router's usage record and in
    this client's usage frame). Constraints: `grammar` (GBNF) or `json_schema` (a JSON schema dict or a pydantic
    model class). Money: `bid` (a multiplier ≥ 1, or "auto" to out-bid the queue up to `max_bid`).
    Insight: `logprobs` (0 to 20) asks for each generated token's log probability and that many most likely
    alternatives (`Generation.logprobs`; chat's `logprobs`/`top_logprobs`, completions' `logprobs` on the wire).
    Transport: `timeout` (seconds, an `httpx.Timeout` or None for none; the client's when not given),
    `max_retries`, `idempotency_key` (one is made per call when not given: give your own to make a call
    safe to repeat across restarts), `extra_body` (merged into the JSON body as is).
    """

    model: str | None
    models: list[str] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: str | list[str] | None
    seed: int | None
    user: str | None
    grammar: str | None
    json_schema: dict[str, Any] | type[BaseModel] | None
    bid: float | Literal["auto"] | None
    max_bid: float | None
    idempotency_key: str | None
    extra_body: Mapping[str, Any] | None
    logprobs: int | None


class EmbedOptions(RequestOptions, total=False):
    """Keyword options of `embed` and `aembed`: `model` (the client's, else the router's default),
    `dimensions` (the router refuses any size but the model's own: vectors are not shortened), `bid` (a
    multiplier ≥ 1, or "auto" up to `max_bid`), `user` (OpenAI's end-user label, kept on the router's usage
    record), `idempotency_key`, `extra_body`, `timeout`, `max_retries`.
    """

    model: str | None
    dimensions: int | None
    user: str | None
    bid: float | Literal["auto"] | None
    max_bid: float | None
    idempotency_key: str | None
    extra_body: Mapping[str, Any] | None


_SAMPLING = ("max_tokens", "temperature", "top_p", "stop", "seed", "grammar", "user")


def chat_messages(messages: Messages, system: str | None = None) -> list[dict[str, Any]]:
    """OpenAI chat messages from a list of message mappings or a plain string (one user message)."""
    if isinstance(messages, str):
        listed: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        listed = [dict(m) for m in messages]
        for i, message in enumerate(listed):
            if "role" not in message or "content" not in message:
                raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(message)}")
    if system is not None:
        listed.insert(0, {"role": "system", "content": system})
    if not listed:
        raise ValueError("a chat needs at least one message")
    return listed


def auto_bid(info: Info, model: str | None, max_bid: float) -> float:
    """The AO client's bid: the last dispatched multiplier, bumped 0.5 % when the queue is not empty, capped.

    The queue is the model's own when the router lists it (the whole router's when no model is named).
    """
    if max_bid < 1:
        raise ValueError(f"max_bid must be at least 1 (the lowest bid there is), got {max_bid}")
    bid = max(info.last_multiplier, 1.0)
    waiting = info.models[model].queue_length if model in info.models else info.queue_length
    if waiting > 0:
        bid *= AUTO_BID_STEP
    # Six decimals keep the wire value short; the router accepts up to twenty.
    return min(round(bid, 6), max_bid)


def transport_error(exc: httpx.RequestError) -> APIConnectionError:
    request = _request_of(exc)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"the router did not answer in time ({exc!r})", request=request)
    return APIConnectionError(f"could not talk to the router: {exc!r}", request=request)


def _request_of(exc: httpx.RequestError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # httpx raises when the error was not tied to a request
        return None


def _choice_text(choice: dict[str, Any]) -> str | None:
    """A choice's text, whatever its shape: chat `message` or `delta` content, or completion `text`.

    Read by shape rather than by the endpoint asked, so a node that answers a chat in the completion
    shape (as the test nodes do) is still understood.
    """
    for holder in ("message", "delta"):
        part = choice.get(holder)
        if isinstance(part, dict) and "content" in part:
            content = part["content"]
            return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _vector(embedding: Any) -> list[float]:
    """A vector as OpenAI sends it: a list of numbers, or base64 of little-endian float32s."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if not isinstance(embedding, list):
        raise TypeError(f"an embedding is a list or base64 text, got {type(embedding).__name__}")
    return [float(x) for x in embedding]


def _header_int(response: httpx.Response, name: str) -> int | None:
    try:
        return int(response.headers[name])
    except (KeyError, ValueError):
        return None


def _header_decimal(response: httpx.Response, name: str) -> Decimal | None:
    try:
        value = Decimal(response.headers[name])
    except (KeyError, InvalidOperation):
        return None
    return value if value.is_finite() else None


def _charge(usage: TokenUsage | None, response: httpx.Response) -> dict[str, Any]:
    """`cost`, `cost_credits` and `currency` of an answer: from its usage, else from its headers."""
    cost = usage.cost if usage is not None else None
    credits = usage.cost_credits if usage is not None else None
    currency = response.headers.get(CURRENCY_HEADER)
    if credits is None:
        credits = _header_int(response, COST_CREDITS_HEADER)
        if credits is not None and cost is None:
            cost = _header_decimal(response, COST_HEADER)
        elif currency is None:  # a router older than prices in a currency: its cost header is the credits
            credits = _header_int(response, COST_HEADER)
    return {"cost": cost, "cost_credits": credits, "currency": currency}


def _passed_over(body: Mapping[str, Any] | None, response: httpx.Response) -> list[PassedOver] | None:
    """The models passed over before the one that served a call: from the answer's `passed_over` (a whole answer,
    or a stream's usage chunk), else from `X-Llamakit-Passed-Over`; None when the call named no `models`."""
    listed = body.get("passed_over") if body is not None else None
    if isinstance(listed, list):
        return [PassedOver.model_validate(p) for p in listed if isinstance(p, dict)]
    header = response.headers.get(PASSED_OVER_HEADER)
    if not header:
        return None
    entries = [item.rpartition("=") for item in header.split(", ")]
    return [PassedOver(model=unquote(model), reason=reason) for model, sep, reason in entries if sep]


def _header_float(response: httpx.Response, name: str) -> float | None:
    try:
        return float(response.headers[name])
    except (KeyError, ValueError):
        return None


@dataclass
class Call:
    """A generation call from the caller's point of view: every attempt shares its idempotency key."""

    kind: Kind
    stream: bool
    model: str | None
    idempotency_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: datetime = field(default_factory=utc_now)
    started: float = field(default_factory=perf_counter)
    attempts: int = 0
    bid: float | None = None
    first_token: float | None = None
    user: str | None = None

    def body(self, payload: dict[str, Any], options: GenerateOptions) -> dict[str, Any]:
        """The JSON body: `payload` (prompt or messages) plus the options that were given (None is omitted)."""
        body: dict[str, Any] = dict(payload)
        if self.model is not None:
            body["model"] = self.model
        models = options.get("models")
        if models is not None:
            if isinstance(models, str) or not all(isinstance(m, str) for m in models):
                raise ValueError(f"models is a list of model names, got {models!r}")
            body["models"] = list(models)
        for name in _SAMPLING:
            value = options.get(name)
            if value is not None:
                body[name] = value
        self.user = options.get("user")
        top = options.get("logprobs")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs is how many alternatives per token, 0 to {MAX_TOP_LOGPROBS}; got {top!r}")
            if self.kind == "chat":
                body["logprobs"], body["top_logprobs"] = True, top
            else:
                body["logprobs"] = top
        schema = options.get("json_schema")
        if schema is not None:
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                name, schema = schema.__name__, schema.model_json_schema()
            else:
                name = str(schema.get("title") or "response")
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        if self.bid is not None:
            body["bid"] = self.bid
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(options.get("extra_body") or {})
        return body

    def embed_body(self, input: EmbeddingInput, options: EmbedOptions) -> dict[str, Any]:
        """The `/v1/embeddings` body. Vectors travel as base64 (4 bytes a number instead of ~20 in JSON)."""
        if isinstance(input, str):
            given: Any = input
        else:
            given = [item if isinstance(item, str | int) else list(item) for item in input]
        body: dict[str, Any] = {"input": given, "encoding_format": "base64"}
        if self.model is not None:
            body["model"] = self.model
        for name in ("dimensions", "user"):
            if options.get(name) is not None:
                body[name] = options[name]
        self.user = options.get("user")
        if self.bid is not None:
            body["bid"] = self.bid
        body.update(options.get("extra_body") or {})
        return body

    def embeddings(self, response: httpx.Response) -> Embeddings:
        """The `Embeddings` in a 2xx `/v1/embeddings` answer (vectors as float lists or base64 float32)."""
        request_id = response.headers.get(REQUEST_ID_HEADER)
        try:
            body = response.json()
            data = sorted(body["data"], key=lambda d: d["index"])
            vectors = [_vector(d["embedding"]) for d in data]
            usage = body.get("usage") or {}
            prompt = int(usage["prompt_tokens"])
            tokens = TokenUsage.model_validate(
                {**usage, "prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
            )
        except (json.JSONDecodeError, binascii.Error, KeyError, IndexError, TypeError, ValueError, struct.error) as exc:
            raise APIResponseValidationError(
                f"the router's answer is not a list of embeddings: {response.text[:200]!r}",
                request=response.request,
                request_id=request_id,
            ) from exc
        queue_ms = _header_float(response, QUEUE_HEADER)
        return Embeddings(
            vectors=vectors,
            model=body.get("model") or self.model,
            node=response.headers.get(NODE_HEADER),
            request_id=request_id,
            usage=tokens,
            **_charge(tokens, response),
            bid=_header_float(response, BID_HEADER) or self.bid,
            latency=self.elapsed,
            queue_wait=None if queue_ms is None else queue_ms / 1000,
            attempts=max(self.attempts, 1),
        )

    def embedding_record(self, result: Embeddings) -> UsageRecord:
        usage = result.usage
        return UsageRecord(
            time=self.time,
            kind=self.kind,
            model=result.model,
            user=self.user,
            node=result.node,
            request_id=result.request_id,
            idempotency_key=self.idempotency_key,
            status="ok",
            status_code=200,
            prompt_tokens=None if usage is None else usage.prompt_tokens,
            completion_tokens=0,
            total_tokens=None if usage is None else usage.total_tokens,
            cost=result.cost,
            cost_credits=result.cost_credits,
            currency=result.currency,
            bid=result.bid,
            latency=result.latency,
            queue_wait=result.queue_wait,
            attempts=result.attempts,
        )

    def start_clock(self) -> None:
        """Time the call from now: a stream is made at once but only sent when it is first iterated."""
        self.time, self.started = utc_now(), perf_counter()

    @property
    def elapsed(self) -> float:
        return perf_counter() - self.started

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = self.elapsed

    def generation(self, response: httpx.Response) -> Generation:
        """The `Generation` in a whole (not streamed) 2xx answer."""
        request_id = response.headers.get(REQUEST_ID_HEADER)
        try:
            body = response.json()
            choice = body["choices"][0]
            if not any(k in choice for k in ("message", "delta", "text")):
                raise KeyError("text")
            text = _choice_text(choice)
            usage = TokenUsage.model_validate(body["usage"]) if body.get("usage") else None
            logprobs = logprobs_of(choice)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValidationError) as exc:
            raise APIResponseValidationError(
                f"the router's answer is not a {self.kind} completion: {response.text[:200]!r}",
                request=response.request,
                request_id=request_id,
            ) from exc
        return self._generation(
            response,
            text=text or "",
            model=body.get("model"),
            finish_reason=choice.get("finish_reason"),
            usage=usage,
            request_id=body.get("id") or request_id,
            logprobs=logprobs,
            passed_over=_passed_over(body, response),
        )

    def _generation(
        self,
        response: httpx.Response,
        *,
        text: str,
        model: str | None,
        finish_reason: str | None,
        usage: TokenUsage | None,
        request_id: str | None,
        logprobs: list[TokenLogprob] | None = None,
        passed_over: list[PassedOver] | None = None,
    ) -> Generation:
        queue_ms = _header_float(response, QUEUE_HEADER)
        return Generation(
            text=text,
            model=model or self.model,
            node=response.headers.get(NODE_HEADER),
            request_id=response.headers.get(REQUEST_ID_HEADER) or request_id,
            finish_reason=finish_reason,
            usage=usage,
            **_charge(usage, response),
            bid=_header_float(response, BID_HEADER) or self.bid,
            latency=self.elapsed,
            ttft=self.first_token,
            queue_wait=None if queue_ms is None else queue_ms / 1000,
            attempts=max(self.attempts, 1),
            logprobs=logprobs,
            passed_over=passed_over,
        )

    def record(self, generation: Generation) -> UsageRecord:
        usage = generation.usage
        return UsageRecord(
            time=self.time,
            kind=self.kind,
            stream=self.stream,
            model=generation.model,
            node=generation.node,
            request_id=generation.request_id,
            idempotency_key=self.idempotency_key,
            status="ok",
            status_code=200,
            prompt_tokens=None if usage is None else usage.prompt_tokens,
            cached_tokens=None if usage is None else usage.cached_tokens,
            completion_tokens=None if usage is None else usage.completion_tokens,
            total_tokens=None if usage is None else usage.total_tokens,
            cost=generation.cost,
            cost_credits=generation.cost_credits,
            cache_discount=None if usage is None else usage.cache_discount,
            cache_discount_credits=None if usage is None else usage.cache_discount_credits,
            currency=generation.currency,
            passed_over=generation.passed_over,
            bid=generation.bid,
            latency=generation.latency,
            ttft=generation.ttft,
            queue_wait=generation.queue_wait,
            attempts=generation.attempts,
            user=self.user,
        )

    def failure(
        self, error: BaseException, *, response: httpx.Response | None = None, cut: bool = False
    ) -> UsageRecord:
        """The record of a call that ended without a whole answer: an error, or a stream the caller cut."""
        request_id = error.request_id if isinstance(error, APIError) else None
        if response is not None:
            request_id = response.headers.get(REQUEST_ID_HEADER) or request_id
        status_code = error.status_code if isinstance(error, APIStatusError) else None
        message = error.message if isinstance(error, APIError) else str(error) or type(error).__name__
        return UsageRecord(
            time=self.time,
            kind=self.kind,
            stream=self.stream,
            model=self.model,
            node=None if response is None else response.headers.get(NODE_HEADER),
            request_id=request_id,
            idempotency_key=self.idempotency_key,
            status="cut" if cut else "error",
            status_code=status_code if response is None else response.status_code,
            bid=(_header_float(response, BID_HEADER) if response is not None else None) or self.bid,
            latency=self.elapsed,
            ttft=self.first_token,
            attempts=self.attempts,  # 0 when the call failed before anything was sent
            error_type=None if cut else type(error).__name__,
            error=None if cut else message,
            user=self.user,
        )


class SseDecoder:
    """Server-sent events from raw bytes, fed as they arrive: yields each event's `data` text."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return
            line, self._buffer = self._buffer[:end].rstrip(b"\r").decode("utf-8"), self._buffer[end + 1 :]
            if not line:
                if self._data:
                    yield "\n".join(self._data)
                    self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
            # other fields (event:, id:, retry:) and comments (":") carry nothing the router uses


@dataclass
class StreamState:
    """What a stream has delivered so far; `feed` turns one event into a text piece (or None)."""

    call: Call
    response: httpx.Response
    pieces: list[str] = field(default_factory=list)
    model: str | None = None
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    request_id: str | None = None
    done: bool = False
    logprobs: list[TokenLogprob] | None = None
    passed_over: list[PassedOver] | None = None

    def feed(self, data: str) -> str | None:
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise APIResponseValidationError(
                f"the router sent an event that is not JSON: {data[:200]!r}",
                request=self.response.request,
                request_id=self.response.headers.get(REQUEST_ID_HEADER),
            ) from exc
        if not isinstance(event, dict):
            return None
        if isinstance(event.get("error"), dict):
            error = event["error"]
            raise StreamInterruptedError(
                str(error.get("message") or "the stream failed"),
                text=self.text,
                code=error.get("code") if isinstance(error.get("code"), str) else None,
                request=self.response.request,
                request_id=self.response.headers.get(REQUEST_ID_HEADER),
            )
        self.model = event.get("model") or self.model
        self.request_id = event.get("id") or self.request_id
        if isinstance(event.get("passed_over"), list):
            self.passed_over = _passed_over(event, self.response)
        if event.get("usage"):
            try:
                self.usage = TokenUsage.model_validate(event["usage"])
            except ValidationError as exc:
                raise APIResponseValidationError(
                    f"the router sent usage that is not usage: {event['usage']!r}", request=self.response.request
                ) from exc
        piece: str | None = None
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            piece = _choice_text(choice)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            found = logprobs_of(choice)
            if found is not None:
                self.logprobs = (self.logprobs or []) + found
        if piece:
            self.call.mark_first_token()
            self.pieces.append(piece)
            return str(piece)
        return None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def generation(self) -> Generation:
        return self.call._generation(
            self.response,
            text=self.text,
            model=self.model,
            finish_reason=self.finish_reason,
            usage=self.usage,
            request_id=self.request_id,
            logprobs=self.logprobs,
            passed_over=self.passed_over if self.passed_over is not None else _passed_over(None, self.response),
        )
