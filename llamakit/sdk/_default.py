"""The module-level functions (`llamakit.sdk.generate(...)` and friends) and the default client behind them.

The default client is made on first use from the environment or the `llamakit up` profile, or from
`configure(...)`. Async functions get one `AsyncClient` per event loop (an httpx async client cannot
outlive its loop); all of them share one `UsageBook`, so `usage_frame()` shows every module-level call.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Unpack

from llamakit.sdk._batches import AsyncBatch, Batch, Endpoint
from llamakit.sdk._calls import EmbedOptions, GenerateOptions, RequestOptions
from llamakit.sdk._client import AsyncClient, Client
from llamakit.sdk._config import resolve_usage_log
from llamakit.sdk._models import Account, ApiKeyInfo, Embeddings, Generation, Info, Model, RouterUsage
from llamakit.sdk._retry import DEFAULT_MAX_RETRIES, RetryPolicy
from llamakit.sdk._streaming import AsyncStream, Stream
from llamakit.sdk._types import NOT_GIVEN, EmbeddingInput, Messages, NotGiven, Timeout
from llamakit.sdk._usage import UsageBook, UsageRecord

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = [
    "account",
    "achat",
    "aembed",
    "agenerate",
    "astream",
    "astream_chat",
    "asubmit_batch",
    "chat",
    "configure",
    "default_client",
    "embed",
    "generate",
    "generate_many",
    "info",
    "key",
    "models",
    "router_usage",
    "stream",
    "stream_chat",
    "submit_batch",
    "usage_frame",
    "usage_records",
]


class _Defaults:
    """The default clients' settings and state, behind one lock (clients may be made from many threads)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings: dict[str, Any] = {}
        self.book: UsageBook | None = None
        self.client: Client | None = None
        self.async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def usage(self) -> UsageBook:
        with self.lock:
            if self.book is None:
                self.book = UsageBook(resolve_usage_log(NOT_GIVEN))
            return self.book

    def sync(self) -> Client:
        with self.lock:
            if self.client is None:
                self.client = Client(usage=self.usage(), **self.settings)
            return self.client

    def for_loop(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        with self.lock:
            client = self.async_clients.get(loop)
            if client is None:
                client = AsyncClient(usage=self.usage(), **self.settings)
                self.async_clients[loop] = client
            return client


_defaults = _Defaults()


def configure(
    *,
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    timeout: Timeout | NotGiven = NOT_GIVEN,
    max_retries: int = DEFAULT_MAX_RETRIES,
    max_bid: float | None = None,
    retry_policy: RetryPolicy | None = None,
    usage_log: str | os.PathLike[str] | NotGiven | None = NOT_GIVEN,
    headers: dict[str, str] | None = None,
) -> Client:
    """Set up the default client the module-level functions use, and return it.

    Not needed after `llamakit up` or with `LLAMAKIT_URL` / `LLAMAKIT_API_KEY` set. The usage records
    so far are kept, unless `usage_log` is given: then a fresh book writes to that file.
    """
    settings: dict[str, Any] = {
        "url": url,
        "api_key": api_key,
        "model": model,
        "timeout": timeout,
        "max_retries": max_retries,
        "max_bid": max_bid,
        "retry_policy": retry_policy,
        "headers": headers,
    }
    book = _defaults.usage() if isinstance(usage_log, NotGiven) else UsageBook(resolve_usage_log(usage_log))
    client = Client(usage=book, **settings)
    with _defaults.lock:
        old, _defaults.client = _defaults.client, client
        _defaults.settings, _defaults.book = settings, client.usage
        _defaults.async_clients = weakref.WeakKeyDictionary()
    if old is not None:
        old.close()
    return client


def default_client() -> Client:
    """The client the module-level functions use (made from the environment or the profile on first use)."""
    return _defaults.sync()


def generate(prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
    """Complete `prompt` on the default client. See `Client.generate`."""
    return _defaults.sync().generate(prompt, **options)


def chat(messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]) -> Generation:
    """Answer a chat on the default client. See `Client.chat`."""
    return _defaults.sync().chat(messages, system=system, **options)


def stream(prompt: str, **options: Unpack[GenerateOptions]) -> Stream:
    """Stream a completion on the default client: `for piece in stream(...)`, then `.result`."""
    return _defaults.sync().stream(prompt, **options)


def stream_chat(messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]) -> Stream:
    """Stream a chat answer on the default client."""
    return _defaults.sync().stream_chat(messages, system=system, **options)


