"""The router's public API (Bearer API key): OpenAI-compatible completions and models, plus accounts and events.

`GET /v1/info` needs no key: like the AO herder's Info, it tells anyone the fees, queue lengths and the last
multiplier, so a client can decide what to bid before paying.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web
from pydantic import Field

from llamakit.money.fees import format_bid
from llamakit.router.auth import authenticate
from llamakit.router.ledger import MAX_PAGE, Remembered, UsageRecord
from llamakit.router.limits import Caller, key_view
from llamakit.router.openapi import Operation, documented
from llamakit.router.paid.endpoint import Order, paid_call
from llamakit.router.paid.idempotency import Claim, Idempotency, replay
from llamakit.router.paid.quote import quote_generation
from llamakit.router.paid.request import PaidRequest
from llamakit.router.routes.answers import (
    CurrentKey,
    EventCreated,
    EventList,
    Info,
    ModelEntry,
    ModelList,
    NewEvent,
    TenantAccount,
    UsagePage,
    parse_body,
)
from llamakit.router.routes.query import QueryModel, parse_query
from llamakit.router.routes.usage_pages import UsageParams, usage_page, usage_query
from llamakit.router.state import STATE, RouterState
from llamakit.router.tracing import RequestTrace
from llamakit.web import bearer_token, json_response
from llamakit.wire.answers import ChatCompletion, ChatCompletionChunk, TextCompletion, TextCompletionChunk
from llamakit.wire.completions import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_json,
    validate_request,
)
from llamakit.wire.errors import ApiError

__all__ = ["CHAT_PATH", "COMPLETIONS_PATH", "routes"]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def _generation(
    request: web.Request, model: type[GenerationRequest], path: str
) -> Callable[[Caller, dict[str, Any]], Order]:
    """A chat or text completion's order for the paid path: validated here, quoted at `quote_generation`."""
    state = request.config_dict[STATE]

    def order(caller: Caller, data: dict[str, Any]) -> Order:
        Idempotency.key_of(request)  # a malformed key is refused before the body is validated
        req = validate_request(model, data)

        async def quote(claim: Claim | None, trace: RequestTrace) -> PaidRequest:
            return await quote_generation(state, request, caller, req, data, path, claim, trace)

        async def again(remembered: Remembered, trace: RequestTrace) -> web.StreamResponse:
            money = state.settings.money
            return await replay(
                request, remembered, money, trace=trace, stream=req.stream, include_usage=req.include_usage
            )

        return Order(quote=quote, replay=again)

    return order


@routes.post("/v1/chat/completions")
@documented(Operation(summary="A chat completion, paid: held at its bid, queued, settled on exact tokens",
                      auth="api_key", answer=ChatCompletion, body=ChatCompletionRequest, stream=ChatCompletionChunk,
                      paid=True))  # fmt: skip
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await paid_call(request, CHAT_PATH, _generation(request, ChatCompletionRequest, CHAT_PATH))


@routes.post("/v1/completions")
@documented(Operation(summary="A text completion, paid", auth="api_key", answer=TextCompletion, body=CompletionRequest,
                      stream=TextCompletionChunk, paid=True))  # fmt: skip
async def completions(request: web.Request) -> web.StreamResponse:
    return await paid_call(request, COMPLETIONS_PATH, _generation(request, CompletionRequest, COMPLETIONS_PATH))


def _fees_and_prices(state: RouterState, model: str) -> dict[str, Any]:
    """A model's fees in credits, and the same as prices in the operator's currency (per million tokens)."""
    fees = state.prices.fees(model).to_dict()
    return {"fees": fees, "prices": state.settings.money.fee_prices(**fees)}


def _model_entry(state: RouterState, name: str) -> dict[str, Any]:
    nodes = state.herd.serving(name)
    return {
        "id": name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "llamakit",
        **_fees_and_prices(state, name),
        "batch_discount": str(state.settings.batch_discount),
        "nodes": sum(1 for n in nodes if n.state == "ready"),
        "slots": sum(n.slots for n in nodes if n.state == "ready"),
    }


@routes.get("/v1/models")
@documented(Operation(summary="The models served that the key may use, with their fees", auth="api_key",
                      answer=ModelList))  # fmt: skip
async def list_models(request: web.Request) -> web.Response:
    """The models served that the caller's key may use."""
    state = request.config_dict[STATE]
    limits = (await authenticate(request)).limits
    served = [m for m in state.herd.models() if limits.allows_model(m)]
    return json_response({"object": "list", "data": [_model_entry(state, m) for m in served]})


