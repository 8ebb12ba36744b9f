"""Domain errors inside, HTTP at the edge: the one table that turns the router's own exceptions into statuses and
OpenAI error bodies (as openai-python's one status → exception table does, the other way round).

The parts raise what they mean: the dispatcher `dispatch.errors` (no node, queue full, queue timeout …), the
ledger `InsufficientFunds`, `SpendCapExceeded` and `LedgerUnavailable`, idempotency `KeyReused` and `KeyInUse`,
the paid path `ClientGone`, and a node's own refusal `NodeRejected`. `http_error` gives the `ApiError` a client
sees; the router's error middleware applies it to whatever a handler raises, and the paid path records its status.
"""

from __future__ import annotations

from llamakit.router.dispatch.errors import (
    DispatchError,
    LeaseLost,
    NoNode,
    QueueFull,
    QueueShareExceeded,
    QueueTimeout,
)
from llamakit.router.ledger import InsufficientFunds, LedgerUnavailable, SpendCapExceeded
from llamakit.router.ledger_gate import RETRY_AFTER
from llamakit.router.paid.idempotency import KeyInUse, KeyReused
from llamakit.router.upstream import NodeRejected
from llamakit.wire.errors import ApiError
from llamakit.wire.headers import IDEMPOTENCY_HEADER

__all__ = ["ClientGone", "http_error"]


class ClientGone(Exception):
    """The client closed its connection before its answer (HTTP 499, nginx's "client closed request")."""


# status and error type per dispatcher refusal; its `code` and `retry_after` are the exception's own.
_DISPATCH: dict[type[DispatchError], tuple[int, str]] = {
    NoNode: (503, "server_error"),
    LeaseLost: (503, "server_error"),
    QueueFull: (429, "rate_limit_error"),
    QueueShareExceeded: (429, "rate_limit_error"),
    QueueTimeout: (504, "server_error"),
}


def http_error(exc: BaseException) -> ApiError | None:
    """The HTTP error a client gets for `exc`; `exc` itself when it is an ApiError; None for an exception that is
    not the client's to see (a bug: the middleware answers 500 and logs it)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DispatchError):
        status, kind = _DISPATCH[type(exc)]
        return ApiError(status, exc.message, type=kind, code=exc.code, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, LedgerUnavailable):
        # The database's own words (a host, a path) are the operator's, in the log; the client gets what to do.
        return ApiError(
            503,
            "the router's ledger cannot be written now, so it takes no paid request; nothing was held or charged: "
            f"try again in {RETRY_AFTER} s (or at another router)",
            type="server_error",
            code="ledger_unavailable",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    if isinstance(exc, InsufficientFunds):
        extra: dict[str, object] = {"needed": exc.needed, "balance": exc.balance}
        return ApiError(402, str(exc), type="insufficient_funds", code="insufficient_funds", extra=extra)
    if isinstance(exc, SpendCapExceeded):
        extra = {"needed": exc.needed, "cap": exc.cap, "period": exc.period, "available": exc.available}
        return ApiError(402, str(exc), type="insufficient_funds", code="spend_cap_exceeded", extra=extra)
    if isinstance(exc, KeyReused):
        return ApiError(422, str(exc), code="idempotency_key_reused", param=IDEMPOTENCY_HEADER)
    if isinstance(exc, KeyInUse):
        return ApiError(409, str(exc), code="idempotency_key_in_use", headers={"Retry-After": "10"})
    if isinstance(exc, ClientGone):
        return ApiError(499, str(exc), code="client_gone")
    if isinstance(exc, NodeRejected):
        # The node's own refusal of the request (the client's fault, such as a prompt over the context), as is.
        error = exc.body["error"]
        return ApiError(
            exc.status,
            error.get("message", "rejected by the node"),
            type=error.get("type", "invalid_request_error"),
            code=error.get("code"),
            param=error.get("param"),
        )
    return None
