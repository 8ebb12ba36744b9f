"""The node's one table from its own exceptions (`node.errors`) to HTTP: the status, OpenAI error type and
Retry-After each is answered with, at the route layer of either kind of node (the llama-cpp-python node's
`routes`, the llama-server node's `llama_server_app`). Imports nothing of llama.cpp."""

from __future__ import annotations

from llamakit.catalog import ModelNotAvailable
from llamakit.node.errors import (
    AlreadyLoading,
    ModelNotServed,
    NodeError,
    NoModel,
    RequestRefused,
    SlotsBusy,
    StillLoading,
)
from llamakit.wire.errors import ApiError

__all__ = ["http_error", "status_of"]

# Status, error type and Retry-After seconds per node exception (and its subclasses); the error's `code` and
# `param` are the exception's own.
_HTTP: dict[type[NodeError], tuple[int, str, str | None]] = {
    RequestRefused: (400, "invalid_request_error", None),
    ModelNotServed: (404, "not_found_error", None),
    AlreadyLoading: (409, "invalid_request_error", None),
    NoModel: (503, "server_error", None),
    StillLoading: (503, "server_error", "5"),
    SlotsBusy: (503, "server_error", "1"),
}


def http_error(exc: BaseException) -> ApiError | None:
    """The HTTP error a client gets for `exc`; `exc` itself when it is an ApiError; None for an exception that is
    not the client's to see (a bug: the error middleware answers 500 and logs it)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NodeError):
        status, kind, retry_after = _http(exc)
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return ApiError(status, exc.message, type=kind, code=exc.code, param=exc.param, headers=headers)
    if isinstance(exc, ModelNotAvailable):  # a model name the catalog cannot resolve (POST /admin/init)
        return ApiError(404, str(exc), type="not_found_error", code="model_not_found", param="model")
    return None


def _http(exc: NodeError) -> tuple[int, str, str | None]:
    return next(_HTTP[kind] for kind in type(exc).__mro__ if kind in _HTTP)


def status_of(exc: ApiError | NodeError) -> int:
    """The HTTP status `exc` is answered with."""
    return exc.status if isinstance(exc, ApiError) else _http(exc)[0]
