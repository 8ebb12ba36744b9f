"""`serve(app)`: the router's and the node's server, where slow clients cannot hold the door: a request must
arrive within a bounded time, and the connections open at once are bounded below the process's limit of open
files.

- The head: from connecting (or, on a kept-alive connection, from its next request's first byte) a client has
  `RequestLimits.header_timeout` seconds to send the request line and headers, or it gets 408 and is closed
  (closed without an answer when it sent nothing at all).
- The body: then `RequestLimits.body_seconds(size)`, where size is its Content-Length (the largest body
  allowed when it is chunked): 408 and closed past it (`deadline_middleware`, which sets the deadline on the
  body's stream; the handler reads it as before).
- The count: at most `max_connections` open. One more first closes the oldest connection that is still
  sending its head, else the oldest idle kept-alive one; when every one is serving a request, the new one is
  answered 503 and closed. Either way the process keeps file descriptors for its own work (ledger, nodes).

aiohttp bounds the size of a head (8190-byte lines and fields, 128 headers) and of a body (client_max_size), and
closes an idle kept-alive connection after its keepalive_timeout, but sets no deadline on a request being
sent: a client sending a byte a second held a connection for as long as it liked. `ConnectionGuard` stands
between the listening socket and aiohttp's protocol, one `_Connection` per socket; `serve` runs aiohttp's
AppRunner behind it (as `web.run_app` does behind its own sites).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from typing import Final, cast

from aiohttp import StreamReader, web
from aiohttp.typedefs import Middleware
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

from llamakit import jsontext
from llamakit.config import Flag
from llamakit.web import REFUSAL, json_response
from llamakit.wire.errors import error_body

__all__ = [
    "CONNECTIONS",
    "SERVING_FLAGS",
    "BodyLate",
    "ConnectionCollector",
    "ConnectionGuard",
    "RequestLimits",
    "ServingSettings",
    "deadline_middleware",
    "open_files_limit",
    "serve",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """How long a client may take to send a request, and how many connections may be open at once.

    `header_timeout`: seconds for the request line and headers; `min_upload_rate`: bytes per second a body
    must at least arrive at; `max_connections`: None for the default (`open_files_limit()` less a tenth, at
    least 64, kept for the process's own files and sockets); `keepalive`: seconds an idle kept-alive
    connection stays open."""

    header_timeout: float = 10.0
    min_upload_rate: int = 64 * 1024
    max_connections: int | None = None
    keepalive: float = 75.0

    def body_seconds(self, size: int) -> float:
        """Seconds a body of `size` bytes may take to arrive once the head has: as long as the head was given,
        plus its size at `min_upload_rate`."""
        return self.header_timeout + size / self.min_upload_rate

    def connections(self) -> int:
        """The most connections open at once (`max_connections`, or the default)."""
        if self.max_connections is not None:
            return self.max_connections
        limit = open_files_limit()
        return max(16, limit - max(64, limit // 10))


class ServingSettings(BaseModel):
    """The settings the router and the node share as servers: the largest body, how long a client may take to
    send its request, and the connections open at once (`request_limits`)."""

    model_config = ConfigDict(frozen=True)

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")
    request_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds a client has to send a request's line and headers (408 after); its body gets as long "
        "again plus its size at --min-upload-rate",
    )
    min_upload_rate: int = Field(64 * 1024, ge=1, description="slowest rate a request body may arrive at, bytes/s")
    max_connections: int | None = Field(
        None, ge=1, description="client connections open at once (default: the limit of open files less a tenth)"
    )

    @property
    def request_limits(self) -> RequestLimits:
        """What a client may take to send a request, and the connections open at once."""
        return RequestLimits(
            header_timeout=self.request_timeout,
            min_upload_rate=self.min_upload_rate,
            max_connections=self.max_connections,
        )


# The flags of ServingSettings' fields (max_body_bytes has none), for the router's and the node's flag lists.
SERVING_FLAGS = [
    Flag("request_timeout", "--request-timeout", "LLAMAKIT_REQUEST_TIMEOUT", float),
    Flag("min_upload_rate", "--min-upload-rate", "LLAMAKIT_MIN_UPLOAD_RATE", int),
    Flag("max_connections", "--max-connections", "LLAMAKIT_MAX_CONNECTIONS", int),
]


def open_files_limit(*, raise_to_hard: bool = False) -> int:
    """The process's limit of open files (RLIMIT_NOFILE's soft limit); with `raise_to_hard`, first raised to
    the hard limit where it is lower, as Go's runtime does at start (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_to_hard and soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # not allowed here: keep the soft limit
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


