"""One paid request from arrival to settlement: price, hold, queue, dispatch (with failover), settle or refund.

The hold is closed exactly once on every path: settled on the node's exact usage (or, for a stream cut
short, on the tokens delivered), or released in full when nothing was generated for the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web

from llamakit import jsontext
from llamakit.money.fees import (
    FeeSchedule,
    format_bid,
    hold_amount,
    parse_bid,
    prompt_token_bound,
    raw_prompt_token_bound,
    settle_amount,
)
from llamakit.router.affinity import Affinity, PrefixMap, chat_text
from llamakit.router.herd import HerdNode
from llamakit.router.idempotency import Claim
from llamakit.router.ledger import (
    MAX_AMOUNT,
    Account,
    HoldClosed,
    InsufficientFunds,
    LedgerError,
    Remembered,
    SpendCapExceeded,
)
from llamakit.router.limits import UNLIMITED, Admission, Caller
from llamakit.router.pricing import cost_headers
from llamakit.router.state import RouterState
from llamakit.router.upstream import EventStream, NodeFailed, NodeRejected, StreamBroken, parse_event, token_chunk
from llamakit.web import SseWriter, json_response
from llamakit.wire.completions import (
    ChatCompletionRequest,
    GenerationRequest,
    Usage,
    chat_completion_body,
    completion_body,
)
from llamakit.wire.errors import ApiError, error_body
from llamakit.wire.headers import CURRENCY_HEADER

__all__ = ["PaidRequest", "new_request_id", "serve"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BID_HEADER = "X-Llamakit-Bid"
CLIENT_POLL_SECONDS = 0.25
KEPT_CHUNKS = 256  # chunks of a stream kept unread for its transcript, at most


@dataclass
class PaidRequest:
    """A priced request with an open hold."""

    id: str
    account: Account
    model: str
    path: str
    body: dict[str, Any]
    bid: Decimal
    fees: FeeSchedule
    held: int
    stream: bool
    include_usage: bool
    arrived: float
    queue_ms: float | None = None
    dispatched: float | None = None  # time.monotonic() when a node was assigned
    first_token: float | None = None  # time.monotonic() when a stream's first token went to the client
    user: str | None = None
    node: HerdNode | None = None
    closed: bool = False
    claim: Claim | None = None
    # What a stream delivered, kept so that its answer can be remembered under the idempotency key and its
    # prefix for affinity: the chunks relayed as the node wrote them (None when neither is wanted), read into
    # the transcript in one parse now and then (see _transcribe), not one by one.
    kept: list[bytes] | None = None
    transcript: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by the stream's `index`
    finish_reason: str = "stop"
    # The request's text and its block hashes as the prefix map cuts it, and the node likely to hold its
    # prefix (see affinity.py); None when affinity is off.
    text: str | None = None
    chain: list[int] = field(default_factory=list)
    affinity: Affinity | None = None
    # How a stream reaches the client: chat or completion chunks as they are, or translated (the Responses API).
    open_sse: Callable[[web.Request, dict[str, str]], Awaitable[SseWriter]] = SseWriter.relay
    # The request's place under its key's rate limits, given back with its tokens when it ends.
    admission: Admission = UNLIMITED
    key_prefix: str | None = None  # the display prefix of the API key that made it

    @property
    def cache_salt(self) -> str:
        """Whose prompt cache the request may reuse at its node: its account's only (upstream.CACHE_SALT_HEADER)."""
        return f"account-{self.account.id}"


