"""Serve a priced request on a node: a whole answer (failing over to another node until one answers), or a stream
(`relay.py`); on any failure the hold goes back in full and the client gets its error (`errors.http_error`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from llamakit.router.errors import ClientGone, http_error
from llamakit.router.herd import HerdNode
from llamakit.router.paid.fallback import PASS_OVER, pass_over, passed_over_header
from llamakit.router.paid.relay import serve_stream
from llamakit.router.paid.request import PaidRequest
from llamakit.router.paid.settle import refund, settle
from llamakit.router.paid.slot import (
    CLIENT_POLL_SECONDS,
    answer_headers,
    begin_call,
    client_gone,
    end_call,
    failed_over,
    free_slot,
    no_node_left,
    remember_prefix,
    take_slot,
)
from llamakit.router.pricing import cost_headers
from llamakit.router.state import RouterState
from llamakit.router.upstream import NodeFailed
from llamakit.web import json_response
from llamakit.wire.headers import OVERHEAD_HEADER, PASSED_OVER_HEADER, REQUEST_ID_HEADER

__all__ = ["serve", "serve_line"]


async def serve(state: RouterState, request: web.Request, paid: PaidRequest) -> web.StreamResponse:
    """The answer to `paid`, whole or streamed, from its model or, when that one cannot serve it before its first
    token, from the next of its `models` (fallback.py). On failure its hold is released in full with a usage
    record of the error, and the error is raised as the client sees it (an ApiError naming the request's id)."""

    async def answer() -> web.StreamResponse:
        if paid.stream:
            return await serve_stream(state, request, paid)
        body, headers = await _serve_whole(state, request, paid)
        return json_response(body, headers=headers)

    return await _served(state, paid, answer)


async def serve_line(state: RouterState, paid: PaidRequest) -> dict[str, Any]:
    """A batch line's whole answer, as `serve` makes a client's (settled, or refunded with the error raised as an
    ApiError naming the request's id), without a client connection: nobody can leave it, and it is never
    streamed. The answer's `usage` says its exact tokens and what they cost."""
    body, _headers = await _served(state, paid, lambda: _serve_whole(state, None, paid))
    return body


_Answer = TypeVar("_Answer")


async def _served(state: RouterState, paid: PaidRequest, answer: Callable[[], Awaitable[_Answer]]) -> _Answer:
    """`answer()`, moving on to `paid`'s next model while one cannot serve it; on failure, the refund."""
    try:
        while True:
            try:
                return await answer()
            except PASS_OVER as exc:
                if not pass_over(state, paid, exc):
                    raise
    except asyncio.CancelledError:
        await refund(state, paid, status="cancelled", error="the client went away")
        raise
    except Exception as exc:
        error = http_error(exc)
        if error is None:  # a bug, not the client's to see: recorded with its repr, a 500 from the middleware
            await refund(state, paid, status="error", error=repr(exc))
            raise
        # The record keeps the error's code and status, as a refusal before the hold's does (record.refusal_record).
        http_status = error.status if 400 <= error.status <= 599 else None  # 499: the client left, nobody was refused
        status = "cancelled" if isinstance(exc, ClientGone) else _refund_status(error.status, error.code)
        await refund(state, paid, status=status, error=error.message, http_status=http_status)
        error.headers[REQUEST_ID_HEADER] = paid.id  # the ledger's usage record has this id
        if paid.passed_over:  # every model was tried: the error is the last one's, and says the others'
            error.message += "; the other models were passed over: " + ", ".join(
                f"{p.model} ({p.reason})" for p in paid.passed_over
            )
            error.extra["passed_over"] = paid.passed_over_list()
            error.headers[PASSED_OVER_HEADER] = passed_over_header(paid.passed_over)
        if error is exc:
            raise
        raise error from exc
    finally:
        paid.admission.finish()  # a no-op once the request was recorded with its tokens


def _refund_status(status: int, code: str | None) -> str:
    return code or {429: "queue_full", 504: "queue_timeout", 503: "no_node"}.get(status, "rejected")


async def _serve_whole(
    state: RouterState, request: web.Request | None, paid: PaidRequest
) -> tuple[dict[str, Any], dict[str, str]]:
    """The whole answer to `paid` as the client gets it, and its headers."""
    tried: set[str] = set()
    for _attempt in range(state.settings.max_attempts):
        node = await take_slot(state, request, paid, tried)
        trace = begin_call(paid, node)
        asked = time.monotonic()
        try:
            answer, cut = await _complete_watching(state, request, paid, node, trace)
        except NodeFailed as exc:
            paid.trace.end_call(error=exc)
            failed_over(state, paid, node, exc, tried)
            if client_gone(request):  # nobody to fail over for
                raise ClientGone("the client went away") from exc
            continue
        except BaseException as exc:
            paid.trace.end_call(error=exc)
            raise
        finally:
            paid.trace.waited += time.monotonic() - asked  # the node's time, not the router's
            free_slot(state, paid, node)
        usage = answer.get("usage") or {}
        bill = paid.bill(usage)
        end_call(paid, bill.prompt_tokens, bill.completion_tokens, _finish_reason(answer))
        answer["id"], answer["model"] = paid.id, paid.model
        money = state.settings.money
        answer["usage"] = bill.usage(usage, money, cache=paid.generates)
        if paid.fallbacks:
            answer["passed_over"] = paid.passed_over_list()
        headers = {**answer_headers(state, paid, node), **cost_headers(money, bill.charge)}
        if cut:  # nobody reads this answer: charged for the tokens made before the node stopped, not remembered
            await settle(state, paid, node, bill, "cut", "the client went away")
            return paid.present(answer), _with_overhead(paid, headers)
        remember = paid.claim.remember(answer, headers) if paid.claim is not None else None
        charged = await settle(state, paid, node, bill, "ok", remember=remember)
        if charged != bill.charge:  # its hold went back while it ran (see settle._hold_gone): it is free
            answer["usage"] = bill.usage(usage, money, charged, cache=paid.generates)
            headers.update(cost_headers(money, charged))
        remember_prefix(state, paid, node, _answer_text(answer))
        return paid.present(answer), _with_overhead(paid, headers)
    raise no_node_left(state, paid)


def _with_overhead(paid: PaidRequest, headers: dict[str, str]) -> dict[str, str]:
    """`headers` and the router's overhead on the request, as its usage record has it (set when it settled)."""
    overhead = paid.overhead_ms if paid.overhead_ms is not None else paid.trace.overhead_ms()
    headers[OVERHEAD_HEADER] = f"{overhead:.3f}"
    return headers


def _finish_reason(answer: dict[str, Any]) -> str | None:
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


async def _complete_watching(
    state: RouterState,
    request: web.Request | None,
    paid: PaidRequest,
    node: HerdNode,
    trace: Mapping[str, str] | None,
) -> tuple[dict[str, Any], bool]:
    """The node's whole answer, and whether the client left meanwhile. When it leaves, the node is told to stop:
    its answer then holds the tokens made until it did, which is what the request costs.

    Not so for a request with an Idempotency-Key: a client that leaves it (a timeout) retries it under the same
    key, and that retry waits for this answer and is given it. Stopped and charged as cut, the first would leave
    the retry to run and be charged again."""
    upstream = state.upstream
    assert upstream is not None  # set at start-up, before the first request
    if paid.claim is not None or request is None:  # (a batch line has no client that could leave)
        answer = await upstream.complete(node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt, trace=trace)
        return answer, False
    # A timer looks for the client now and then; the answer is awaited here, with no task of its own.
    loop = asyncio.get_running_loop()
    cancel: asyncio.Future[bool] | None = None
    timer: asyncio.TimerHandle | None = None

    def look() -> None:
        nonlocal timer, cancel
        if client_gone(request):
            cancel = asyncio.ensure_future(upstream.cancel(node, paid.id))
        else:
            timer = loop.call_later(CLIENT_POLL_SECONDS, look)

    timer = loop.call_later(CLIENT_POLL_SECONDS, look)  # not at once: the node must have the request to stop it
    try:
        answer = await upstream.complete(node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt, trace=trace)
    finally:
        if timer is not None:
            timer.cancel()
        if cancel is not None:
            await cancel
    return answer, cancel is not None


def _answer_text(answer: dict[str, Any]) -> str:
    """The text of a node's whole answer (chat or completion); empty when its shape is unexpected."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""
