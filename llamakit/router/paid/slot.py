"""A paid request's node slot: taken from the dispatcher (waiting in the bid queue while the client stays), given
back, and what a node that failed the request is owed (a rest, or no work until it answers again)."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

from aiohttp import web

from llamakit.money.fees import format_bid
from llamakit.router.affinity import PrefixMap, chat_text
from llamakit.router.dispatch.errors import NoNode
from llamakit.router.errors import ClientGone
from llamakit.router.herd import HerdNode
from llamakit.router.paid.fallback import passed_over_header
from llamakit.router.paid.request import PaidRequest
from llamakit.router.state import RouterState
from llamakit.router.tracing import PROVIDER, AttributeValue, operation_of
from llamakit.router.upstream import NodeFailed, StreamBroken
from llamakit.wire.headers import (
    BID_HEADER,
    CURRENCY_HEADER,
    NODE_HEADER,
    PASSED_OVER_HEADER,
    QUEUE_HEADER,
    REQUEST_ID_HEADER,
)

__all__ = [
    "CLIENT_POLL_SECONDS",
    "answer_headers",
    "begin_call",
    "client_gone",
    "end_call",
    "failed_over",
    "first_token",
    "free_slot",
    "mark_failed",
    "no_node_left",
    "remember_prefix",
    "take_slot",
]

log = logging.getLogger(__name__)

CLIENT_POLL_SECONDS = 0.25  # how often a waiting request looks whether its client is still there


def client_gone(request: web.Request | None) -> bool:
    """Whether the client of `request` closed its connection; never for None (a batch line has no connection)."""
    if request is None:
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


async def take_slot(state: RouterState, request: web.Request | None, paid: PaidRequest, tried: set[str]) -> HerdNode:
    """A node slot for `paid` from the dispatcher, avoiding the nodes in `tried`: at once when one is free and no
    request waits ahead, else after waiting in the bid queue (time that is not the router's own: see
    RequestTrace.waited); a batch line (no `request`) waits at BATCH_BID, behind every interactive request.
    ClientGone if the client leaves while it waits; the dispatcher's refusals (dispatch.errors) as they come."""
    # The model it is dispatched for: after a fallback, the next of its `models`, not the one its span asked.
    attributes: dict[str, AttributeValue] = {"llamakit.attempt": len(tried) + 1, "llamakit.model": paid.model}
    with paid.trace.span("llamakit.dispatch", attributes) as span:
        try:
            node = await _take_slot(state, request, paid, tried)
        except NoNode as exc:
            if not paid.node_failure:
                raise
            # Every node left failed it: what the last one said tells the client more than "right now" (a node
            # that cannot serve this kind of request at all, say), and whether to retry.
            raise NoNode(
                f"no node that has not failed this request serves {paid.model!r}{_last_said(paid)}; "
                "nothing was charged",
                model=exc.model,
            ) from exc
        if span is not None:
            span.set_attribute("llamakit.node", node.name)
        return node


async def _take_slot(state: RouterState, request: web.Request | None, paid: PaidRequest, tried: set[str]) -> HerdNode:
    dispatch = state.dispatch
    exclude = frozenset(tried)
    bid = paid.queue_bid
    node = dispatch.take_now(paid.id, paid.model, bid, exclude=exclude, prefer=paid.affinity)
    if node is not None:  # the common case on a herd with room: no task, no waiting
        _assigned(state, paid, node)
        return node
    timeout = state.settings.queue_timeout if paid.queue_timeout is None else paid.queue_timeout
    remaining = timeout - (time.monotonic() - paid.arrived)
    waiting = asyncio.ensure_future(
        dispatch.acquire(
            paid.id,
            paid.model,
            bid,
            max_wait=max(remaining, 0.001),
            exclude=exclude,
            arrived=paid.arrived,
            prefer=paid.affinity,
            account=paid.account.id,
        )
    )
    state.metrics.queue_depth.labels(paid.model).set(dispatch.queue_length(paid.model))
    waiting_since = time.monotonic()
    try:
        with paid.trace.span("llamakit.queue"):
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=CLIENT_POLL_SECONDS)
                if done:
                    break
                if client_gone(request) or paid.withdrawn:
                    waiting.cancel()
                    raise ClientGone("the client went away while queued")
    except asyncio.CancelledError:
        waiting.cancel()
        raise
    finally:
        paid.trace.waited += time.monotonic() - waiting_since  # the queue's time, not the router's
        state.metrics.queue_depth.labels(paid.model).set(dispatch.queue_length(paid.model))
    node = waiting.result()
    _assigned(state, paid, node)
    return node