async def price(
    state: RouterState,
    request: web.Request,
    caller: Caller,
    req: GenerationRequest,
    data: dict[str, Any],
    path: str,
    claim: Claim | None = None,
) -> PaidRequest:
    """Validate what only the router knows (model, bid, token limit), then hold the most it can cost."""
    settings = state.settings
    model, bid = request_model(state, request, req.model, req.bid)
    max_tokens = req.token_limit or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        raise ApiError(
            400,
            f"{field} is {max_tokens}; the most this router allows is {settings.max_tokens_limit}",
            param=field,
            code="invalid_value",
        )
    if isinstance(req, ChatCompletionRequest):
        # What the node's template will render: tools offered, earlier calls and their results included.
        rendered = req.template_messages()
        texts = [m["content"] for m in rendered]
        bound = prompt_token_bound(texts, messages=len(texts))
        text = chat_text([(m["role"], m["content"]) for m in rendered])
    else:
        text = data["prompt"] if isinstance(data["prompt"], str) else data["prompt"][0]
        bound = raw_prompt_token_bound(text)
    fees = state.prices.fees(model)
    prompt_bound = _prompt_bound(state, model, bound, max_tokens)
    held = hold_amount(fees, bid, prompt_bound, max_tokens)
    request_id, admission = await hold_credits(
        state, caller, held, model=model, bid=bid, user=req.user, tokens=prompt_bound + max_tokens
    )
    # `null` means "not given" (OpenAI's fields are nullable): the node gets the field's default by its absence.
    body = {k: v for k, v in data.items() if v is not None and k not in ("bid", "max_completion_tokens", "usage")}
    body["model"], body["max_tokens"] = model, max_tokens
    if req.stream:
        # Always ask the node for usage: it is what the request is settled on.
        body["stream_options"] = {"include_usage": True}
    chain = PrefixMap.chain((model, caller.account.id), text) if settings.affinity else []
    return PaidRequest(
        id=request_id,
        account=caller.account,
        admission=admission,
        key_prefix=caller.key.prefix,
        model=model,
        path=path,
        body=body,
        bid=bid,
        fees=fees,
        held=held,
        stream=req.stream,
        include_usage=req.include_usage,
        arrived=time.monotonic(),
        claim=claim,
        text=text if settings.affinity else None,
        kept=[] if claim is not None or settings.affinity else None,
        user=req.user or None,
        chain=chain,
        affinity=state.prefixes.holder(chain) if chain else None,
    )


def new_request_id() -> str:
    """A new request's id: `req-` and 32 hex digits, the microseconds since the epoch and then 72 random bits.

    Ids in the order they are made keep the ledger's indexes on them (holds, charges, usage) growing at one
    end: a batch of settlements writes a few index pages, not one random page per request per index (with
    uuid4 ids, the ledger's thread spent about 15 % more CPU and its checkpoints twice as much).
    """
    return f"req-{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


def _prompt_bound(state: RouterState, model: str, bound: int, max_tokens: int) -> int:
    """The most prompt tokens the request can be charged for: `bound`, from its bytes (see
    fees.prompt_token_bound), and no more than the context leaves beside `max_tokens` on the largest node
    serving the model, since a node refuses (400 context_length_exceeded, nothing charged) a prompt that does
    not fit. 400 when `max_tokens` alone fills that context."""
    context = state.herd.context(model)
    if context is None:  # a node that has not said its context yet: the bytes alone
        return bound
    if max_tokens >= context:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, but {model!r} holds {context} tokens per request, prompt included: "
            "ask for fewer",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return min(bound, context - max_tokens)


