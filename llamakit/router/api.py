"""The router's public API (Bearer API key): OpenAI-compatible completions and models, plus accounts and events.

`GET /v1/info` needs no key: like the AO herder's Info, it tells anyone the fees, queue lengths and the last
multiplier, so a client can decide what to bid before paying.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from llamakit.money.fees import format_bid
from llamakit.router.idempotency import Idempotency, fingerprint, replay
from llamakit.router.ledger import LedgerError, Remembered, UsageRecord, hash_key
from llamakit.router.limits import Caller, key_view
from llamakit.router.service import new_request_id, price, serve
from llamakit.router.state import RouterState
from llamakit.router.usage_pages import MAX_ID, query_int, usage_page, usage_query
from llamakit.web import bearer_token, json_response
from llamakit.wire.completions import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_json,
    validate_request,
)
from llamakit.wire.errors import ApiError

__all__ = ["RECORDED_REFUSALS", "STATE", "authenticate", "paid_request", "record_refusal", "routes"]

STATE = web.AppKey("state", RouterState)

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


async def authenticate(request: web.Request) -> Caller:
    """The caller of a request: its API key's account and limits. 401 for a missing, unknown, revoked or
    expired key (`code` missing_api_key, invalid_api_key, expired_api_key)."""
    state = request.app[STATE]
    key = bearer_token(request)
    if key is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <your API key>'",
            type="authentication_error",
            code="missing_api_key",
        )
    now = time.time()
    caller = state.keys.get(key, now)
    if caller is None:
        found = await state.ledger.authenticate_key(key)
        if found is not None:
            caller = Caller(found[0], hash_key(key), found[1])
            state.keys.put(caller, now)
    if caller is None:
        raise ApiError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
    expires = caller.limits.expires_at
    if expires is not None and now >= expires:
        raise ApiError(
            401,
            f"the API key expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}; "
            "ask the operator for a new one",
            type="authentication_error",
            code="expired_api_key",
        )
    return caller


# Refusals of a known account that get a usage record (when no hold was made, so none exists yet).
RECORDED_REFUSALS = frozenset({400, 402, 403, 404, 429})


async def paid_request(
    request: web.Request, handle: Callable[[Caller, dict[str, Any]], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Serve a paid route: authenticate, parse the JSON body, and `handle(caller, body)`; a refusal of a known
    account that nothing was held for (RECORDED_REFUSALS) gets its usage record on the way out."""
    caller = await authenticate(request)
    data: dict[str, Any] = {}
    try:
        data = parse_json(await request.read())
        return await handle(caller, data)
    except ApiError as exc:
        if exc.status in RECORDED_REFUSALS and not exc.recorded:
            await record_refusal(request.app[STATE], caller, exc, data)
        raise


async def _generate(request: web.Request, model: type[GenerationRequest], path: str) -> web.StreamResponse:
    return await paid_request(request, lambda caller, data: _generate_for(request, caller, model, path, data))


async def record_refusal(state: RouterState, caller: Caller, exc: ApiError, data: dict[str, Any]) -> None:
    """A usage record (no tokens, no cost) of a request refused before anything was held, under a request id
    the error response names, and a line in the dashboard's latest requests."""
    request_id = exc.headers.get("X-Llamakit-Request-Id") or new_request_id()
    exc.headers["X-Llamakit-Request-Id"] = request_id
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    user = data.get("user") if isinstance(data.get("user"), str) else None
    status = exc.code or exc.type
    account = caller.account
    try:
        await state.ledger.refuse(
            account.id, request_id=request_id, model=str(model), status=status, http_status=exc.status,
            error=exc.message, user=user, key_prefix=caller.key.prefix,
        )  # fmt: skip
    except (LedgerError, ValueError):
        log.exception("could not record the refusal of %s", request_id)
    exc.recorded = True
    money = state.settings.money
    record = {
        "time": time.time(), "request_id": request_id, "account": account.name, "model": model, "node": None,
        "status": status, "http_status": exc.status, "prompt_tokens": 0, "completion_tokens": 0,
        **money.cost_fields(0), "currency": money.currency, "held": 0, "bid": "1", "latency_ms": None,
        "queue_ms": None, "ttft_ms": None, "error": exc.message, "user": user, "key_prefix": caller.key.prefix,
    }  # fmt: skip
    state.requests.add(record)
    if state.usage_log is not None:
        state.usage_log.write(record)


