"""`POST /v1/responses` on the router: OpenAI's Responses API served as a chat completion.

The request is translated to a chat completion (`wire.responses.chat_body`) and goes down the paid path as one
(`paid.endpoint.paid_call`, `paid.quote.quote_generation`): priced, held, queued with its bid, failed over, settled
on the node's exact usage or refunded, exactly like a chat completion. Only the answer's shape differs: the
PaidRequest presents a whole answer as a Response object, and writes a stream as Responses events with
`ResponsesSseWriter` in place of the chat SSE writer. The chat answer is what is remembered under an
`Idempotency-Key`; a repeat gets it in the Responses shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamakit import jsontext
from llamakit.router.auth import authenticate
from llamakit.router.ledger import Remembered
from llamakit.router.limits import Caller
from llamakit.router.openapi import Operation, documented
from llamakit.router.paid.endpoint import Order, paid_call
from llamakit.router.paid.idempotency import Claim, Idempotency, recall_answer, without_cost_headers
from llamakit.router.paid.quote import quote_generation
from llamakit.router.paid.request import PaidRequest
from llamakit.router.routes.openai import CHAT_PATH
from llamakit.router.state import STATE, RouterState
from llamakit.router.tracing import RequestTrace
from llamakit.web import SseWriter, json_response
from llamakit.wire.answers import Response, ResponseStreamEvent
from llamakit.wire.completions import ChatCompletionRequest, validate_request
from llamakit.wire.errors import ApiError
from llamakit.wire.responses import (
    ResponseEvents,
    ResponsesRequest,
    chat_body,
    chat_chunks,
    parse_responses_request,
    response_from_chat,
)

__all__ = ["PATH", "ResponsesSseWriter", "response_routes"]

PATH = "/v1/responses"

response_routes = web.RouteTableDef()


class ResponsesSseWriter(SseWriter):
    """Writes chat chunks, as the service sends them, as Responses events (`event:` and `data:` lines, as
    OpenAI sends them); no `[DONE]` at the end, as OpenAI sends none on this route."""

    events: ResponseEvents

    @classmethod
    async def start(cls, request: web.Request, headers: dict[str, str], events: ResponseEvents) -> ResponsesSseWriter:
        writer = await cls.open(request, headers)
        assert isinstance(writer, ResponsesSseWriter)
        writer.events = events
        await writer._write(events.opening())
        return writer

    async def send(self, data: dict[str, Any], *, flush: bool = True) -> None:
        await self._write(self.events.feed(data), flush=flush)

    async def send_raw(self, data: bytes, *, flush: bool = True) -> None:
        await self.send(jsontext.loads(data), flush=flush)

    def queue_raw(self, data: bytes) -> None:
        self._queue(self.events.feed(jsontext.loads(data)))

    async def done(self) -> None:
        """The events that end the response and the end of the body, in one write (no `[DONE]`)."""
        self._queue(self.events.closing())
        events = b"".join(self._pending)
        self._pending.clear()
        await self.response.write_eof(events)

    async def _write(self, events: list[dict[str, Any]], *, flush: bool = True) -> None:
        self._queue(events)
        if flush:
            await self.flush()

    def _queue(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            data = jsontext.dumps(event)
            self._pending.append(b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n")


def _response_id(request_id: str) -> str:
    """The Response's id for the router's request id (`req-<hex>` → `resp_<hex>`), the same on a replay."""
    return "resp_" + request_id.removeprefix("req-")


@response_routes.post(PATH)
@documented(Operation(summary="OpenAI's Responses API, paid: served as a chat completion", auth="api_key",
                      answer=Response, body=ResponsesRequest, stream=ResponseStreamEvent, stream_done=False,
                      paid=True))  # fmt: skip
async def responses(request: web.Request) -> web.StreamResponse:
    state = request.config_dict[STATE]

    def order(caller: Caller, raw_data: dict[str, Any]) -> Order:
        Idempotency.key_of(request)  # a malformed key is refused before the body is validated
        req = parse_responses_request(raw_data)
        limit = state.settings.max_tokens_limit
        if req.max_output_tokens is not None and req.max_output_tokens > limit:
            raise ApiError(
                400,
                f"max_output_tokens is {req.max_output_tokens}; the most this router allows is {limit}",
                param="max_output_tokens",
                code="invalid_value",
            )
        data = chat_body(req, stream=req.stream)
        chat = validate_request(ChatCompletionRequest, data)

        async def quote(claim: Claim | None, trace: RequestTrace) -> PaidRequest:
            paid = await quote_generation(state, request, caller, chat, data, CHAT_PATH, claim, trace)
            _present_as_response(paid, req)
            return paid

        async def again(remembered: Remembered, trace: RequestTrace) -> web.StreamResponse:
            return await _replay(request, state, req, remembered, trace)

        return Order(quote=quote, replay=again)

    return await paid_call(request, PATH, order)


def _present_as_response(paid: PaidRequest, req: ResponsesRequest) -> None:
    """The chat answer reaches the client as a Response object, or its stream as Responses events."""
    response_id = _response_id(paid.id)
    if req.stream:
        events = ResponseEvents(req, response_id=response_id, model=paid.model)

        async def open_sse(request: web.Request, headers: dict[str, str]) -> SseWriter:
            events.model = paid.model  # the model that serves it: a fallback's when the first was passed over
            return await ResponsesSseWriter.start(request, headers, events)

        paid.open_sse = open_sse
    else:
        paid.present = lambda answer: _with_passed_over(
            response_from_chat(req, answer, response_id=response_id), answer
        )


def _with_passed_over(response: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A Response of a request that named `models` says which were passed over, as the chat answer does."""
    if "passed_over" in answer:
        response["passed_over"] = answer["passed_over"]
    return response


@response_routes.get(PATH + "/{response_id}")
@documented(Operation(summary="Always 404: llamakit keeps no responses", auth="api_key", answer=Response,
                      errors=(404,)))  # fmt: skip
async def retrieve(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}` (the openai client's `responses.retrieve`): nothing is kept, so always 404."""
    await authenticate(request)
    raise ApiError(
        404,
        f"response {request.match_info['response_id']!r} cannot be retrieved: llamakit does not keep responses",
        type="not_found_error",
        code="not_found",
    )


async def _replay(
    request: web.Request, state: RouterState, req: ResponsesRequest, remembered: Remembered, trace: RequestTrace
) -> web.StreamResponse:
    """A repeat's answer: the remembered chat answer in the Responses shape, whole or streamed as it asks."""
    answer, headers = recall_answer(remembered, state.settings.money, overhead_ms=trace.overhead_ms())
    response_id = _response_id(str(answer.get("id", "")))
    if not req.stream:
        response = _with_passed_over(response_from_chat(req, answer, response_id=response_id), answer)
        return json_response(response, headers=headers)
    events = ResponseEvents(req, response_id=response_id, model=str(answer.get("model") or ""))
    sse = await ResponsesSseWriter.start(request, without_cost_headers(headers), events)
    for chunk in chat_chunks(answer):
        await sse.send(chunk)
    await sse.done()
    return sse.response