# Seconds a connection closed with an answer stays open for reading (and discarding) after it: see `close`.
LINGER_SECONDS: Final = 1.0


class _Phase(Enum):
    HEAD = "head"  # waiting for a request's line and headers (its timer runs)
    BUSY = "busy"  # a request is being read or answered
    IDLE = "idle"  # kept alive between two requests (aiohttp's keepalive_timeout closes it)
    CLOSED = "closed"


def _answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, with an OpenAI-shaped error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = jsontext.dumps(error_body(message, type=kind, code=code))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The protocol factory of a listening socket (`loop.create_server(guard.protocol, …)`) that puts a
    `_Connection` with deadlines in front of each connection's aiohttp protocol, from `server` (the runner's
    `web.Server`, given by `serve`), and keeps their count under `limits.connections()`.

    Counts, for /metrics: `open`; `head_timeouts` and `body_timeouts` (answered 408); `silent` (closed after
    sending nothing); `evicted` (closed to make room at the limit); `refused` (answered 503 at the limit)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.max_connections = limits.connections()
        self.server: Callable[[], asyncio.Protocol] | None = None
        self.open = 0
        self.head_timeouts = 0
        self.body_timeouts = 0
        self.silent = 0
        self.evicted = 0
        self.refused = 0
        # Connections that may be closed to make room, oldest first: sending a head, then idle.
        self._heads: dict[_Connection, None] = {}
        self._idle: dict[_Connection, None] = {}

    def protocol(self) -> asyncio.Protocol:
        if self.server is None:
            raise RuntimeError("ConnectionGuard.server is not set")
        return _Connection(self, self.server)

    def _admit(self) -> bool:
        """Room for one more connection: there is, or the oldest one that can be spared was closed for it."""
        if self.open < self.max_connections:
            return True
        for waiting in (self._heads, self._idle):
            for conn in waiting:
                if conn.can_close():
                    self.evicted += 1
                    # At once, without lingering: the point is to free its descriptor now.
                    conn.close(_evicted(self.max_connections) if conn.phase is _Phase.HEAD and conn.sent else None)
                    return True
        self.refused += 1
        return False

    def _listed(self, conn: _Connection, phase: _Phase) -> None:
        self._heads.pop(conn, None)
        self._idle.pop(conn, None)
        if phase is _Phase.HEAD:
            self._heads[conn] = None
        elif phase is _Phase.IDLE:
            self._idle[conn] = None


_TOO_MANY: Final = _answer(
    503,
    "Service Unavailable",
    "this server has as many connections open as it allows, each serving a request; try again shortly",
    "too_many_connections",
)