async def _generate_for(
    request: web.Request, caller: Caller, model: type[GenerationRequest], path: str, data: dict[str, Any]
) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    key = Idempotency.key_of(request)
    req = validate_request(model, data)
    if key is None:
        return await serve(state, request, await price(state, request, caller, req, data, path))
    claimed = await state.idempotency.claim(caller.account.id, key, fingerprint(path, raw))
    if isinstance(claimed, Remembered):
        return await replay(request, claimed, state.settings.money, stream=req.stream, include_usage=req.include_usage)
    try:
        return await serve(state, request, await price(state, request, caller, req, data, path, claimed))
    finally:
        state.idempotency.release(claimed)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, ChatCompletionRequest, "/v1/chat/completions")


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CompletionRequest, "/v1/completions")


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
        "nodes": sum(1 for n in nodes if n.state == "ready"),
        "slots": sum(n.slots for n in nodes if n.state == "ready"),
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """The models served that the caller's key may use."""
    state = request.app[STATE]
    limits = (await authenticate(request)).limits
    served = [m for m in state.herd.models() if limits.allows_model(m)]
    return json_response({"object": "list", "data": [_model_entry(state, m) for m in served]})


@routes.get("/v1/models/{model}")
async def retrieve_model(request: web.Request) -> web.Response:
    """One model, as OpenAI's `GET /v1/models/{model}` (the openai client's `models.retrieve`); 404
    `model_not_found` if unknown, or if the caller's key may not use it: as OpenAI answers for a model the key
    has no access to, and as `GET /v1/models` leaves it out."""
    state = request.app[STATE]
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
async def info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = state.known_models()
    depths = {m: state.scheduler.queue_length(m) for m in models}
    last = state.scheduler.last_multiplier
    if state.cluster is not None:  # several routers: the herd's queue, so that a client out-bids all of it
        depths = {m: 0 for m in models} | await state.cluster.queue_depths()
        last = state.cluster.last_multiplier
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
async def account(request: web.Request) -> web.Response:
    """The caller's account (balance, held, spent, deposited: credits) and, under `key`, the key asking."""
    state = request.app[STATE]
    caller = await authenticate(request)
    acct = caller.account
    books = await state.ledger.account_state(acct.id)
    key = await _key_now(request, caller)
    return json_response({"id": acct.id, "name": acct.name, "kind": acct.kind, **asdict(books), "key": key})


@routes.get("/v1/key")
async def current_key(request: web.Request) -> web.Response:
    """The API key asking: its prefix, limits, spend so far (credits) against its caps, and what this router
    counts towards its rate limits (`rates`). See `llamakit.router.limits.key_view`."""
    caller = await authenticate(request)
    return json_response({"account": caller.account.name, **await _key_now(request, caller)})


async def _key_now(request: web.Request, caller: Caller) -> dict[str, Any]:
    state = request.app[STATE]
    found = await state.ledger.authenticate_key(bearer_token(request) or "")
    key = found[1] if found is not None else caller.key  # revoked since it was cached: as last seen
    return key_view(key, state.rates.use(caller.key_hash))


@routes.get("/v1/account/usage")
async def account_usage(request: web.Request) -> web.Response:
    state = request.app[STATE]
    acct = (await authenticate(request)).account
    query = usage_query(request)

    def fetch(limit: int, before: int | None) -> Awaitable[list[UsageRecord]]:
        return state.ledger.usage_records(acct.id, limit=limit, before=before, since=query.since, user=query.user)

    return json_response(await usage_page(query, fetch, state.settings.money))


@routes.post("/v1/events")
async def post_event(request: web.Request) -> web.Response:
    state = request.app[STATE]
    acct = (await authenticate(request)).account
    body = parse_json(await request.read())
    kind = body.get("kind")
    data = body.get("data", {})
    if not isinstance(kind, str) or not kind:
        raise ApiError(400, "an event needs a 'kind' string such as 'buy', 'skip' or 'error'", param="kind")
    if not isinstance(data, dict):
        raise ApiError(400, "an event's 'data' must be a JSON object", param="data")
    try:
        event_id = await state.ledger.record_event(acct.id, kind, data)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="data") from exc
    return json_response({"id": event_id, "kind": kind}, status=201)


@routes.get("/v1/events")
async def list_events(request: web.Request) -> web.Response:
    state = request.app[STATE]
    acct = (await authenticate(request)).account
    limit = query_int(request, "limit", 0, MAX_ID) or 100
    events = await state.ledger.events(acct.id, limit=limit)
    return json_response({"object": "list", "data": [asdict(e) for e in events]})