def request_model(state: RouterState, request: web.Request, model: str | None, bid: object) -> tuple[str, Decimal]:
    """The model a request names (or the default) and its validated bid (body field, else `X-Llamakit-Bid`):
    400 for a bad bid, 404 naming the models served for an unknown model."""
    raw_bid: object = bid if bid is not None else request.headers.get(BID_HEADER, 1)
    try:
        parsed = parse_bid(raw_bid)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="bid", code="invalid_bid") from exc
    name = model or state.default_model()
    if name is None or not state.knows_model(name):
        known = state.known_models()
        available = ", ".join(known) or "none (no node has joined yet)"
        raise ApiError(
            404,
            f"model {name!r} does not exist here; available models: {available}",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    return name, parsed


async def hold_credits(
    state: RouterState, caller: Caller, amount: int, *, model: str, bid: Decimal, user: str | None, tokens: int
) -> tuple[str, Admission]:
    """Let a new request in under its key's limits and hold `amount` credits for it; returns its id and its
    admission (to finish when it ends). `tokens` is the most it may use (prompt bound and max_tokens), which
    counts against the key's tpm_limit while it runs. Nothing is held or counted when it is refused:

    - 403 `model_not_allowed` when the key may not use `model`;
    - 429 `rate_limit_exceeded` with Retry-After over the key's rate or concurrency limits (see keys.py);
    - 402 `insufficient_funds` with `needed` and `balance` when the balance is short;
    - 402 `spend_cap_exceeded` with `needed`, `cap`, `period` and `available` past one of the key's caps;
    - 400 `hold_too_large` when `amount` is more than the ledger can hold (MAX_AMOUNT): no balance could pay it.
    """
    if amount > MAX_AMOUNT:  # fees near the bound and a long prompt: the ledger would refuse it with a ValueError
        raise ApiError(
            400,
            f"this request could cost up to {amount} credits at bid {format_bid(bid)}, more than the ledger can hold "
            f"({MAX_AMOUNT}): ask for fewer max_tokens, send a shorter prompt or bid less",
            param="max_tokens",
            code="hold_too_large",
        )
    if not caller.limits.allows_model(model):
        allowed = ", ".join(caller.limits.models or ())
        raise ApiError(
            403,
            f"this API key may not use model {model!r}; it may use: {allowed}",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )
    admission = state.rates.admit(caller, tokens)
    request_id = new_request_id()
    try:
        await state.ledger.hold(
            caller.account.id, amount, request_id=request_id, model=model, bid=bid, user=user or None,
            key_hash=caller.key_hash,
        )  # fmt: skip
    except (InsufficientFunds, SpendCapExceeded) as exc:
        admission.cancel()  # refused before anything was done: it counts towards no rate limit
        if isinstance(exc, SpendCapExceeded):
            code, extra = "spend_cap_exceeded", {"cap": exc.cap, "period": exc.period, "available": exc.available}
        else:
            code, extra = "insufficient_funds", {"balance": exc.balance}
        raise ApiError(
            402, str(exc), type="insufficient_funds", code=code, extra={"needed": exc.needed, **extra}
        ) from exc
    except BaseException:
        admission.finish()
        raise
    return request_id, admission


async def serve(state: RouterState, request: web.Request, paid: PaidRequest) -> web.StreamResponse:
    try:
        if paid.stream:
            return await _serve_stream(state, request, paid)
        return await _serve_whole(state, request, paid)
    except ApiError as exc:
        # The record keeps the error's code and status, as a refusal before the hold's does (api.record_refusal).
        http_status = exc.status if 400 <= exc.status <= 599 else None  # 499: the client left, nobody was refused
        await _refund(state, paid, status=_refund_status(exc), error=exc.message, http_status=http_status)
        exc.headers["X-Llamakit-Request-Id"] = paid.id  # the ledger's usage record has this id
        exc.recorded = True
        raise
    except asyncio.CancelledError:
        await _refund(state, paid, status="cancelled", error="the client went away")
        raise
    except Exception as exc:
        await _refund(state, paid, status="error", error=repr(exc))
        raise
    finally:
        paid.admission.finish()  # a no-op once the request was recorded with its tokens


def _refund_status(exc: ApiError) -> str:
    if exc.status == 499:
        return "cancelled"
    return exc.code or {429: "queue_full", 504: "queue_timeout", 503: "no_node"}.get(exc.status, "rejected")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _acquire(state: RouterState, request: web.Request, paid: PaidRequest, tried: set[str]) -> HerdNode:
    """Wait in the bid queue for a node, giving up if the client disconnects while it waits."""
    remaining = state.settings.queue_timeout - (time.monotonic() - paid.arrived)
    if state.cluster is not None:  # several routers share the herd: the queue is in the database
        state.cluster.take_now(paid.model, frozenset(tried))
        waiting = asyncio.ensure_future(
            state.cluster.acquire(
                paid.id,
                paid.model,
                paid.bid,
                max_wait=max(remaining, 0.001),
                exclude=frozenset(tried),
                arrived=paid.arrived,
                prefer=paid.affinity,
                account=paid.account.id,
            )
        )
    else:
        node = state.scheduler.take_now(paid.model, paid.bid, exclude=frozenset(tried), prefer=paid.affinity)
        if node is not None:  # the common case on a herd with room: no task, no waiting
            _assigned(state, paid, node)
            return node
        waiting = asyncio.ensure_future(
            state.scheduler.acquire(
                paid.model,
                paid.bid,
                max_wait=max(remaining, 0.001),
                exclude=frozenset(tried),
                arrived=paid.arrived,
                prefer=paid.affinity,
                account=paid.account.id,
            )
        )
    state.metrics.queue_depth.labels(paid.model).set(state.scheduler.queue_length(paid.model))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=CLIENT_POLL_SECONDS)
            if done:
                break
            if _client_gone(request):
                waiting.cancel()
                raise ApiError(499, "the client went away while queued", code="client_gone")
    except asyncio.CancelledError:
        waiting.cancel()
        raise
    finally:
        state.metrics.queue_depth.labels(paid.model).set(state.scheduler.queue_length(paid.model))
    node = waiting.result()
    _assigned(state, paid, node)
    return node


