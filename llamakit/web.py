"""aiohttp pieces shared by the node and the router: OpenAI-shaped errors, bearer checks and SSE writing."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from llamakit import jsontext
from llamakit.wire.errors import ApiError, error_body

__all__ = [
    "REFUSAL",
    "SseWriter",
    "bearer_token",
    "error_middleware_for",
    "json_response",
    "request_id_header",
    "require_bearer",
    "secrets_equal",
]

log = logging.getLogger(__name__)

# Set on every error response by the middleware of `error_middleware_for`: (HTTP status, error code or type),
# for counting refusals.
REFUSAL = "llamakit.refusal"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=jsontext.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_middleware_for(translate: Callable[[BaseException], ApiError | None] | None = None) -> Middleware:
    """An error middleware that turns every error into an OpenAI-shaped JSON body: the client never sees an HTML
    page or a bare 500. `translate` gives the ApiError a client sees for an app's own exceptions (the router's
    `errors.http_error`, the node's `routes.http_error`); one it gives None for is a bug, answered 500 and logged."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            try:
                return await handler(request)
            except (ApiError, web.HTTPException, ConnectionResetError):
                raise
            except Exception as exc:
                answer = translate(exc) if translate is not None else None
                if answer is None:
                    raise
                raise answer from exc
        except ApiError as exc:
            response = json_response(exc.body(), status=exc.status, headers=exc.headers)
            response[REFUSAL] = (exc.status, exc.code or exc.type)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.text or exc.reason
            if exc.status == 413:
                message = f"the request body is too large (the limit is {request.app._client_max_size} bytes)"
            elif exc.status == 404:
                message = f"there is no route {request.method} {request.path}"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            kind = _HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error")
            body = error_body(message, type=kind)
            response = json_response(
                body, status=exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"}
            )
            response[REFUSAL] = (exc.status, kind)
            return response
        except ConnectionResetError:
            # The client is gone (its connection closed while we wrote): nothing to tell it, and no error of ours.
            # A response returned here is dropped quietly by aiohttp; a raised one would be logged as a failure.
            log.debug("%s %s: the client went away", request.method, request.path)
            return web.Response(status=499)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return json_response(
                error_body("internal server error; the request was not completed", type="server_error"),
                status=500,
            )

    return error_middleware


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """`x-request-id` on every response, as OpenAI's API sends it (the openai client's `_request_id`): the
    paid request's id where there is one (`X-Llamakit-Request-Id`, the id of its usage record), else a new one."""
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = response.headers.get("X-Llamakit-Request-Id") or f"req-{uuid.uuid4().hex}"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def secrets_equal(given: str, expected: str) -> bool:
    """Compare secrets in constant time, so response timing does not leak how much of a key was right."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def require_bearer(request: web.Request, expected: str, *, what: str) -> None:
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            f"missing credentials: send 'Authorization: Bearer <{what}>'",
            type="authentication_error",
            code="missing_credentials",
        )
    if not secrets_equal(token, expected):
        raise ApiError(401, f"the {what} is not valid", type="authentication_error", code="invalid_credentials")


class SseWriter:
    """Server-Sent Events on an aiohttp response: one `data:` event per chunk, `[DONE]` to end."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self._pending: list[bytes] = []  # events sent with flush=False, written with the next flush

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str] | None = None) -> SseWriter:
        """Send the status and headers of an event stream at once (the first event may be a while coming)."""
        return await cls._open(web.StreamResponse, request, headers)

    @classmethod
    async def relay(cls, request: web.Request, headers: dict[str, str] | None = None) -> SseWriter:
        """`open` for events that are at hand: the status and headers leave with the first of them, in one write."""
        return await cls._open(_HeadersWithBody, request, headers)

    @classmethod
    async def _open(
        cls, kind: type[web.StreamResponse], request: web.Request, headers: dict[str, str] | None
    ) -> SseWriter:
        response = kind(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",  # else text/* reads as Latin-1 (RFC 2046)
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **(headers or {}),
            }
        )
        await response.prepare(request)
        return cls(response)

    async def send(self, data: dict[str, Any], *, flush: bool = True) -> None:
        """Send one event; with `flush=False` it waits for the next flush, to go out in one write with others."""
        self._pending.append(b"data: " + jsontext.dumps(data) + b"\n\n")
        if flush:
            await self.flush()

    async def send_raw(self, data: bytes, *, flush: bool = True) -> None:
        """`send` for an event that is JSON text already (a node's chunk passed on as it came)."""
        self._pending.append(b"data: " + data + b"\n\n")
        if flush:
            await self.flush()

    def queue_raw(self, data: bytes) -> None:
        """`send_raw(data, flush=False)` without a coroutine: for a relay's many chunks between two flushes."""
        self._pending.append(b"data: " + data + b"\n\n")

    async def flush(self) -> None:
        if self._pending:
            events = b"".join(self._pending)
            self._pending.clear()
            await self.response.write(events)

    async def comment(self, text: str) -> None:
        """An SSE comment line: clients ignore it; it keeps a quiet stream's connection and timeouts alive."""
        self._pending.append(b": " + text.encode() + b"\n\n")
        await self.flush()

    async def done(self) -> None:
        """`[DONE]` and the end of the response, in one write with the events still waiting for a flush."""
        self._pending.append(b"data: [DONE]\n\n")
        events = b"".join(self._pending)
        self._pending.clear()
        await self.response.write_eof(events)


class _HeadersWithBody(web.StreamResponse):
    """A stream whose status line and headers wait for its first write, as a whole `web.Response`'s do."""

    _send_headers_immediately = False  # aiohttp ≥ 3.10; before, the headers go at once (one write more)
