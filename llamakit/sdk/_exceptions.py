"""Every error the SDK raises, in one tree, so `except LlamakitError` catches them all:

    LlamakitError
    ├── ConfigurationError             no router URL or API key could be found
    └── APIError                       a call to the router went wrong
        ├── APIConnectionError         the router could not be reached, or the connection dropped  (retried)
        │   └── APITimeoutError        no answer within the timeout                                (retried)
        ├── APIResponseValidationError the router answered with something that is not its API
        ├── StreamInterruptedError     a stream failed after its first byte: never retried
        └── APIStatusError             the router answered with an error status (`.status_code`, `.code`)
            ├── BadRequestError        400  the request is invalid (a field, a bid, max_tokens too large)
            ├── AuthenticationError    401  no API key, or a wrong one
            ├── InsufficientFunds      402  the hold is not covered: `.needed` and `.balance` in credits
            │   └── SpendCapExceeded   402  past a spend cap of the key: `.cap`, `.period`, `.available`
            ├── PermissionDeniedError  403  e.g. a model the key may not use
            ├── NotFoundError          404  e.g. the model does not exist (the message lists those that do)
            ├── ConflictError          409  the same idempotency key is still being served          (retried)
            ├── RateLimitError         429  `.limit` names a key limit (rpm_limit …) when one was hit   (retried)
            │   └── QueueFullError     429  the model's bid queue is full                           (retried)
            └── InternalServerError    ≥500 (502, 503, 504 retried; 500 is not: it would fail again)

A transport error from httpx is mapped to the most specific class here with `raise … from exc`, so the
original is still in `__cause__`. Every `APIError` carries the `request_id` the router gave, when it gave one.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "InsufficientFunds",
    "InternalServerError",
    "LlamakitError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueueFullError",
    "RateLimitError",
    "SpendCapExceeded",
    "StreamInterruptedError",
    "status_error",
]


class LlamakitError(Exception):
    """The root of every error the SDK raises."""


class ConfigurationError(LlamakitError):
    """The router's URL or an API key is missing: the message says every way to provide it."""


class APIError(LlamakitError):
    """A call to the router failed; `request_id` is the router's id for it when one was assigned."""

    def __init__(self, message: str, *, request: httpx.Request | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.request_id = request_id


class APIConnectionError(APIError):
    """The router could not be reached, or the connection broke before an answer arrived."""


class APITimeoutError(APIConnectionError):
    """The router did not answer within the timeout."""


class APIResponseValidationError(APIError):
    """The router answered 2xx with a body that is not what its API promises (a proxy page, say)."""


class StreamInterruptedError(APIError):
    """A stream failed after text had already arrived; it is not retried, since the text was paid for.

    `text` is what arrived before the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        code: str | None = None,
        request: httpx.Request | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request=request, request_id=request_id)
        self.text = text
        self.code = code


class APIStatusError(APIError):
    """The router answered with an error status. `body` is its decoded JSON (or text) and `error` the
    OpenAI-shaped `{"message", "type", "param", "code"}` object in it."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: object,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request=response.request, request_id=request_id)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        error = body.get("error") if isinstance(body, dict) else None
        self.error: dict[str, Any] = error if isinstance(error, dict) else {}
        self.type: str | None = _text(self.error.get("type"))
        self.code: str | None = _text(self.error.get("code"))
        self.param: str | None = _text(self.error.get("param"))

    def __str__(self) -> str:
        return f"{self.status_code}: {self.message}"


class BadRequestError(APIStatusError):
    """400: the request is not valid; the message names the field."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class InsufficientFunds(APIStatusError):
    """402: the account cannot cover the hold for this request. Nothing was queued or charged.

    `needed` is the hold the request asked for and `balance` what the account has, both in credits:
    deposit the difference, or ask for fewer `max_tokens` or a lower bid.
    """

    def __init__(self, message: str, *, response: httpx.Response, body: object, request_id: str | None = None) -> None:
        super().__init__(message, response=response, body=body, request_id=request_id)
        self.needed: int | None = _int(self.error.get("needed"))
        self.balance: int | None = _int(self.error.get("balance"))


class SpendCapExceeded(InsufficientFunds):
    """402 `spend_cap_exceeded`: the hold would take the API key past one of its spend caps (the account may
    still have credits). `cap` is that cap, `period` 'total', 'day' (UTC) or 'month' (UTC), `available` what
    the key may still hold under it; all credits. Nothing was queued or charged."""

    def __init__(self, message: str, *, response: httpx.Response, body: object, request_id: str | None = None) -> None:
        super().__init__(message, response=response, body=body, request_id=request_id)
        self.cap: int | None = _int(self.error.get("cap"))
        self.period: str | None = _text(self.error.get("period"))
        self.available: int | None = _int(self.error.get("available"))


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such model (the message lists the models there are) or no such route."""


class ConflictError(APIStatusError):
    """409: a request with the same idempotency key is still being served; a retry gets its answer."""


class RateLimitError(APIStatusError):
    """429: too many requests; `Retry-After` (`retry_after`, seconds) says when to come back. `limit` names the
    API key's limit that was hit (`rpm_limit`, `tpm_limit`, `max_parallel_requests`), None for another cause."""

    def __init__(self, message: str, *, response: httpx.Response, body: object, request_id: str | None = None) -> None:
        super().__init__(message, response=response, body=body, request_id=request_id)
        self.limit: str | None = _text(self.error.get("limit"))
        retry_after = response.headers.get("Retry-After", "")
        self.retry_after: int | None = int(retry_after) if retry_after.isdigit() else None


class QueueFullError(RateLimitError):
    """429 `queue_full`: the model's bid queue is full. Retry later, or bid higher when there is room."""


class InternalServerError(APIStatusError):
    """5xx: the router or every node it tried failed; 503 `no_node` means nothing was charged."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientFunds,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitError,
}


def status_error(response: httpx.Response, *, request_id: str | None = None) -> APIStatusError:
    """The exception for an error response: the class from its status (and code), the router's message.

    The body must have been read (for a stream, call `read()` first).
    """
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = (body if isinstance(body, str) and body.strip() else None) or response.reason_phrase or "error"
    status = response.status_code
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIStatusError)
    code = error.get("code") if isinstance(error, dict) else None
    if cls is RateLimitError and code == "queue_full":
        cls = QueueFullError
    if cls is InsufficientFunds and code == "spend_cap_exceeded":
        cls = SpendCapExceeded
    return cls(str(message), response=response, body=body, request_id=request_id)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
