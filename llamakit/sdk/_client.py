"""`Client` and `AsyncClient`: the router's API as typed calls, with retries, idempotency keys and metering.

Both share everything but the I/O (`_calls` builds bodies and results, `_retry` decides on retries), so
the sync and async forms of a call behave the same. The sync client never touches an event loop, which is
why it works inside a running one (a Jupyter kernel).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, Unpack
from urllib.parse import quote, urlencode

import httpx

from llamakit import __version__
from llamakit.sdk import _retry
from llamakit.sdk._batches import AsyncBatch, Batch, BatchInfo, Endpoint, batch_file
from llamakit.sdk._calls import (
    DEFAULT_MAX_BID,
    Call,
    EmbedOptions,
    GenerateOptions,
    Kind,
    RequestOptions,
    auto_bid,
    chat_messages,
    transport_error,
)
from llamakit.sdk._config import resolve_config, resolve_usage_log
from llamakit.sdk._exceptions import APIConnectionError, APIError, APIResponseValidationError, status_error
from llamakit.sdk._models import Account, ApiKeyInfo, Embeddings, Generation, Info, Model, RouterUsage
from llamakit.sdk._retry import DEFAULT_MAX_RETRIES, RetryPolicy
from llamakit.sdk._streaming import AsyncStream, Stream
from llamakit.sdk._types import DEFAULT_TIMEOUT, NOT_GIVEN, EmbeddingInput, Messages, NotGiven, Timeout
from llamakit.sdk._usage import UsageBook, UsageRecord
from llamakit.wire.headers import IDEMPOTENCY_HEADER, REQUEST_ID_HEADER

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["AsyncClient", "Client"]

log = logging.getLogger("llamakit.sdk")

_T = TypeVar("_T")
_PATHS: Final[dict[Kind, str]] = {
    "generate": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embed": "/v1/embeddings",
}
_USER_AGENT: Final = f"llamakit-sdk/{__version__} httpx/{httpx.__version__}"


class _AttemptFailed(Exception):
    """One attempt failed with `error`; `wait` is the router's Retry-After, if it sent one."""

    def __init__(self, error: APIError, *, cause: BaseException | None = None, wait: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.cause = cause
        self.wait = wait


def _failed_status(response: httpx.Response) -> _AttemptFailed:
    error = status_error(response, request_id=response.headers.get(REQUEST_ID_HEADER))
    return _AttemptFailed(error, wait=_retry.retry_after(response))


def _trace_context(headers: dict[str, str]) -> None:
    """The caller's current OpenTelemetry trace context (W3C `traceparent`), so that the router's and the node's
    spans join the caller's trace. Nothing when the caller does not use OpenTelemetry: then it is not imported,
    and neither is it here."""
    if "opentelemetry.context" not in sys.modules:
        return
    try:
        from opentelemetry import propagate
    except ImportError:
        return
    propagate.inject(headers)


def _new_batch(file_id: str, endpoint: str, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"the router's answer is not JSON: {response.text[:200]!r}", request=response.request
        ) from exc


class _BaseClient:
    def __init__(
        self,
        *,
        url: str | None,
        api_key: str | None,
        model: str | None,
        timeout: Timeout | NotGiven,
        max_retries: int,
        max_bid: float | None,
        retry_policy: RetryPolicy | None,
        usage: UsageBook | None,
        usage_log: str | os.PathLike[str] | NotGiven | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._config = resolve_config(url=url, api_key=api_key, model=model)
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        if usage is not None and not isinstance(usage_log, NotGiven):
            raise ValueError("give either usage= (a shared UsageBook, which has its own log) or usage_log=, not both")
        self.base_url = self._config.url
        self.model = self._config.model
        self.timeout: Timeout = DEFAULT_TIMEOUT if isinstance(timeout, NotGiven) else timeout
        self.max_retries = max_retries
        self.max_bid = max_bid
        self.retry_policy = retry_policy or RetryPolicy()
        self.usage = usage if usage is not None else UsageBook(resolve_usage_log(usage_log))
        self._headers = {"User-Agent": _USER_AGENT, **(headers or {})}

    def __repr__(self) -> str:
        # Never the key: reprs end up in notebooks and logs.
        return f"<{type(self).__name__} {self.base_url} model={self.model!r}>"

    @property
    def usage_records(self) -> list[UsageRecord]:
        """This client's usage records so far (a copy), oldest first."""
        return self.usage.records

    def usage_frame(self) -> pd.DataFrame:
        """This client's usage records as a DataFrame (dtypes in `FRAME_DTYPES`)."""
        return self.usage.frame()

    def _request_headers(self, idempotency_key: str, *, auth: bool) -> dict[str, str]:
        headers = {**self._headers, IDEMPOTENCY_HEADER: idempotency_key}
        if auth:
            headers["Authorization"] = f"Bearer {self._config.require_key()}"
        _trace_context(headers)
        return headers

    def _call(self, kind: Kind, stream: bool, options: GenerateOptions | EmbedOptions) -> Call:
        bid = options.get("bid")
        if bid is not None and bid != "auto" and isinstance(bid, str | bool):
            raise ValueError(f"bid must be a number ≥ 1 or 'auto', got {bid!r}")
        key = options.get("idempotency_key") or str(uuid.uuid4())
        call = Call(kind=kind, stream=stream, model=options.get("model") or self.model, idempotency_key=key)
        if isinstance(bid, int | float):
            call.bid = float(bid)
        return call

    def _timeout(self, timeout: Timeout | NotGiven) -> Timeout:
        return self.timeout if isinstance(timeout, NotGiven) else timeout

    def _retries(self, max_retries: int | NotGiven) -> int:
        if isinstance(max_retries, NotGiven):
            return self.max_retries
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        return max_retries

    def _bid_cap(self, options: GenerateOptions | EmbedOptions) -> float:
        return options.get("max_bid") or self.max_bid or DEFAULT_MAX_BID

    def _give_up(self, failed: _AttemptFailed, tries: int, retries: int) -> float | None:
        """The delay before the next attempt, or None to raise `failed.error` now."""
        if tries >= retries or not self.retry_policy.should_retry(failed.error):
            return None
        delay = self.retry_policy.delay(tries, failed.wait)
        log.info("retrying in %.2f s (retry %d of %d) after: %s", delay, tries + 1, retries, failed.error)
        return delay


class Client(_BaseClient):
    """A synchronous client for a llamakit router.

    Configuration comes from the arguments, then `LLAMAKIT_URL` / `LLAMAKIT_API_KEY`, then the profile
    `llamakit up` writes. `timeout` (default: 600 s, 5 s to connect) and `max_retries` (default 2) apply
    to every call unless a call gives its own; `max_bid` caps `bid="auto"` (default 2.0). Every generation
    call becomes a `UsageRecord` in `client.usage` (and in `usage_log`, a JSONL file,
    `$LLAMAKIT_USAGE_LOG` by default; `usage_log=None` for none). `http_client` lets you bring your own
    httpx client (proxies, a mock transport); the SDK then leaves closing it to you.
    Thread-safe: one client can serve many threads. Close it, or use it as a context manager.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_bid: float | None = None,
        retry_policy: RetryPolicy | None = None,
        usage: UsageBook | None = None,
        usage_log: str | os.PathLike[str] | NotGiven | None = NOT_GIVEN,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            url=url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            max_bid=max_bid,
            retry_policy=retry_policy,
            usage=usage,
            usage_log=usage_log,
            headers=headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.timeout)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
        """Complete `prompt` (a raw text completion, `/v1/completions`)."""
        return self._complete("generate", {"prompt": prompt}, options)

    def chat(self, messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]) -> Generation:
        """Answer a chat (`/v1/chat/completions`); a plain string is one user message, `system` is prepended."""
        return self._complete("chat", {"messages": chat_messages(messages, system)}, options)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> Stream:
        """`generate`, streamed: iterate for text pieces, then read `.result`."""
        return self._stream("generate", {"prompt": prompt}, options)

    def stream_chat(
        self, messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Stream:
        """`chat`, streamed: iterate for text pieces, then read `.result`."""
        return self._stream("chat", {"messages": chat_messages(messages, system)}, options)

    def embed(self, input: EmbeddingInput, **options: Unpack[EmbedOptions]) -> Embeddings:
        """Embed `input` with the model (`/v1/embeddings`): a text, texts, or token-id lists; one vector each.

        Priced per input token like a prompt, queued and retried like any call, and recorded in `usage`.
        """
        call = self._call("embed", False, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))
        try:
            self._settle_bid(call, options)
            request = self._http.build_request(
                "POST",
                self.base_url + _PATHS["embed"],
                json=call.embed_body(input, options),
                headers=self._request_headers(call.idempotency_key, auth=True),
                timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
            )
            response = self._retrying(lambda: self._attempt(request), retries=retries, call=call)
            result = call.embeddings(response)
        except BaseException as exc:
            self.usage.add(call.failure(exc))
            raise
        self.usage.add(call.embedding_record(result))
        return result

    def generate_many(
        self,
        prompts: Iterable[str | Messages],
        *,
        chat: bool = False,
        system: str | None = None,
        concurrency: int = 4,
        progress: bool = True,
        **options: Unpack[GenerateOptions],
    ) -> pd.DataFrame:
        """Run a batch on `concurrency` threads with a progress bar; one DataFrame row per prompt, in order.

        A string is a completion prompt (a chat user message when `chat=True`); a list of messages is a
        chat. A failed prompt does not stop the batch: its row has the error and no text.
        """
        from llamakit.sdk._batch import generate_many

        return generate_many(
            self, prompts, chat=chat, system=system, concurrency=concurrency, progress=progress, **options
        )

    # -- the router's other routes ------------------------------------------------------------------

    def models(self, **options: Unpack[RequestOptions]) -> list[Model]:
        """The models the herd serves, with their fees."""
        body = _json(self._get("/v1/models", auth=True, options=options))
        data = body.get("data") if isinstance(body, dict) else None
        return [Model.model_validate(m) for m in data] if isinstance(data, list) else []

    def info(self, **options: Unpack[RequestOptions]) -> Info:
        """Fees, queue lengths and the last multiplier (`GET /v1/info`, no key needed)."""
        return Info.model_validate(_json(self._get("/v1/info", auth=False, options=options)))

    def account(self, **options: Unpack[RequestOptions]) -> Account:
        """This key's account: balance, held, spent and deposited credits, and the key (`.key`)."""
        return Account.model_validate(_json(self._get("/v1/account", auth=True, options=options)))

    def key(self, **options: Unpack[RequestOptions]) -> ApiKeyInfo:
        """This API key (`GET /v1/key`): its name, limits, spend against its caps, use of its rate limits."""
        return ApiKeyInfo.model_validate(_json(self._get("/v1/key", auth=True, options=options)))

    def router_usage(
        self,
        limit: int = 100,
        *,
        since: float | str | None = None,
        user: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[RouterUsage]:
        """This account's requests as the router's ledger recorded them, newest first, up to `limit` (every page
        fetched), from `since` (epoch seconds or ISO 8601) and for `user` when given. See `RouterUsage`."""
        records: list[RouterUsage] = []
        before: int | None = None
        while len(records) < limit:
            path = _usage_path(min(1000, limit - len(records)), before, since, user)
            page = _json(self._get(path, auth=True, options=options))
            records += _usage_page(page)
            before = page.get("next_before") if isinstance(page, dict) and page.get("has_more") else None
            if before is None:
                break
        return records

    def report_event(self, kind: str, data: Mapping[str, Any] | None = None, **options: Unpack[RequestOptions]) -> int:
        """Report an outcome to the router (`POST /v1/events`), such as an agent's buy, skip or error.

        The router keeps events per account and sums them in the operator's stats; returns the event's id.
        Not retried by default: an event is not idempotent, and a lost one costs less than a double.
        """
        request = self._http.build_request(
            "POST",
            self.base_url + "/v1/events",
            headers=self._request_headers(str(uuid.uuid4()), auth=True),
            json={"kind": kind, "data": dict(data or {})},
            timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
        )
        retries = options.get("max_retries", 0)
        response = self._retrying(lambda: self._attempt(request), retries=self._retries(retries))
        event_id: int = _json(response)["id"]
        return event_id

    # -- batches ----------------------------------------------------------------------------------

    def submit_batch(
        self,
        requests: Iterable[str | Messages | Mapping[str, Any]],
        *,
        endpoint: Endpoint = "/v1/chat/completions",
        model: str | None = None,
        system: str | None = None,
        metadata: Mapping[str, str] | None = None,
        **body: Any,
    ) -> Batch:
        """Run `requests` as a batch: at the router's batch discount, on slots no interactive request wants, within
        24 hours. A request is a prompt, chat messages or a whole body (see `llamakit.sdk._batches`); `body`'s
        fields (`max_tokens`, `temperature` …) go in each. Returns the `Batch` to `wait()` for and read `results()`
        of. Not retried: a batch sent twice would run twice."""
        content, _count = batch_file(requests, endpoint=endpoint, model=model or self.model, system=system, body=body)
        upload = self._send("POST", "/v1/files", files={"file": ("batch.jsonl", content)}, data={"purpose": "batch"})
        made = self._send("POST", "/v1/batches", json=_new_batch(_json(upload)["id"], endpoint, metadata), retries=0)
        return Batch(self, BatchInfo.model_validate(_json(made)))

    def batch(self, batch_id: str) -> Batch:
        """The batch `batch_id` (one of this key's account), as it is now."""
        return Batch(self, self._batch_info(batch_id))

    def _batch_info(self, batch_id: str) -> BatchInfo:
        return BatchInfo.model_validate(_json(self._send("GET", f"/v1/batches/{quote(batch_id, safe='')}")))

    def _cancel_batch(self, batch_id: str) -> BatchInfo:
        answer = self._send("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel")
        return BatchInfo.model_validate(_json(answer))

    def _file_text(self, file_id: str) -> str:
        return self._send("GET", f"/v1/files/{quote(file_id, safe='')}/content").text

    def _send(self, method: str, path: str, *, retries: int | None = None, **content: Any) -> httpx.Response:
        request = self._http.build_request(
            method, self.base_url + path, headers=self._request_headers(str(uuid.uuid4()), auth=True), **content
        )
        return self._retrying(lambda: self._attempt(request), retries=self.max_retries if retries is None else retries)

    # -- I/O --------------------------------------------------------------------------------------

    def _get(self, path: str, *, auth: bool, options: RequestOptions) -> httpx.Response:
        request = self._http.build_request(
            "GET",
            self.base_url + path,
            headers=self._request_headers(str(uuid.uuid4()), auth=auth),
            timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
        )
        return self._retrying(
            lambda: self._attempt(request), retries=self._retries(options.get("max_retries", NOT_GIVEN))
        )

    def _attempt(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self._http.send(request)
        except httpx.RequestError as exc:
            raise _AttemptFailed(transport_error(exc), cause=exc) from exc
        if not response.is_success:
            raise _failed_status(response)
        return response

    def _retrying(self, attempt: Callable[[], _T], *, retries: int, call: Call | None = None) -> _T:
        tries = 0
        while True:
            if call is not None:
                call.attempts += 1
            try:
                return attempt()
            except _AttemptFailed as failed:
                delay = self._give_up(failed, tries, retries)
                if delay is None:
                    raise failed.error from failed.cause
            _retry.sleep(delay)
            tries += 1

    def _settle_bid(self, call: Call, options: GenerateOptions | EmbedOptions) -> None:
        if options.get("bid") == "auto" and call.bid is None:
            info = self.info(
                timeout=options.get("timeout", NOT_GIVEN), max_retries=options.get("max_retries", NOT_GIVEN)
            )
            call.bid = auto_bid(info, call.model, self._bid_cap(options))

    def _build(self, call: Call, payload: dict[str, Any], options: GenerateOptions) -> httpx.Request:
        self._settle_bid(call, options)
        return self._http.build_request(
            "POST",
            self.base_url + _PATHS[call.kind],
            json=call.body(payload, options),
            headers=self._request_headers(call.idempotency_key, auth=True),
            timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
        )

    def _complete(self, kind: Kind, payload: dict[str, Any], options: GenerateOptions) -> Generation:
        call = self._call(kind, False, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))
        try:
            request = self._build(call, payload, options)
            response = self._retrying(lambda: self._attempt(request), retries=retries, call=call)
            generation = call.generation(response)
        except BaseException as exc:
            self.usage.add(call.failure(exc))
            raise
        self.usage.add(call.record(generation))
        return generation

    def _stream(self, kind: Kind, payload: dict[str, Any], options: GenerateOptions) -> Stream:
        call = self._call(kind, True, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))

        def open_stream() -> tuple[httpx.Response, Iterator[bytes]]:
            call.start_clock()
            request = self._build(call, payload, options)
            return self._retrying(lambda: self._open(request), retries=retries, call=call)

        return Stream(call, self.usage, open_stream)

    def _open(self, request: httpx.Request) -> tuple[httpx.Response, Iterator[bytes]]:
        """One attempt at a stream, up to its first byte: until then a failure may be retried."""
        response: httpx.Response | None = None
        try:
            response = self._http.send(request, stream=True)
            if not response.is_success:
                response.read()
                raise _failed_status(response)
            chunks = response.iter_bytes()
            first = next(chunks, b"")
        except httpx.RequestError as exc:
            if response is not None:
                response.close()
            raise _AttemptFailed(transport_error(exc), cause=exc) from exc
        except BaseException:
            if response is not None:
                response.close()
            raise
        if not first:
            response.close()
            raise _AttemptFailed(_empty_stream(request))
        return response, itertools.chain([first], chunks)


class AsyncClient(_BaseClient):
    """The asynchronous twin of `Client`: the same calls, awaited; streams are iterated with `async for`.

    Like any httpx async client it belongs to the event loop it is first used in.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_bid: float | None = None,
        retry_policy: RetryPolicy | None = None,
        usage: UsageBook | None = None,
        usage_log: str | os.PathLike[str] | NotGiven | None = NOT_GIVEN,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            url=url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            max_bid=max_bid,
            retry_policy=retry_policy,
            usage=usage,
            usage_log=usage_log,
            headers=headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=self.timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
        """Complete `prompt` (a raw text completion, `/v1/completions`)."""
        return await self._complete("generate", {"prompt": prompt}, options)

    async def chat(
        self, messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Generation:
        """Answer a chat (`/v1/chat/completions`); a plain string is one user message, `system` is prepended."""
        return await self._complete("chat", {"messages": chat_messages(messages, system)}, options)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> AsyncStream:
        """`generate`, streamed: `async for` the text pieces, then read `.result`."""
        return self._stream("generate", {"prompt": prompt}, options)

    def stream_chat(
        self, messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncStream:
        """`chat`, streamed: `async for` the text pieces, then read `.result`."""
        return self._stream("chat", {"messages": chat_messages(messages, system)}, options)

    async def embed(self, input: EmbeddingInput, **options: Unpack[EmbedOptions]) -> Embeddings:
        """Embed `input` with the model (`/v1/embeddings`): a text, texts, or token-id lists; one vector each.

        Priced per input token like a prompt, queued and retried like any call, and recorded in `usage`.
        """
        call = self._call("embed", False, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))
        try:
            await self._settle_bid(call, options)
            request = self._http.build_request(
                "POST",
                self.base_url + _PATHS["embed"],
                json=call.embed_body(input, options),
                headers=self._request_headers(call.idempotency_key, auth=True),
                timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
            )
            response = await self._retrying(lambda: self._attempt(request), retries=retries, call=call)
            result = call.embeddings(response)
        except BaseException as exc:
            self.usage.add(call.failure(exc))
            raise
        self.usage.add(call.embedding_record(result))
        return result

    # -- the router's other routes ------------------------------------------------------------------

    async def models(self, **options: Unpack[RequestOptions]) -> list[Model]:
        """The models the herd serves, with their fees."""
        body = _json(await self._get("/v1/models", auth=True, options=options))
        data = body.get("data") if isinstance(body, dict) else None
        return [Model.model_validate(m) for m in data] if isinstance(data, list) else []

    async def info(self, **options: Unpack[RequestOptions]) -> Info:
        """Fees, queue lengths and the last multiplier (`GET /v1/info`, no key needed)."""
        return Info.model_validate(_json(await self._get("/v1/info", auth=False, options=options)))

    async def account(self, **options: Unpack[RequestOptions]) -> Account:
        """This key's account: balance, held, spent and deposited credits, and the key (`.key`)."""
        return Account.model_validate(_json(await self._get("/v1/account", auth=True, options=options)))

    async def key(self, **options: Unpack[RequestOptions]) -> ApiKeyInfo:
        """This API key (`GET /v1/key`): its name, limits, spend against its caps, use of its rate limits."""
        return ApiKeyInfo.model_validate(_json(await self._get("/v1/key", auth=True, options=options)))

    async def router_usage(
        self,
        limit: int = 100,
        *,
        since: float | str | None = None,
        user: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[RouterUsage]:
        """This account's requests as the router's ledger recorded them; see `Client.router_usage`."""
        records: list[RouterUsage] = []
        before: int | None = None
        while len(records) < limit:
            path = _usage_path(min(1000, limit - len(records)), before, since, user)
            page = _json(await self._get(path, auth=True, options=options))
            records += _usage_page(page)
            before = page.get("next_before") if isinstance(page, dict) and page.get("has_more") else None
            if before is None:
                break
        return records

    # -- batches ----------------------------------------------------------------------------------

    async def submit_batch(
        self,
        requests: Iterable[str | Messages | Mapping[str, Any]],
        *,
        endpoint: Endpoint = "/v1/chat/completions",
        model: str | None = None,
        system: str | None = None,
        metadata: Mapping[str, str] | None = None,
        **body: Any,
    ) -> AsyncBatch:
        """`Client.submit_batch`, awaited."""
        content, _count = batch_file(requests, endpoint=endpoint, model=model or self.model, system=system, body=body)
        upload = await self._send(
            "POST", "/v1/files", files={"file": ("batch.jsonl", content)}, data={"purpose": "batch"}
        )
        made = await self._send(
            "POST", "/v1/batches", json=_new_batch(_json(upload)["id"], endpoint, metadata), retries=0
        )
        return AsyncBatch(self, BatchInfo.model_validate(_json(made)))

    async def batch(self, batch_id: str) -> AsyncBatch:
        """The batch `batch_id` (one of this key's account), as it is now."""
        return AsyncBatch(self, await self._batch_info(batch_id))

    async def _batch_info(self, batch_id: str) -> BatchInfo:
        return BatchInfo.model_validate(_json(await self._send("GET", f"/v1/batches/{quote(batch_id, safe='')}")))

    async def _cancel_batch(self, batch_id: str) -> BatchInfo:
        answer = await self._send("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel")
        return BatchInfo.model_validate(_json(answer))

    async def _file_text(self, file_id: str) -> str:
        return (await self._send("GET", f"/v1/files/{quote(file_id, safe='')}/content")).text

    async def _send(self, method: str, path: str, *, retries: int | None = None, **content: Any) -> httpx.Response:
        request = self._http.build_request(
            method, self.base_url + path, headers=self._request_headers(str(uuid.uuid4()), auth=True), **content
        )
        return await self._retrying(
            lambda: self._attempt(request), retries=self.max_retries if retries is None else retries
        )

    # -- I/O --------------------------------------------------------------------------------------

    async def _get(self, path: str, *, auth: bool, options: RequestOptions) -> httpx.Response:
        request = self._http.build_request(
            "GET",
            self.base_url + path,
            headers=self._request_headers(str(uuid.uuid4()), auth=auth),
            timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
        )
        retries = self._retries(options.get("max_retries", NOT_GIVEN))
        return await self._retrying(lambda: self._attempt(request), retries=retries)

    async def _attempt(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._http.send(request)
        except httpx.RequestError as exc:
            raise _AttemptFailed(transport_error(exc), cause=exc) from exc
        if not response.is_success:
            raise _failed_status(response)
        return response

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]], *, retries: int, call: Call | None = None) -> _T:
        tries = 0
        while True:
            if call is not None:
                call.attempts += 1
            try:
                return await attempt()
            except _AttemptFailed as failed:
                delay = self._give_up(failed, tries, retries)
                if delay is None:
                    raise failed.error from failed.cause
            await _retry.asleep(delay)
            tries += 1

    async def _settle_bid(self, call: Call, options: GenerateOptions | EmbedOptions) -> None:
        if options.get("bid") == "auto" and call.bid is None:
            info = await self.info(
                timeout=options.get("timeout", NOT_GIVEN), max_retries=options.get("max_retries", NOT_GIVEN)
            )
            call.bid = auto_bid(info, call.model, self._bid_cap(options))

    async def _build(self, call: Call, payload: dict[str, Any], options: GenerateOptions) -> httpx.Request:
        await self._settle_bid(call, options)
        return self._http.build_request(
            "POST",
            self.base_url + _PATHS[call.kind],
            json=call.body(payload, options),
            headers=self._request_headers(call.idempotency_key, auth=True),
            timeout=self._timeout(options.get("timeout", NOT_GIVEN)),
        )

    async def _complete(self, kind: Kind, payload: dict[str, Any], options: GenerateOptions) -> Generation:
        call = self._call(kind, False, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))
        try:
            request = await self._build(call, payload, options)
            response = await self._retrying(lambda: self._attempt(request), retries=retries, call=call)
            generation = call.generation(response)
        except BaseException as exc:
            self.usage.add(call.failure(exc))
            raise
        self.usage.add(call.record(generation))
        return generation

    def _stream(self, kind: Kind, payload: dict[str, Any], options: GenerateOptions) -> AsyncStream:
        call = self._call(kind, True, options)
        retries = self._retries(options.get("max_retries", NOT_GIVEN))

        async def open_stream() -> tuple[httpx.Response, AsyncIterator[bytes]]:
            call.start_clock()
            request = await self._build(call, payload, options)
            return await self._retrying(lambda: self._open(request), retries=retries, call=call)

        return AsyncStream(call, self.usage, open_stream)

    async def _open(self, request: httpx.Request) -> tuple[httpx.Response, AsyncIterator[bytes]]:
        """One attempt at a stream, up to its first byte: until then a failure may be retried."""
        response: httpx.Response | None = None
        try:
            response = await self._http.send(request, stream=True)
            if not response.is_success:
                await response.aread()
                raise _failed_status(response)
            chunks = response.aiter_bytes()
            first = await anext(chunks, b"")
        except httpx.RequestError as exc:
            if response is not None:
                await response.aclose()
            raise _AttemptFailed(transport_error(exc), cause=exc) from exc
        except BaseException:
            if response is not None:
                await response.aclose()
            raise
        if not first:
            await response.aclose()
            raise _AttemptFailed(_empty_stream(request))
        return response, _prepend(first, chunks)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _empty_stream(request: httpx.Request) -> APIError:
    return APIConnectionError("the router closed the stream before sending anything", request=request)


def _usage_path(limit: int, before: int | None, since: float | str | None, user: str | None) -> str:
    query = {"limit": str(limit)}
    if before is not None:
        query["before"] = str(before)
    if since is not None:
        query["since"] = str(since)
    if user is not None:
        query["user"] = user
    return "/v1/account/usage?" + urlencode(query)


def _usage_page(page: object) -> list[RouterUsage]:
    data = page.get("data") if isinstance(page, dict) else None
    return [RouterUsage.model_validate(r) for r in data] if isinstance(data, list) else []
