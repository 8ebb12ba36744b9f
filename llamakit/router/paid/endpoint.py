"""Every paid endpoint (chat and text completions, embeddings, Responses) goes through `paid_call`: refuse while
the ledger cannot be written (see ledger_gate.py), authenticate the API key, read the JSON body, let the endpoint
validate it into an `Order`, answer once per idempotency key, quote and hold, serve. A refusal of a known account
before anything was held gets its usage record here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from llamakit.money.fees import format_bid
from llamakit.router.auth import authenticate
from llamakit.router.errors import http_error
from llamakit.router.ledger import LedgerError, LedgerUnavailable, Remembered
from llamakit.router.limits import Caller
from llamakit.router.paid.idempotency import Claim, once
from llamakit.router.paid.record import publish, refusal_record
from llamakit.router.paid.request import PaidRequest, new_request_id
from llamakit.router.paid.serve import serve
from llamakit.router.state import STATE, RouterState
from llamakit.router.tracing import RequestTrace
from llamakit.wire.completions import parse_json
from llamakit.wire.errors import ApiError
from llamakit.wire.headers import REQUEST_ID_HEADER

__all__ = ["RECORDED_REFUSALS", "Order", "paid_call", "record_refusal"]

log = logging.getLogger(__name__)

# Refusals of a known account that get a usage record (when no hold was made, so none exists yet).
RECORDED_REFUSALS = frozenset({400, 402, 403, 404, 429})


@dataclass
class Order:
    """What an endpoint asks of the paid path, once it has validated the request:

    - `quote(claim, trace)` holds the most it can cost and returns the PaidRequest (its `present` and `open_sse`
      say how the answer reaches the client), timed and traced by `trace`;
    - `replay(remembered, trace)` answers a repeat under the same idempotency key with the answer remembered,
      its `X-Llamakit-Overhead-Ms` the router's own time on the repeat as `trace` tells it.
    """

    quote: Callable[[Claim | None, RequestTrace], Awaitable[PaidRequest]]
    replay: Callable[[Remembered, RequestTrace], Awaitable[web.StreamResponse]]


async def paid_call(
    request: web.Request, path: str, order: Callable[[Caller, dict[str, Any]], Order]
) -> web.StreamResponse:
    """Serve a paid route: authenticate, parse the JSON body, `order(caller, body)` (which validates it: 400s),
    then once per idempotency key: quote, hold and serve. `path` is the route (an idempotency key's answer is
    for one route and body)."""
    state = request.config_dict[STATE]
    # The request's clock (its overhead) and, with tracing on, its span, under the client's traceparent.
    trace = RequestTrace(state.tracing, headers=request.headers, name=f"{request.method} {request.path}")
    status, code = 500, None
    try:
        answer = await _paid_call(state, request, path, order, trace)
        status = answer.status
        return answer
    except Exception as exc:
        error = http_error(exc)
        if error is not None:
            status, code = error.status, error.code or error.type
        raise
    finally:
        trace.finish(status, code)


async def _paid_call(
    state: RouterState,
    request: web.Request,
    path: str,
    order: Callable[[Caller, dict[str, Any]], Order],
    trace: RequestTrace,
) -> web.StreamResponse:
    state.gate.check()  # 503 ledger_unavailable while the ledger cannot be written: before anything is held
    with trace.span("llamakit.authenticate"):
        caller = await authenticate(request)
    trace.set({"llamakit.account.id": caller.account.id})
    data: dict[str, Any] = {}
    held = False

    async def run(claim: Claim | None) -> web.StreamResponse:
        nonlocal held
        paid = await placed.quote(claim, trace)
        held = True  # from here the paid path records the request whatever happens
        return await serve(state, request, paid)

    try:
        data = parse_json(await request.read())
        placed = order(caller, data)
        return await once(
            request, state.idempotency, caller.account.id, path, trace=trace, run=run, replay=placed.replay
        )
    except Exception as exc:
        answer = http_error(exc)
        if answer is not None and not held and answer.status in RECORDED_REFUSALS:
            await record_refusal(state, caller, answer, data)
            if answer is not exc:
                raise answer from exc
        raise


async def record_refusal(
    state: RouterState, caller: Caller, exc: ApiError, data: dict[str, Any], *, bid: Decimal = Decimal(1)
) -> None:
    """A usage record (no tokens, no cost) of a request refused before anything was held (`data` its body), under
    a request id the error response names, and a line in the dashboard's latest requests. `bid` is the record's
    (a batch line's: its batch's discount)."""
    request_id = exc.headers.get(REQUEST_ID_HEADER) or new_request_id()
    exc.headers[REQUEST_ID_HEADER] = request_id
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    models = data.get("models")
    if not model and isinstance(models, list) and models and isinstance(models[0], str):
        model = models[0]  # fallbacks without `model`: the first named
    user = data.get("user") if isinstance(data.get("user"), str) else None
    status = exc.code or exc.type
    account = caller.account
    try:
        await state.ledger.refuse(
            account.id, request_id=request_id, model=str(model), status=status, http_status=exc.status,
            error=exc.message, user=user, key_prefix=caller.key.prefix, bid=bid,
        )  # fmt: skip
    except LedgerUnavailable as failure:
        state.gate.failed(failure)  # said once; the client still gets the refusal its request met
    except (LedgerError, ValueError):
        log.exception("could not record the refusal of %s", request_id)
    record = refusal_record(
        state.settings.money, request_id=request_id, account=account.name, model=str(model), status=status,
        http_status=exc.status, error=exc.message, user=user, key_prefix=caller.key.prefix, bid=format_bid(bid),
    )  # fmt: skip
    publish(state, record)
