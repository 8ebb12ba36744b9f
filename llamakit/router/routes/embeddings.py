"""`POST /v1/embeddings` on the router: priced per input token like a prompt (`quote.quote_embeddings`), held,
queued for a node slot like any request (bids apply), settled on the node's exact `usage.prompt_tokens`,
refunded in full when it fails: the paid path's, as every paid endpoint's (`paid.endpoint.paid_call`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamakit.router.ledger import Remembered
from llamakit.router.limits import Caller
from llamakit.router.openapi import Operation, documented
from llamakit.router.paid.endpoint import Order, paid_call
from llamakit.router.paid.idempotency import Claim, Idempotency, replay
from llamakit.router.paid.quote import EMBEDDINGS_PATH, quote_embeddings
from llamakit.router.paid.request import PaidRequest
from llamakit.router.state import STATE
from llamakit.router.tracing import RequestTrace
from llamakit.wire.answers import CreateEmbeddingResponse
from llamakit.wire.embeddings import EmbeddingRequest, parse_embedding_request

__all__ = ["embedding_routes"]

embedding_routes = web.RouteTableDef()


@embedding_routes.post(EMBEDDINGS_PATH)
@documented(Operation(summary="Embeddings, paid: priced per input token like a prompt", auth="api_key",
                      answer=CreateEmbeddingResponse, body=EmbeddingRequest, paid=True))  # fmt: skip
async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]

    def order(caller: Caller, data: dict[str, Any]) -> Order:
        Idempotency.key_of(request)  # a malformed key is refused before the body is validated
        req = parse_embedding_request(data)

        async def quote(claim: Claim | None, trace: RequestTrace) -> PaidRequest:
            return await quote_embeddings(state, request, caller, req, data, claim, trace)

        async def again(remembered: Remembered, trace: RequestTrace) -> web.StreamResponse:
            money = state.settings.money
            return await replay(request, remembered, money, trace=trace, stream=False, include_usage=False)

        return Order(quote=quote, replay=again)

    return await paid_call(request, EMBEDDINGS_PATH, order)