@routes.get("/v1/models/{model}")
@documented(Operation(summary="One model", auth="api_key", answer=ModelEntry, errors=(404,)))
async def retrieve_model(request: web.Request) -> web.Response:
    """One model, as OpenAI's `GET /v1/models/{model}` (the openai client's `models.retrieve`); 404
    `model_not_found` if unknown, or if the caller's key may not use it: as OpenAI answers for a model the key
    has no access to, and as `GET /v1/models` leaves it out."""
    state = request.config_dict[STATE]
    limits = (await authenticate(request)).limits
    name = request.match_info["model"]
    if name not in state.herd.models():
        message = f"model {name!r} does not exist here; GET /v1/models lists the models served"
    elif not limits.allows_model(name):
        message = f"this API key may not use model {name!r}; GET /v1/models lists the models it may use"
    else:
        return json_response(_model_entry(state, name))
    raise ApiError(404, message, type="not_found_error", code="model_not_found", param="model")


@routes.get("/v1/info")
@documented(Operation(summary="Fees, queue lengths and the last multiplier: what to bid (no key needed)", auth=None,
                      answer=Info))  # fmt: skip
async def info(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    models = state.known_models()
    # The herd's queue (every router's, with --cluster), so that a client out-bids all of it.
    depths = {m: 0 for m in models} | await state.dispatch.queue_depths()
    last = state.dispatch.last_multiplier
    return json_response(
        {
            "models": {
                m: {
                    **_fees_and_prices(state, m),
                    "queue_length": depths.get(m, 0),
                    "nodes": sum(1 for n in state.herd.serving(m) if n.state == "ready"),
                }
                for m in models
            },
            "fees": state.prices.to_dict(models),
            "batch_discount": str(state.settings.batch_discount),
            **state.settings.money.describe(),
            "queue_length": sum(depths.values()),
            "last_multiplier": float(last),
            "last_multiplier_exact": format_bid(last),
            "nodes": {
                "total": len(state.herd.nodes),
                "ready": sum(1 for n in state.herd.nodes.values() if n.state == "ready"),
            },
            "default_max_tokens": state.settings.default_max_tokens,
        }
    )


@routes.get("/v1/account")
@documented(Operation(summary="The caller's account (credits) and the key asking", auth="api_key",
                      answer=TenantAccount))  # fmt: skip
async def account(request: web.Request) -> web.Response:
    """The caller's account (balance, held, spent, deposited: credits) and, under `key`, the key asking."""
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    acct = caller.account
    books = await state.ledger.account_state(acct.id)
    key = await _key_now(request, caller)
    return json_response({"id": acct.id, "name": acct.name, "kind": acct.kind, **asdict(books), "key": key})


@routes.get("/v1/key")
@documented(Operation(summary="The key asking: its limits, spend and rates", auth="api_key", answer=CurrentKey))
async def current_key(request: web.Request) -> web.Response:
    """The API key asking: its prefix, limits, spend so far (credits) against its caps, and what this router
    counts towards its rate limits (`rates`). See `llamakit.router.limits.key_view`."""
    caller = await authenticate(request)
    return json_response({"account": caller.account.name, **await _key_now(request, caller)})


async def _key_now(request: web.Request, caller: Caller) -> dict[str, Any]:
    state = request.config_dict[STATE]
    found = await state.ledger.authenticate_key(bearer_token(request) or "")
    key = found[1] if found is not None else caller.key  # revoked since it was cached: as last seen
    # A key without a rate limit is not counted (limits.KeyRates.admit): no `rates` rather than zeros.
    return key_view(key, state.rates.use(caller.key_hash) if key.limits.rate_limited else None)


@routes.get("/v1/account/usage")
@documented(Operation(summary="The caller's usage records, newest first, paged", auth="api_key", answer=UsagePage,
                      query=UsageParams, errors=(400,)))  # fmt: skip
async def account_usage(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    acct = (await authenticate(request)).account
    query = usage_query(request)

    def fetch(limit: int, before: int | None) -> Awaitable[list[UsageRecord]]:
        return state.ledger.usage_records(acct.id, limit=limit, before=before, since=query.since, user=query.user)

    return json_response(await usage_page(query, fetch, state.settings.money))


@routes.post("/v1/events")
@documented(Operation(summary="Record an agent's outcome (buy, skip, error …)", auth="api_key", answer=EventCreated,
                      status=201, body=NewEvent, errors=(400,)))  # fmt: skip
async def post_event(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    acct = (await authenticate(request)).account
    event = parse_body(NewEvent, parse_json(await request.read()))
    try:
        event_id = await state.ledger.record_event(acct.id, event.kind, event.data)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="data") from exc
    return json_response({"id": event_id, "kind": event.kind}, status=201)


class EventsParams(QueryModel):
    """The query of `GET /v1/events`: the latest `limit` events, newest first."""

    limit: int = Field(default=100, ge=1, le=MAX_PAGE, description="events to return (0 is refused)")


@routes.get("/v1/events")
@documented(Operation(summary="The caller's latest events, newest first", auth="api_key", answer=EventList,
                      query=EventsParams, errors=(400,)))  # fmt: skip
async def list_events(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    acct = (await authenticate(request)).account
    params = parse_query(EventsParams, request)
    events = await state.ledger.events(acct.id, limit=params.limit)
    return json_response({"object": "list", "data": [asdict(e) for e in events]})