class _Connection(asyncio.Protocol):
    """One client connection: the deadline of its request's head, then aiohttp's protocol for the rest."""

    __slots__ = ("_edge", "_factory", "_guard", "_inner", "_timer", "phase", "sent", "transport")

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._edge = b""  # the last bytes of the head so far, for an end of head split between two reads
        self.transport: asyncio.Transport | None = None
        self.phase = _Phase.CLOSED
        self.sent = False  # some of the head has arrived

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        if not self._guard._admit():
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._guard.open += 1
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._inner is None or self.phase is _Phase.CLOSED:
            return  # answered and closing: the rest of what it sends is not read
        if self.phase is _Phase.IDLE:
            self._await_head()
        if self.phase is _Phase.HEAD:
            self.sent = True
            edge = self._edge + data[:3]
            if b"\r\n\r\n" in data or b"\n\n" in data or b"\r\n\r\n" in edge or b"\n\n" in edge:
                self.request_started()  # the head is whole: aiohttp parses it now, the body has its own deadline
            else:
                self._edge = (self._edge + data)[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._inner is not None:
            self.phase = _Phase.CLOSED
            self._guard._listed(self, _Phase.CLOSED)
            self._guard.open -= 1
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the request's phases ------------------------------------------------------------------------------

    def request_started(self) -> None:
        """The head has arrived (seen here, or by the deadline middleware): its deadline is over."""
        if self.phase is _Phase.CLOSED:
            return
        self._stop_timer()
        self._set(_Phase.BUSY)

    def request_done(self) -> None:
        """The handler returned: the connection is idle until its next request's first byte."""
        if self.phase is _Phase.BUSY:
            self._set(_Phase.IDLE)

    def can_close(self) -> bool:
        """Whether closing it loses nothing: sending a head, or idle with its last answer written."""
        if self.phase is _Phase.HEAD:
            return True
        return self.phase is _Phase.IDLE and self.transport is not None and self.transport.get_write_buffer_size() == 0

    def close(self, answer: bytes | None = None, *, linger: bool = False) -> None:
        """Close it, sending `answer` first. With `linger`, the answer is followed by the end of this side of
        the connection, and the socket is closed LINGER_SECONDS later: closed at once while the client still
        sends, it would be reset, and a reset can lose the answer before the client reads it."""
        if self.phase is _Phase.CLOSED or self.transport is None:
            return
        self._stop_timer()
        self._set(_Phase.CLOSED)
        transport = self.transport
        if answer is not None:
            transport.write(answer)
        if linger and transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def _await_head(self) -> None:
        self.sent = False
        self._edge = b""
        self._set(_Phase.HEAD)
        self._stop_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._timer = None
        if self.phase is not _Phase.HEAD:
            return
        if self.sent:
            self._guard.head_timeouts += 1
            self.close(_head_timeout(self._guard.limits), linger=True)
        else:
            self._guard.silent += 1
            self.close()

    def _set(self, phase: _Phase) -> None:
        self.phase = phase
        self._guard._listed(self, phase)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _head_timeout(limits: RequestLimits) -> bytes:
    return _answer(
        408,
        "Request Timeout",
        f"the request's line and headers did not arrive within {limits.header_timeout:g} s; send the whole "
        "request at once",
        "request_timeout",
    )


def _evicted(limit: int) -> bytes:
    return _answer(
        408,
        "Request Timeout",
        f"closed to make room: this server has as many connections open as it allows ({limit}), and this "
        "request's line and headers had not all arrived; send the whole request at once",
        "request_timeout",
    )


def _connection_of(request: web.Request) -> _Connection | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, _Connection) else None


# The guard of the server an application runs under (set by `serve`; absent under a test server).
CONNECTIONS = web.AppKey("connections", ConnectionGuard)


class BodyLate(TimeoutError):
    """Raised by a request's body stream when the body did not arrive in time (see `deadline_middleware`). A
    TimeoutError, so that aiohttp's lingering read of a body nobody read ends quietly on it too."""


def deadline_middleware(limits: RequestLimits) -> Middleware:
    """Gives a request's body `limits.body_seconds` of its size (its Content-Length, or the largest body the app
    allows) to arrive once the head has: past it, the body's stream raises BodyLate in whoever reads it, and the
    client gets 408 `request_timeout` and is closed. Nothing is read here: a handler refuses what it refuses
    (401, 413) before it reads the body, as without this middleware. Marks each request's start and end for the
    connection's guard, if any. Place it inside the error middleware: its 408 is a response marked as a refusal."""

    @web.middleware
    async def deadline(request: web.Request, handler: Callable[[web.Request], object]) -> web.StreamResponse:
        conn = _connection_of(request)
        if conn is not None:
            conn.request_started()
        timer: asyncio.TimerHandle | None = None
        seconds = 0.0
        if request.body_exists and not request.content.is_eof():
            size = request.content_length
            seconds = limits.body_seconds(
                request.client_max_size if size is None else min(size, request.client_max_size)
            )
            timer = asyncio.get_running_loop().call_later(seconds, _too_late, request.content, seconds)
        try:
            response = await handler(request)  # type: ignore[misc]
            assert isinstance(response, web.StreamResponse)
            return response
        except BodyLate:
            return await _body_late(request, conn, seconds)
        finally:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn.request_done()

    return deadline


def _too_late(body: StreamReader, seconds: float) -> None:
    if not body.is_eof():  # not all of it has arrived (read or not)
        body.set_exception(BodyLate(f"the request body did not arrive within {seconds:.1f} s"))


