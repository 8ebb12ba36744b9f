"""The node's one table from its own exceptions to HTTP: every exception has a status, and each renders the
status, OpenAI error body and headers the node answered before its parts stopped raising HTTP errors."""

from __future__ import annotations

from typing import Any

import pytest

from llamakit.catalog import ModelNotAvailable
from llamakit.node import errors

pytest.importorskip("llama_cpp")

from llamakit.node.http_errors import http_error


def _every(kind: type[errors.NodeError]) -> list[type[errors.NodeError]]:
    return [kind, *(sub for direct in kind.__subclasses__() for sub in _every(direct))]


@pytest.mark.parametrize("kind", _every(errors.NodeError)[1:], ids=lambda kind: kind.__name__)
def test_every_node_exception_is_a_client_error_or_a_refusal_to_retry_elsewhere(kind: type[errors.NodeError]) -> None:
    assert kind.__name__ in errors.__all__
    answer = http_error(kind("what happened", param="field"))
    assert answer is not None
    assert answer.status in (400, 404, 409, 503)
    assert answer.body()["error"] == {
        "message": "what happened",
        "type": answer.type,
        "param": "field",
        "code": kind.code,
    }


def _raised(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    answer = http_error(exc)
    assert answer is not None
    return answer.status, answer.body()["error"], answer.headers


def _error(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, str | None]:
    return {"message": message, "type": type, "param": param, "code": code}


# What each place raised as an ApiError before (status, body, headers), raised now as the node's own exception.
PINNED = [
    (errors.EmptyPrompt("m", param="prompt"), 400, _error("m", param="prompt"), {}),
    (
        errors.ContextOverflow("m", param="max_tokens"),
        400,
        _error("m", param="max_tokens", code="context_length_exceeded"),
        {},
    ),
    (errors.TooManyTokens("m", param="input"), 400, _error("m", param="input", code="too_many_tokens"), {}),
    (errors.BadGrammar("m", param="grammar"), 400, _error("m", param="grammar", code="invalid_grammar"), {}),
    (errors.BadSchema("m", param="tools"), 400, _error("m", param="tools", code="invalid_schema"), {}),
    (errors.TemplateRefused("m", param="messages"), 400, _error("m", param="messages"), {}),
    (
        errors.ControlTokenInText("m", param="messages"),
        400,
        _error("m", param="messages", code="invalid_value"),
        {},
    ),
    (
        errors.BiasOutsideVocabulary("m", param="logit_bias"),
        400,
        _error("m", param="logit_bias", code="invalid_value"),
        {},
    ),
    (errors.TokenOutsideVocabulary("m", param="input"), 400, _error("m", param="input", code="invalid_token"), {}),
    (
        errors.DimensionsMismatch("m", param="dimensions"),
        400,
        _error("m", param="dimensions", code="unsupported_value"),
        {},
    ),
    (
        errors.ModelNotServed("m", param="model"),
        404,
        _error("m", type="not_found_error", param="model", code="model_not_found"),
        {},
    ),
    (
        ModelNotAvailable("m"),
        404,
        _error("m", type="not_found_error", param="model", code="model_not_found"),
        {},
    ),
    (errors.AlreadyLoading("m"), 409, _error("m", code="busy"), {}),
    (errors.NoModel("m"), 503, _error("m", type="server_error", code="model_error"), {}),
    (
        errors.StillLoading("m"),
        503,
        _error("m", type="server_error", code="loading"),
        {"Retry-After": "5"},
    ),
    (
        errors.SlotsBusy("m"),
        503,
        _error("m", type="server_error", code="slots_busy"),
        {"Retry-After": "1"},
    ),
]


@pytest.mark.parametrize(("exc", "status", "error", "headers"), PINNED, ids=lambda v: type(v).__name__)
def test_each_node_exception_answers_as_before(
    exc: BaseException, status: int, error: dict[str, Any], headers: dict[str, str]
) -> None:
    assert _raised(exc) == (status, error, headers)


def test_an_exception_the_node_does_not_know_is_a_bug_not_a_refusal() -> None:
    assert http_error(RuntimeError("boom")) is None