def _release(state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
    """The request is done with its node's slot: give it to the next request, here or herd-wide."""
    if state.cluster is None:
        state.scheduler.release(node)
    else:
        state.cluster.release(paid.id, node)


def _assigned(state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
    paid.dispatched = time.monotonic()
    if paid.queue_ms is None:
        paid.queue_ms = (time.monotonic() - paid.arrived) * 1000
        state.metrics.queued(paid.model, paid.queue_ms / 1000)
    if paid.affinity is not None:
        state.metrics.dispatched(held=node.id == paid.affinity.node_id)


def _remember_prefix(state: RouterState, paid: PaidRequest, node: HerdNode, answer: str) -> None:
    """The node's slot now holds the request's text and its answer: the prefix of the conversation's next turn."""
    if paid.text is None:
        return
    if paid.path.endswith("/chat/completions"):
        text = paid.text + chat_text([("assistant", answer)])
    else:
        text = paid.text + answer
    state.prefixes.remember(PrefixMap.chain((paid.model, paid.account.id), text, paid.chain), node.id)


def _node_failed(state: RouterState, node: HerdNode, exc: NodeFailed | StreamBroken, tried: set[str]) -> None:
    log.warning("%s; trying another node", exc)
    tried.add(node.id)
    _mark_node(state, node, exc)


def _mark_node(state: RouterState, node: HerdNode, exc: NodeFailed | StreamBroken) -> None:
    """Take a failed node out of work: until a health check answers, or for a rest if it hung."""
    if exc.hung:
        state.herd.hung(node, rest=state.settings.node_rest)
    elif isinstance(exc, StreamBroken) or exc.down:
        state.herd.failed(node, at_once=True)
    else:
        return
    if state.cluster is not None:  # every router stops sending it work, not only this one
        state.cluster.node_failed(node)


def _no_node_left(paid: PaidRequest, attempts: int) -> ApiError:
    return ApiError(
        503,
        f"no node could serve the request for {paid.model!r} after {attempts} attempt(s); nothing was charged",
        type="server_error",
        code="no_node",
        headers={"Retry-After": "5"},
    )


def _passed_on(exc: NodeRejected) -> ApiError:
    """The node's own refusal of the request (the client's fault, such as a prompt over the context), as is."""
    error = exc.body["error"]
    return ApiError(
        exc.status,
        error.get("message", "rejected by the node"),
        type=error.get("type", "invalid_request_error"),
        code=error.get("code"),
        param=error.get("param"),
    )


def _headers(state: RouterState, paid: PaidRequest, node: HerdNode) -> dict[str, str]:
    headers = {
        "X-Llamakit-Request-Id": paid.id,
        "X-Llamakit-Node": node.name,
        "X-Llamakit-Bid": format_bid(paid.bid),
        CURRENCY_HEADER: state.settings.money.currency,
    }
    if paid.queue_ms is not None:
        headers["X-Llamakit-Queue-Ms"] = f"{paid.queue_ms:.3f}"
    return headers


async def _serve_whole(state: RouterState, request: web.Request, paid: PaidRequest) -> web.Response:
    tried: set[str] = set()
    for _attempt in range(state.settings.max_attempts):
        node = await _acquire(state, request, paid, tried)
        try:
            answer, cut = await _complete_watching(state, request, paid, node)
        except NodeFailed as exc:
            _node_failed(state, node, exc, tried)
            if _client_gone(request):  # nobody to fail over for
                raise ApiError(499, "the client went away", code="client_gone") from exc
            continue
        except NodeRejected as exc:
            raise _passed_on(exc) from exc
        finally:
            _release(state, paid, node)
        usage = answer.get("usage") or {}
        prompt_tokens, completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        charge = settle_amount(paid.fees, paid.bid, prompt_tokens, completion_tokens, paid.held)
        answer["id"] = paid.id
        money = state.settings.money
        answer["usage"] = {**usage, **money.cost_fields(charge)}
        headers = {**_headers(state, paid, node), **cost_headers(money, charge)}
        if cut:  # nobody reads this answer: charged for the tokens made before the node stopped, not remembered
            await _settle(
                state, paid, node, prompt_tokens, completion_tokens, "cut", "the client went away", usage=usage
            )
            return json_response(answer, headers=headers)
        remember = paid.claim.remember(answer, headers) if paid.claim is not None else None
        charged = await _settle(
            state, paid, node, prompt_tokens, completion_tokens, "ok", remember=remember, usage=usage
        )
        if charged != charge:  # its hold went back while it ran (see _hold_gone): it is free
            answer["usage"] = {**usage, **money.cost_fields(charged)}
            headers.update(cost_headers(money, charged))
        _remember_prefix(state, paid, node, _answer_text(answer))
        return json_response(answer, headers=headers)
    raise _no_node_left(paid, state.settings.max_attempts)


async def _complete_watching(
    state: RouterState, request: web.Request, paid: PaidRequest, node: HerdNode
) -> tuple[dict[str, Any], bool]:
    """The node's whole answer, and whether the client left meanwhile. When it leaves, the node is told to stop:
    its answer then holds the tokens made until it did, which is what the request costs.

    Not so for a request with an Idempotency-Key: a client that leaves it (a timeout) retries it under the same
    key, and that retry waits for this answer and is given it. Stopped and charged as cut, the first would leave
    the retry to run and be charged again."""
    if paid.claim is not None:
        answer = await state.upstream.complete(  # type: ignore[union-attr]
            node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt
        )
        return answer, False
    # A timer looks for the client now and then; the answer is awaited here, with no task of its own.
    loop = asyncio.get_running_loop()
    cancel: asyncio.Future[bool] | None = None
    timer: asyncio.TimerHandle | None = None

    def look() -> None:
        nonlocal timer, cancel
        if _client_gone(request):
            cancel = asyncio.ensure_future(state.upstream.cancel(node, paid.id))  # type: ignore[union-attr]
        else:
            timer = loop.call_later(CLIENT_POLL_SECONDS, look)

    timer = loop.call_later(CLIENT_POLL_SECONDS, look)  # not at once: the node must have the request to stop it
    try:
        answer = await state.upstream.complete(  # type: ignore[union-attr]
            node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt
        )
    finally:
        if timer is not None:
            timer.cancel()
        if cancel is not None:
            await cancel
    return answer, cancel is not None


async def _first_events(node: HerdNode, events: EventStream, prefix: bytes) -> list[bytes]:
    """The node's events up to its first token (or usage): until then another node can take over, and does when
    the node reports an error instead (StreamBroken)."""
    first: list[bytes] = []
    async for payload in events:
        first.append(payload)
        if token_chunk(payload, prefix) is not None:
            return first
        event = parse_event(node, payload)
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise StreamBroken(f"node {node.name} failed before any token: {message}")
        if "llamakit" in event or event.get("usage"):
            return first
    raise StreamBroken(f"node {node.name} ended its stream before any token")


async def _open_stream(state: RouterState, paid: PaidRequest, node: HerdNode) -> tuple[EventStream, list[bytes]]:
    """The node's stream and its events up to the first token; the stream is closed if this fails or is cancelled
    (closing it is how the node learns to stop, even while it still decodes the prompt)."""
    events = await state.upstream.stream(  # type: ignore[union-attr]
        node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt
    )
    try:
        return events, await _first_events(node, events, _chunk_prefix(paid))
    except BaseException:
        await events.aclose()
        raise


async def _unless_client_leaves(request: web.Request, work: Awaitable[_T]) -> _T:
    """`work`'s result; if the client leaves first, `work` is cancelled and a 499 `client_gone` raised."""
    # `work` runs in this task; a timer looks for the client now and then, and cancels the task if it left.
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    gone = False
    timer: asyncio.TimerHandle | None = None

    def look() -> None:
        nonlocal gone, timer
        if _client_gone(request):
            gone = True
            task.cancel()
        else:
            timer = loop.call_later(CLIENT_POLL_SECONDS, look)

    timer = loop.call_later(CLIENT_POLL_SECONDS, look)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # cancelled by `look`, by nothing else
            raise ApiError(499, "the client went away before the first token", code="client_gone") from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


async def _serve_stream(state: RouterState, request: web.Request, paid: PaidRequest) -> web.StreamResponse:
    tried: set[str] = set()
    for _attempt in range(state.settings.max_attempts):
        node = await _acquire(state, request, paid, tried)
        try:
            # Hold back what comes before the first token: until then another node can still take over.
            events, first = await _unless_client_leaves(request, _open_stream(state, paid, node))
        except (NodeFailed, StreamBroken) as exc:
            _release(state, paid, node)
            _node_failed(state, node, exc, tried)
            continue
        except NodeRejected as exc:
            _release(state, paid, node)
            raise _passed_on(exc) from exc
        except BaseException:
            _release(state, paid, node)
            raise
        try:
            return await _relay(state, request, paid, node, first, events)
        finally:
            _release(state, paid, node)
    raise _no_node_left(paid, state.settings.max_attempts)


async def _relay(
    state: RouterState,
    request: web.Request,
    paid: PaidRequest,
    node: HerdNode,
    first: list[bytes],
    events: EventStream,
) -> web.StreamResponse:
    """Pass the node's events to the client token by token; settle on the usage event, or on what was delivered."""
    delivered = {"prompt_tokens": 0, "completion_tokens": 0}
    try:
        sse = await paid.open_sse(request, _headers(state, paid, node))
    except BaseException:
        await events.aclose()  # the response could not start: nothing delivered, full refund
        raise
    prefix = _chunk_prefix(paid)
    try:
        # Events that arrived together leave together: one write for what one read brought.
        for i, payload in enumerate(first):
            last = i == len(first) - 1
            await _forward(state, paid, node, sse, payload, prefix, delivered, flush=last and not events.buffered)
        # Then every read's events in one go: a token chunk costs no coroutine of its own.
        while batch := await events.batch():
            for payload in batch:
                token = token_chunk(payload, prefix)
                if token is not None:
                    _pass_token(state, paid, sse, token, delivered)
                else:
                    await _forward(state, paid, node, sse, payload, prefix, delivered, flush=False)
            if not events.ended:  # else [DONE] goes out with them, below
                await sse.flush()
        await sse.done()
    except StreamBroken as exc:
        # The node died after tokens reached the client: end the stream with an error, charge what was delivered.
        log.warning("%s", exc)
        await events.aclose()
        _mark_node(state, node, exc)
        await _settle_delivered(state, paid, node, delivered, "broken", str(exc))
        message = "the node serving this stream failed; you were charged only for the tokens delivered"
        with suppress(ConnectionError):
            await sse.send(error_body(message, type="server_error", code="node_failed"))
            await sse.done()
    except (ConnectionError, asyncio.CancelledError) as exc:
        # The client cut the stream: closing the node's stream stops its generation.
        await events.aclose()
        await _settle_delivered(state, paid, node, delivered, "cut", "the client closed the stream")
        if isinstance(exc, asyncio.CancelledError):
            raise
        return sse.response
    await _settle_delivered(state, paid, node, delivered, "ok", None)  # only if the node sent no usage
    return sse.response


async def _settle_delivered(
    state: RouterState, paid: PaidRequest, node: HerdNode, delivered: dict[str, int], status: str, error: str | None
) -> None:
    if paid.closed:
        return
    if delivered["completion_tokens"] == 0:
        await _refund(state, paid, status=status, error=error)
    else:
        await _settle(state, paid, node, delivered["prompt_tokens"], delivered["completion_tokens"], status, error)


async def _forward(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode,
    sse: SseWriter,
    payload: bytes,
    prefix: bytes,
    delivered: dict[str, int],
    *,
    flush: bool = True,
) -> None:
    token = token_chunk(payload, prefix)
    if token is not None:  # the common case: the node's bytes, passed on without their counts
        _pass_token(state, paid, sse, token, delivered)
        if flush:
            await sse.flush()
        return
    event = parse_event(node, payload)
    _transcribe(paid)  # what came before this event first
    counts = event.pop("llamakit", None)
    same = counts is None and event.get("id") == paid.id
    event["id"] = paid.id
    usage = event.get("usage")
    if usage:
        charge = settle_amount(paid.fees, paid.bid, usage["prompt_tokens"], usage["completion_tokens"], paid.held)
        charge = await _settle(
            state,
            paid,
            node,
            usage["prompt_tokens"],
            usage["completion_tokens"],
            "ok",
            remember=_remember_stream(state, paid, node, usage, charge),
            usage=usage,
        )  # fmt: skip  (what it cost: nothing when its hold went back while it ran, see _hold_gone)
        _remember_prefix(state, paid, node, "".join(paid.transcript))
        if not paid.include_usage:
            if flush:
                await sse.flush()
            return
        event["usage"] = {**usage, **state.settings.money.cost_fields(charge)}
    elif "error" in event:
        raise StreamBroken(f"node {node.name} reported: {event['error'].get('message')}")
    if same and not usage:
        await sse.send_raw(payload, flush=flush)
    else:
        await sse.send(event, flush=flush)
    if counts is not None:
        delivered.update(counts)
        _first_token(state, paid)
    if paid.kept is not None:
        _transcribe_event(paid, event)


def _pass_token(
    state: RouterState, paid: PaidRequest, sse: SseWriter, token: tuple[bytes, int, int], delivered: dict[str, int]
) -> None:
    """Queue a token chunk (see upstream.token_chunk) for the client, and count what it delivered."""
    chunk, prompt_tokens, completion_tokens = token
    sse.queue_raw(chunk)
    delivered["prompt_tokens"], delivered["completion_tokens"] = prompt_tokens, completion_tokens
    _first_token(state, paid)
    if paid.kept is not None:
        paid.kept.append(chunk)
        if len(paid.kept) >= KEPT_CHUNKS:
            _transcribe(paid)


def _chunk_prefix(paid: PaidRequest) -> bytes:
    """How the JSON of a chunk that the client may get as the node wrote it starts: with this request's id."""
    return b'{"id":' + json.dumps(paid.id).encode() + b","


def _first_token(state: RouterState, paid: PaidRequest) -> None:
    if paid.first_token is None:
        paid.first_token = time.monotonic()
        state.metrics.first_token(paid.model, paid.first_token - paid.arrived)


def _transcribe(paid: PaidRequest) -> None:
    """Read the chunks kept since the last time into the transcript, in one parse."""
    if paid.kept:
        for event in jsontext.loads(b"[" + b",".join(paid.kept) + b"]"):
            _transcribe_event(paid, event)
        paid.kept.clear()


def _transcribe_event(paid: PaidRequest, event: dict[str, Any]) -> None:
    for choice in event.get("choices") or ():
        piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        if piece:
            paid.transcript.append(piece)
        for call in (choice.get("delta") or {}).get("tool_calls") or ():
            _merge_tool_call(paid.tool_calls, call)
        if choice.get("finish_reason"):
            paid.finish_reason = choice["finish_reason"]


def _remember_stream(
    state: RouterState, paid: PaidRequest, node: HerdNode, usage: dict[str, Any], charge: int
) -> Remembered | None:
    """The whole answer a stream delivered, in the shape of a plain answer, for a retry to be given."""
    if paid.claim is None:
        return None
    money = state.settings.money
    total = Usage(**{**usage, **money.cost_fields(charge)})
    text = "".join(paid.transcript)
    if paid.path.endswith("/chat/completions"):
        calls = [paid.tool_calls[i] for i in sorted(paid.tool_calls)] or None
        body = chat_completion_body(
            id=paid.id, model=paid.model, text=None if calls and not text else text,
            finish_reason=paid.finish_reason, usage=total, tool_calls=calls,
        )  # fmt: skip
    else:
        body = completion_body(id=paid.id, model=paid.model, text=text, finish_reason=paid.finish_reason, usage=total)
    return paid.claim.remember(body, {**_headers(state, paid, node), **cost_headers(money, charge)})


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Accumulate one streamed tool-call delta as OpenAI's clients do: by `index`, `arguments` concatenated."""
    index = delta.get("index", 0)
    call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = delta.get("id") or call["id"]
    function = delta.get("function") or {}
    call["function"]["name"] = function.get("name") or call["function"]["name"]
    call["function"]["arguments"] += function.get("arguments") or ""


def _record(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode | None,
    status: str,
    prompt: int,
    completion: int,
    cost: int,
    error: str | None,
    http_status: int | None = None,
) -> None:
    now = time.monotonic()
    latency_ms = (now - paid.arrived) * 1000
    record = {
        "time": time.time(),
        "request_id": paid.id,
        "account": paid.account.name,
        "model": paid.model,
        "node": node.name if node is not None else None,
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        **state.settings.money.cost_fields(cost),
        "currency": state.settings.money.currency,
        "held": paid.held,
        "bid": format_bid(paid.bid),
        "latency_ms": round(latency_ms, 3),
        "queue_ms": None if paid.queue_ms is None else round(paid.queue_ms, 3),
        "ttft_ms": None if paid.first_token is None else round((paid.first_token - paid.arrived) * 1000, 3),
        "error": error,
        "user": paid.user,
        "key_prefix": paid.key_prefix,
        "http_status": http_status,
    }
    state.requests.add(record)
    paid.admission.finish(prompt + completion)
    state.metrics.finished(paid.model, status)
    generating = now - paid.dispatched if paid.dispatched is not None else 0.0
    state.metrics.observe_request(paid.model, latency_ms / 1000, completion, generating)
    if state.usage_log is not None:
        state.usage_log.write(record)


async def _settle(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode,
    prompt_tokens: int,
    completion_tokens: int,
    status: str,
    error: str | None = None,
    *,
    remember: Remembered | None = None,
    usage: dict[str, Any] | None = None,
) -> int:
    # Claimed before the ledger is awaited, so no other path closes this hold too; shielded, so a client that
    # leaves while the ledger commits cuts neither the settlement nor its bookkeeping short.
    paid.closed = True
    return await asyncio.shield(
        _settled(state, paid, node, prompt_tokens, completion_tokens, status, error, remember, usage)
    )


async def _settled(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode,
    prompt_tokens: int,
    completion_tokens: int,
    status: str,
    error: str | None,
    remember: Remembered | None,
    usage: dict[str, Any] | None,
) -> int:
    charge = settle_amount(paid.fees, paid.bid, prompt_tokens, completion_tokens, paid.held)
    latency_ms = (time.monotonic() - paid.arrived) * 1000
    try:
        settlement = await state.ledger.settle(
            paid.id,
            charge=charge,
            node=node.name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            status=status,
            latency_ms=latency_ms,
            queue_ms=paid.queue_ms,
            error=error,
            remember=remember,
        )
    except HoldClosed as exc:
        _hold_gone(paid, exc)
        _record(state, paid, node, "router_lost", prompt_tokens, completion_tokens, 0, str(exc))
        return 0  # the work is done and the client gets it; the hold it was bought with went back in full
    except LedgerError:
        # The database failed to settle: the client still gets its answer, free, and the hold goes back in full
        # once the database answers again (nothing was charged: the settlement is one transaction).
        log.exception("request %s: its settlement failed; releasing its hold in full", paid.id)
        _release_later(state, paid, "the settlement failed: the database could not be written")
        _record(state, paid, node, "error", prompt_tokens, completion_tokens, 0, "the settlement failed")
        return 0
    node.record(completion_tokens, settlement.charged, whole=status != "broken")
    state.metrics.settled(
        paid.model, node.name, prompt_tokens, completion_tokens, settlement.charged, _cached_tokens(usage)
    )
    _record(state, paid, node, status, prompt_tokens, completion_tokens, settlement.charged, error)
    return settlement.charged


def _cached_tokens(usage: dict[str, Any] | None) -> int:
    """`usage.prompt_tokens_details.cached_tokens` as the node reported it; 0 when absent or malformed."""
    details = (usage or {}).get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached > 0 else 0


def _answer_text(answer: dict[str, Any]) -> str:
    """The text of a node's whole answer (chat or completion); empty when its shape is unexpected."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


async def _refund(
    state: RouterState, paid: PaidRequest, *, status: str, error: str | None, http_status: int | None = None
) -> None:
    if paid.closed:
        return
    paid.closed = True  # claimed before the await, as in _settle
    await asyncio.shield(_released(state, paid, status=status, error=error, http_status=http_status))


async def _released(
    state: RouterState, paid: PaidRequest, *, status: str, error: str | None, http_status: int | None
) -> None:
    try:
        await state.ledger.release(paid.id, status=status, error=error, queue_ms=paid.queue_ms, http_status=http_status)
    except HoldClosed as exc:
        _hold_gone(paid, exc)
        status, error, http_status = "router_lost", str(exc), None
    except LedgerError:
        # The database failed: the hold is released once it answers again. The client still gets the error its
        # request met, not this one.
        log.exception("request %s: its hold could not be released now; trying again", paid.id)
        _release_later(state, paid, error or "refunded")
    _record(state, paid, None, status, 0, 0, 0, error, http_status)


_RELEASING: set[asyncio.Task[None]] = set()  # holds being released after a database failure (kept referenced)


def _release_later(state: RouterState, paid: PaidRequest, error: str) -> None:
    """Release the hold of `paid` in full in the background, asking again (1 s, doubling to 60 s) while the
    database fails. Without it a hold would stay open while this router runs: with several routers, only a
    router whose lease ran out has its holds released by the others. A restart releases it too (recovery)."""

    async def release() -> None:
        pause = 1.0
        while True:
            await asyncio.sleep(pause)
            try:
                await state.ledger.release(paid.id, status="error", error=error, queue_ms=paid.queue_ms)
                log.info("request %s: its hold was released after the database came back", paid.id)
                return
            except HoldClosed:
                return  # closed meanwhile (another router's clean-up, or the first try committed after all)
            except LedgerError as exc:
                log.warning("request %s: releasing its hold failed again (%s)", paid.id, exc)
            pause = min(pause * 2, 60.0)

    task = asyncio.ensure_future(release())
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)


def _hold_gone(paid: PaidRequest, exc: HoldClosed) -> None:
    """The request's hold was closed behind this router's back: with several routers, another one released it
    because this router's lease ran out (a pause longer than --lease; see cluster.py), with a usage record of
    its own. Nothing is charged, and the client still gets what was made for it rather than a 500."""
    log.warning("request %s: %s (released by another router while this one's lease had run out?); not charged",
                paid.id, exc)  # fmt: skip
