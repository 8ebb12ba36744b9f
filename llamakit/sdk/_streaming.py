"""Streams of text pieces, sync and async, that end as a `Generation` (`.result`) and one usage record.

A stream sends nothing until it is first iterated, so `for piece in client.stream(...)` and
`async for piece in client.stream(...)` need no extra call. Its request is retried only until the first
byte of the answer arrives; after that a failure raises `StreamInterruptedError`, since what arrived
was already paid for.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from types import TracebackType

import httpx

from llamakit.sdk._calls import Call, SseDecoder, StreamState
from llamakit.sdk._exceptions import StreamInterruptedError
from llamakit.sdk._models import Generation
from llamakit.sdk._usage import UsageBook

__all__ = ["AsyncStream", "Stream"]

SyncOpener = Callable[[], tuple[httpx.Response, Iterator[bytes]]]
AsyncOpener = Callable[[], Awaitable[tuple[httpx.Response, AsyncIterator[bytes]]]]

_NOT_DONE = "the stream has no result: iterate it to the end (or close it) first; a stream that failed has none"


def _broken(state: StreamState, exc: httpx.RequestError) -> StreamInterruptedError:
    return StreamInterruptedError(
        f"the stream broke after it had started ({exc!r}); it is not retried, since what arrived was paid for",
        text=state.text,
        request=state.response.request,
        request_id=state.response.headers.get("X-Llamakit-Request-Id"),
    )


def _unfinished(state: StreamState) -> StreamInterruptedError:
    return StreamInterruptedError(
        "the router ended the stream without its final [DONE] event",
        text=state.text,
        request=state.response.request,
        request_id=state.response.headers.get("X-Llamakit-Request-Id"),
    )


class _StreamBase:
    def __init__(self, call: Call, book: UsageBook) -> None:
        self._call = call
        self._book = book
        self._state: StreamState | None = None
        self._result: Generation | None = None

    @property
    def result(self) -> Generation:
        """The whole generation with its usage and cost, once the stream has ended or been closed.

        After an early close it holds the text that arrived, with no usage: the router charges what it
        delivered, which the client is not told.
        """
        if self._result is None:
            raise RuntimeError(_NOT_DONE)
        return self._result

    @property
    def text(self) -> str:
        """The text so far."""
        return self._state.text if self._state is not None else ""

    @property
    def idempotency_key(self) -> str:
        return self._call.idempotency_key

    def _finish(self, state: StreamState) -> None:
        self._result = state.generation()
        self._book.add(self._call.record(self._result))

    def _cut(self, response: httpx.Response | None) -> None:
        if self._state is not None:
            self._result = self._state.generation().model_copy(
                update={"usage": None, "cost": None, "cost_credits": None}
            )
        self._book.add(self._call.failure(GeneratorExit(), response=response, cut=True))

    def _failed(self, exc: BaseException, response: httpx.Response | None) -> None:
        self._book.add(self._call.failure(exc, response=response))


class Stream(_StreamBase):
    """Text pieces as the model generates them: `for piece in stream: …`, then `stream.result`.

    Use it as a context manager (`with client.stream(...) as s:`) when you may stop early, so the
    connection is closed (which stops the generation on the node) at once rather than when collected.
    """

    def __init__(self, call: Call, book: UsageBook, opener: SyncOpener) -> None:
        super().__init__(call, book)
        self._opener = opener
        self._pieces: Generator[str, None, None] | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            self._pieces = self._generate()
        return next(self._pieces)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading; a stream that had started is recorded as "cut"."""
        if self._pieces is not None:
            self._pieces.close()

    def _generate(self) -> Generator[str, None, None]:
        response: httpx.Response | None = None
        try:
            response, chunks = self._opener()
            state = self._state = StreamState(self._call, response)
            decoder = SseDecoder()
            try:
                for chunk in chunks:
                    for data in decoder.feed(chunk):
                        piece = state.feed(data)
                        if piece:
                            yield piece
                    if state.done:
                        break
            except httpx.RequestError as exc:
                raise _broken(state, exc) from exc
            if not state.done:
                raise _unfinished(state)
            self._finish(state)
        except GeneratorExit:
            self._cut(response)
            raise
        except BaseException as exc:
            self._failed(exc, response)
            raise
        finally:
            if response is not None:
                response.close()


class AsyncStream(_StreamBase):
    """The async twin of `Stream`: `async for piece in stream: …`, then `stream.result`.

    Use `async with` when you may stop early, so the connection closes at once.
    """

    def __init__(self, call: Call, book: UsageBook, opener: AsyncOpener) -> None:
        super().__init__(call, book)
        self._opener = opener
        self._pieces: AsyncGenerator[str, None] | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        if self._pieces is None:
            self._pieces = self._generate()
        return await self._pieces.__anext__()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading; a stream that had started is recorded as "cut"."""
        if self._pieces is not None:
            await self._pieces.aclose()

    async def _generate(self) -> AsyncGenerator[str, None]:
        response: httpx.Response | None = None
        try:
            response, chunks = await self._opener()
            state = self._state = StreamState(self._call, response)
            decoder = SseDecoder()
            try:
                async for chunk in chunks:
                    for data in decoder.feed(chunk):
                        piece = state.feed(data)
                        if piece:
                            yield piece
                    if state.done:
                        break
            except httpx.RequestError as exc:
                raise _broken(state, exc) from exc
            if not state.done:
                raise _unfinished(state)
            self._finish(state)
        except GeneratorExit:
            self._cut(response)
            raise
        except BaseException as exc:
            self._failed(exc, response)
            raise
        finally:
            if response is not None:
                await response.aclose()
