"""`POST /v1/embeddings` on the router: priced per input token like a prompt, held, queued for a node slot like any
request (bids apply), settled on the node's exact `usage.prompt_tokens`, refunded in full when it fails.

The hold is `ceil(bid × (base_fee + prompt_token_fee × bound))`, where the bound is exact for token ids and
UTF-8 bytes plus an allowance for a text (see `EmbeddingRequest.token_bound`); there are no completion tokens.
From the hold on, the request is the service's like any other (`service.serve`): queue, failover, settlement,
refund, usage record, idempotency.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from llamakit.embeddings_protocol import EmbeddingRequest, parse_embedding_request
from llamakit.fees import hold_amount, parse_bid
from llamakit.protocol import ApiError, parse_json
from llamakit.router.api import RECORDED_REFUSALS, STATE, authenticate, record_refusal
from llamakit.router.idempotency import Claim, Idempotency, fingerprint, replay
from llamakit.router.ledger import Account, Remembered
from llamakit.router.service import BID_HEADER, PaidRequest, hold_credits, serve
from llamakit.router.state import RouterState

__all__ = ["PATH", "embedding_routes", "hold_model", "price_embeddings"]

PATH = "/v1/embeddings"

embedding_routes = web.RouteTableDef()


@embedding_routes.post(PATH)
async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    account = await authenticate(request)
    data: dict[str, Any] = {}
    try:
        data = parse_json(await request.read())
        return await _embeddings(request, state, account, data)
    except ApiError as exc:
        if exc.status in RECORDED_REFUSALS and not exc.recorded:  # as chat completions record theirs
            await record_refusal(state, account, exc, data)
        raise


async def _embeddings(
    request: web.Request, state: RouterState, account: Account, data: dict[str, Any]
) -> web.StreamResponse:
    raw = await request.read()
    key = Idempotency.key_of(request)
    req = parse_embedding_request(data)
    if key is None:
        return await serve(state, request, await price_embeddings(state, request, account, req, data))
    claimed = await state.idempotency.claim(account.id, key, fingerprint(PATH, raw))
    if isinstance(claimed, Remembered):
        return await replay(request, claimed, state.settings.money, stream=False, include_usage=False)
    try:
        return await serve(state, request, await price_embeddings(state, request, account, req, data, claimed))
    finally:
        state.idempotency.release(claimed)


def hold_model(state: RouterState, request: web.Request, model: str | None, bid: object) -> tuple[str, Any]:
    """The model a request names (or the default) and its validated bid (body field, else `X-Llamakit-Bid`):
    400 for a bad bid, 404 naming the models served for an unknown model, as for chat completions."""
    raw_bid: object = bid if bid is not None else request.headers.get(BID_HEADER, 1)
    try:
        parsed = parse_bid(raw_bid)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="bid", code="invalid_bid") from exc
    name = model or state.default_model()
    known = state.known_models()
    if name is None or name not in known:
        available = ", ".join(known) or "none (no node has joined yet)"
        raise ApiError(
            404,
            f"model {name!r} does not exist here; available models: {available}",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    return name, parsed


async def price_embeddings(
    state: RouterState,
    request: web.Request,
    account: Account,
    req: EmbeddingRequest,
    data: dict[str, Any],
    claim: Claim | None = None,
) -> PaidRequest:
    """Hold the most the embeddings can cost (402 with `needed` and `balance` when the balance is short)."""
    model, bid = hold_model(state, request, req.model, req.bid)
    fees = state.prices.fees(model)
    held = hold_amount(fees, bid, req.token_bound(), 0)
    request_id = await hold_credits(state, account, held, model=model, bid=bid, user=req.user)
    body = {k: v for k, v in data.items() if v is not None and k != "bid"}
    body["model"] = model
    return PaidRequest(
        id=request_id,
        account=account,
        model=model,
        path=PATH,
        body=body,
        bid=bid,
        fees=fees,
        held=held,
        stream=False,
        include_usage=False,
        arrived=time.monotonic(),
        claim=claim,
        user=req.user or None,
    )