def _assigned(state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
    paid.dispatched = time.monotonic()
    paid.node = node
    if paid.queue_ms is None:
        paid.queue_ms = (time.monotonic() - paid.arrived) * 1000
        state.metrics.queued(paid.model, paid.queue_ms / 1000)
    if paid.affinity is not None:
        state.metrics.dispatched(held=node.id == paid.affinity.node_id)


def free_slot(state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
    """The request is done with its node's slot: the next request gets it, here or herd-wide."""
    state.dispatch.free(paid.id, node)


def mark_failed(state: RouterState, node: HerdNode, exc: NodeFailed | StreamBroken) -> None:
    """Take a failed node out of work: until a health check answers, or for a rest if it hung."""
    if exc.hung:
        state.herd.hung(node, rest=state.settings.node_rest)
    elif isinstance(exc, StreamBroken) or exc.down:
        state.herd.failed(node, at_once=True)
    else:
        return
    state.dispatch.failed(node)  # every router stops sending it work, not only this one


def failed_over(
    state: RouterState, paid: PaidRequest, node: HerdNode, exc: NodeFailed | StreamBroken, tried: set[str]
) -> None:
    """`node` failed the request before its first token: another node gets it."""
    log.warning("%s; trying another node", exc)
    tried.add(node.id)
    said = exc.said if isinstance(exc, NodeFailed) else "broke off its stream"
    paid.node_failure = f"node {node.name} {said}"
    mark_failed(state, node, exc)


def no_node_left(state: RouterState, paid: PaidRequest) -> NoNode:
    attempts = state.settings.max_attempts
    return NoNode(
        f"no node could serve the request for {paid.model!r} after {attempts} attempt(s)"
        f"{_last_said(paid)}; nothing was charged",
        model=paid.model,
    )


def _last_said(paid: PaidRequest) -> str:
    return f" (the last: {paid.node_failure})" if paid.node_failure else ""


def answer_headers(state: RouterState, paid: PaidRequest, node: HerdNode) -> dict[str, str]:
    """The llamakit headers of an answer a node served (the cost headers are added where the charge is known)."""
    headers = {
        REQUEST_ID_HEADER: paid.id,
        NODE_HEADER: node.name,
        BID_HEADER: format_bid(paid.multiplier),
        CURRENCY_HEADER: state.settings.money.currency,
    }
    if paid.queue_ms is not None:
        headers[QUEUE_HEADER] = f"{paid.queue_ms:.3f}"
    if paid.passed_over:
        headers[PASSED_OVER_HEADER] = passed_over_header(paid.passed_over)
    return headers


def begin_call(paid: PaidRequest, node: HerdNode) -> dict[str, str] | None:
    """With tracing on: start the span of `paid`'s call to `node` and return the headers that carry it there."""
    if not paid.trace.on:
        return None
    operation = operation_of(paid.path)
    url = urlsplit(node.url)
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": paid.model,
        "gen_ai.response.id": paid.id,  # the node names its answer after the request
        "server.address": url.hostname or node.url,
        "llamakit.node": node.name,
    }
    if url.port is not None:
        attributes["server.port"] = url.port
    return paid.trace.begin_call(f"{operation} {paid.model}", attributes)


def end_call(paid: PaidRequest, prompt_tokens: int, completion_tokens: int, finish_reason: str | None = None) -> None:
    """The node answered `paid` in full: its call's span ends with the tokens it reports."""
    if not paid.trace.on:
        return
    attributes: dict[str, AttributeValue] = {
        "gen_ai.response.model": paid.model,
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": completion_tokens,
    }
    if finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
    paid.trace.end_call(attributes)


def remember_prefix(state: RouterState, paid: PaidRequest, node: HerdNode, answer: str) -> None:
    """The node's slot now holds the request's text and its answer: the prefix of the conversation's next turn."""
    if paid.text is None:
        return
    if paid.path.endswith("/chat/completions"):
        text = paid.text + chat_text([("assistant", answer)])
    else:
        text = paid.text + answer
    state.prefixes.remember(PrefixMap.chain((paid.model, paid.account.id), text, paid.chain), node.id)


def first_token(state: RouterState, paid: PaidRequest) -> None:
    """The first token went to the client (time to first token)."""
    if paid.first_token is None:
        paid.first_token = time.monotonic()
        state.metrics.first_token(paid.model, paid.first_token - paid.arrived)
        paid.trace.call_event("llamakit.first_token")
