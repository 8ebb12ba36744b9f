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

from llamakit.money.fees import hold_amount
from llamakit.router.api import STATE, paid_request
from llamakit.router.idempotency import Claim, Idempotency, fingerprint, replay
from llamakit.router.ledger import Remembered
from llamakit.router.limits import Caller
from llamakit.router.service import PaidRequest, hold_credits, request_model, serve
from llamakit.router.state import RouterState
from llamakit.wire.embeddings import EmbeddingRequest, parse_embedding_request

__all__ = ["PATH", "embedding_routes", "price_embeddings"]

PATH = "/v1/embeddings"

embedding_routes = web.RouteTableDef()


@embedding_routes.post(PATH)
async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return await paid_request(request, lambda caller, data: _embeddings(request, state, caller, data))


async def _embeddings(
    request: web.Request, state: RouterState, caller: Caller, data: dict[str, Any]
) -> web.StreamResponse:
    raw = await request.read()
    key = Idempotency.key_of(request)
    req = parse_embedding_request(data)
    if key is None:
        return await serve(state, request, await price_embeddings(state, request, caller, req, data))
    claimed = await state.idempotency.claim(caller.account.id, key, fingerprint(PATH, raw))
    if isinstance(claimed, Remembered):
        return await replay(request, claimed, state.settings.money, stream=False, include_usage=False)
    try:
        return await serve(state, request, await price_embeddings(state, request, caller, req, data, claimed))
    finally:
        state.idempotency.release(claimed)


async def price_embeddings(
    state: RouterState,
    request: web.Request,
    caller: Caller,
    req: EmbeddingRequest,
    data: dict[str, Any],
    claim: Claim | None = None,
) -> PaidRequest:
    """Hold the most the embeddings can cost (402 with `needed` and `balance` when the balance is short, and
    the key's refusals of `hold_credits`)."""
    model, bid = request_model(state, request, req.model, req.bid)
    fees = state.prices.fees(model)
    bound = req.token_bound()
    held = hold_amount(fees, bid, bound, 0)
    request_id, admission = await hold_credits(state, caller, held, model=model, bid=bid, user=req.user, tokens=bound)
    body = {k: v for k, v in data.items() if v is not None and k != "bid"}
    body["model"] = model
    return PaidRequest(
        id=request_id,
        account=caller.account,
        admission=admission,
        key_prefix=caller.key.prefix,
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
