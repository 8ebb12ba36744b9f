"""The error every HTTP edge of llamakit answers with: an OpenAI-shaped body (`{"error": {message, type, param,
code}}`) and its status. Raised at the route layer; deeper parts raise their own exceptions (see each package)."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body"]


class ApiError(Exception):
    """An error a client caused or must handle, rendered as an OpenAI-shaped body with `status`.

    `extra` carries machine-readable details (for example the amount needed on a 402) that are merged
    into the error object so clients need not parse the message.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        self.recorded = False  # a usage record of this request exists (its hold was released with this error)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param, **self.extra)


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}