async def agenerate(prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
    """`generate`, awaited, on this event loop's default async client."""
    return await _defaults.for_loop().generate(prompt, **options)


async def achat(messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]) -> Generation:
    """`chat`, awaited, on this event loop's default async client."""
    return await _defaults.for_loop().chat(messages, system=system, **options)


def astream(prompt: str, **options: Unpack[GenerateOptions]) -> AsyncStream:
    """`stream` for `async for`; call it inside a coroutine."""
    return _defaults.for_loop().stream(prompt, **options)


def astream_chat(messages: Messages, *, system: str | None = None, **options: Unpack[GenerateOptions]) -> AsyncStream:
    """`stream_chat` for `async for`; call it inside a coroutine."""
    return _defaults.for_loop().stream_chat(messages, system=system, **options)


def embed(input: EmbeddingInput, **options: Unpack[EmbedOptions]) -> Embeddings:
    """Embed a text, texts or token-id lists on the default client. See `Client.embed`."""
    return _defaults.sync().embed(input, **options)


async def aembed(input: EmbeddingInput, **options: Unpack[EmbedOptions]) -> Embeddings:
    """`embed`, awaited, on this event loop's default async client."""
    return await _defaults.for_loop().embed(input, **options)


def generate_many(
    prompts: Iterable[str | Messages],
    *,
    chat: bool = False,
    system: str | None = None,
    concurrency: int = 4,
    progress: bool = True,
    **options: Unpack[GenerateOptions],
) -> pd.DataFrame:
    """A batch on the default client, `concurrency` at a time, with a progress bar. See `Client.generate_many`."""
    return _defaults.sync().generate_many(
        prompts, chat=chat, system=system, concurrency=concurrency, progress=progress, **options
    )


def submit_batch(
    requests: Iterable[Messages | Mapping[str, Any]],
    *,
    endpoint: Endpoint = "/v1/chat/completions",
    model: str | None = None,
    system: str | None = None,
    metadata: Mapping[str, str] | None = None,
    **body: Any,
) -> Batch:
    """Run `requests` as a batch on the default client, at the router's batch discount. See `Client.submit_batch`."""
    return _defaults.sync().submit_batch(
        requests, endpoint=endpoint, model=model, system=system, metadata=metadata, **body
    )


async def asubmit_batch(
    requests: Iterable[Messages | Mapping[str, Any]],
    *,
    endpoint: Endpoint = "/v1/chat/completions",
    model: str | None = None,
    system: str | None = None,
    metadata: Mapping[str, str] | None = None,
    **body: Any,
) -> AsyncBatch:
    """`submit_batch`, awaited, on this event loop's default async client."""
    return await _defaults.for_loop().submit_batch(
        requests, endpoint=endpoint, model=model, system=system, metadata=metadata, **body
    )


def models(**options: Unpack[RequestOptions]) -> list[Model]:
    """The models the herd serves, with their fees."""
    return _defaults.sync().models(**options)


def info(**options: Unpack[RequestOptions]) -> Info:
    """The router's fees, queue lengths and last multiplier."""
    return _defaults.sync().info(**options)


def account(**options: Unpack[RequestOptions]) -> Account:
    """The default key's account: balance, held, spent, deposited."""
    return _defaults.sync().account(**options)


def key(**options: Unpack[RequestOptions]) -> ApiKeyInfo:
    """The default API key (`GET /v1/key`): its name, limits, spend against its caps, use of its rate limits."""
    return _defaults.sync().key(**options)


def router_usage(
    limit: int = 100,
    *,
    since: float | str | None = None,
    user: str | None = None,
    **options: Unpack[RequestOptions],
) -> list[RouterUsage]:
    """The default key's account's requests as the router's ledger recorded them, newest first, up to `limit`,
    from `since` (epoch seconds or ISO 8601) and for `user` when given. See `Client.router_usage`."""
    return _defaults.sync().router_usage(limit, since=since, user=user, **options)


def usage_records() -> list[UsageRecord]:
    """The module-level calls' usage records so far."""
    return _defaults.usage().records


def usage_frame() -> pd.DataFrame:
    """The module-level calls' usage records as a DataFrame (empty, with its columns, before any call)."""
    return _defaults.usage().frame()