async def _body_late(request: web.Request, conn: _Connection | None, seconds: float) -> web.StreamResponse:
    """Answer 408 (unless an answer has begun) and close: the rest of the body is never read."""
    if conn is not None:
        conn._guard.body_timeouts += 1
    if request.transport is None:
        raise BodyLate("the client went away")  # nobody to answer
    if request.writer.output_size:  # an answer has begun (no handler here reads its body after that)
        if conn is not None:
            conn.close(linger=True)
        raise BodyLate("the request body did not arrive in time after its answer had begun")
    message = (
        f"the request body did not arrive within {seconds:.1f} s (the time allowed for its headers plus its size "
        "at the slowest upload rate allowed); send it faster, or a smaller one"
    )
    response = json_response(error_body(message, type="invalid_request_error", code="request_timeout"), status=408)
    response.force_close()
    response[REFUSAL] = (408, "request_timeout")
    await response.prepare(request)
    await response.write_eof()
    if conn is not None:
        conn.close(linger=True)
    elif request.transport is not None:
        request.transport.close()
    return response


def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    program: str,
    started: str,
    limits: RequestLimits | None = None,
    refusals: tuple[type[BaseException], ...] = (),
    access_log: logging.Logger | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Run `app` on host:port until SIGINT or SIGTERM, behind a `ConnectionGuard` with `limits`, printing
    `started` to stderr once it listens (after the start-up hooks ran: a server that could not start never
    claims to be on). A port in use or an address not this host's (OSError: asyncio's message says which), or
    one of `refusals` raised while starting, is one line, `<program>: error: …`, and exit status 1, not a
    traceback. The soft limit of open files is raised to the hard one first."""
    failures: tuple[type[BaseException], ...] = (OSError, *refusals)
    limits = limits or RequestLimits()
    open_files_limit(raise_to_hard=True)
    loop = loop or asyncio.new_event_loop()
    main = loop.create_task(_serve(app, host, port, started, limits, access_log))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except failures as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        # As web.run_app ends: stop the server (its clean-up runs), then whatever tasks are left, then the loop.
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(
    app: web.Application, host: str, port: int, started: str, limits: RequestLimits, access_log: logging.Logger | None
) -> None:
    guard = ConnectionGuard(limits)
    app[CONNECTIONS] = guard
    # handle_signals: SIGINT and SIGTERM raise GracefulExit, which `serve` catches to stop as run_app does.
    runner = web.AppRunner(app, handle_signals=True, access_log=access_log, keepalive_timeout=limits.keepalive)
    await runner.setup()
    try:
        assert runner.server is not None
        guard.server = runner.server
        # A backlog as deep as nginx's: a burst of clients waits in the kernel's queue, not for SYN retries.
        listening = await asyncio.get_running_loop().create_server(guard.protocol, host, port, backlog=511)
        print(started, file=sys.stderr)
        try:
            await asyncio.Future()  # until cancelled by `serve`
        finally:
            listening.close()  # accept no more; the runner's clean-up lets the requests running finish
    finally:
        await runner.cleanup()


class ConnectionCollector:
    """Prometheus series of a `ConnectionGuard`, named `<prefix>_connections…`: open now, the limit, and those
    the guard closed by reason (head_timeout, body_timeout: answered 408; silent: sent nothing; evicted: closed
    to make room at the limit; refused: answered 503 at the limit)."""

    def __init__(self, guard: ConnectionGuard, prefix: str) -> None:
        self.guard, self.prefix = guard, prefix

    def collect(self) -> Iterator[Metric]:
        guard, prefix = self.guard, self.prefix
        yield GaugeMetricFamily(f"{prefix}_connections", "Client connections open now.", value=guard.open)
        yield GaugeMetricFamily(
            f"{prefix}_connection_limit", "Client connections allowed open at once.", value=guard.max_connections
        )
        closed = CounterMetricFamily(
            f"{prefix}_connections_closed",
            "Client connections closed by the server's guard, by reason: head_timeout and body_timeout (408), "
            "silent (sent nothing), evicted (made room at the limit), refused (503 at the limit).",
            labels=["reason"],
        )
        for reason, count in (
            ("head_timeout", guard.head_timeouts),
            ("body_timeout", guard.body_timeouts),
            ("silent", guard.silent),
            ("evicted", guard.evicted),
            ("refused", guard.refused),
        ):
            closed.add_metric([reason], count)
        yield closed
