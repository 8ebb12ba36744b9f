"""A paid stream: opened on a node (failing over until its first token), passed on to the client token by token,
settled on the node's usage chunk, or on what it delivered when it is cut or broken; what it has delivered so far
is checkpointed in the ledger as it goes (checkpoint.py), for a crash of the router.

A node's token chunks carry running counts (`wire.node`); the relay finds them at the end of the bytes and passes
the rest on as the node wrote it, without parsing the JSON. Events that arrived in one read leave in one write.
The text a stream delivered is needed only for idempotency and affinity: its chunks are kept as bytes and read in
one parse when the stream settles (or every KEPT_CHUNKS chunks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from llamakit import jsontext
from llamakit.router.errors import ClientGone
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import Remembered
from llamakit.router.paid.checkpoint import Checkpoints
from llamakit.router.paid.request import Bill, PaidRequest
from llamakit.router.paid.settle import settle, settle_delivered
from llamakit.router.paid.slot import (
    CLIENT_POLL_SECONDS,
    answer_headers,
    begin_call,
    client_gone,
    end_call,
    failed_over,
    first_token,
    free_slot,
    mark_failed,
    no_node_left,
    remember_prefix,
    take_slot,
)
from llamakit.router.pricing import cost_headers
from llamakit.router.state import RouterState
from llamakit.router.upstream import EventStream, NodeFailed, StreamBroken, parse_event, token_chunk
from llamakit.web import SseWriter
from llamakit.wire.completions import Usage, chat_completion_body, completion_body
from llamakit.wire.errors import error_body
from llamakit.wire.headers import OVERHEAD_HEADER
from llamakit.wire.node import TokenCounts

__all__ = ["KEPT_CHUNKS", "serve_stream"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

KEPT_CHUNKS = 256  # chunks of a stream kept unread for its transcript, at most
_NOTHING = TokenCounts(0, 0)  # what a stream has delivered before its first token


@dataclass
class Transcript:
    """What a stream delivered, kept so that its answer can be remembered under the idempotency key and its prefix
    for affinity: the chunks relayed as the node wrote them (`kept` is None when neither is wanted), read into
    text, tool calls and the finish reason in one parse now and then (`read`), not one by one."""

    kept: list[bytes] | None
    pieces: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by the stream's `index`
    finish_reason: str = "stop"

    def keep(self, chunk: bytes) -> None:
        if self.kept is not None:
            self.kept.append(chunk)
            if len(self.kept) >= KEPT_CHUNKS:
                self.read()

    def read(self) -> None:
        """Read the chunks kept since the last time, in one parse."""
        if self.kept:
            for event in jsontext.loads(b"[" + b",".join(self.kept) + b"]"):
                self.add(event)
            self.kept.clear()

    def add(self, event: dict[str, Any]) -> None:
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if piece:
                self.pieces.append(piece)
            for call in (choice.get("delta") or {}).get("tool_calls") or ():
                _merge_tool_call(self.tool_calls, call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Accumulate one streamed tool-call delta as OpenAI's clients do: by `index`, `arguments` concatenated."""
    index = delta.get("index", 0)
    call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = delta.get("id") or call["id"]
    function = delta.get("function") or {}
    call["function"]["name"] = function.get("name") or call["function"]["name"]
    call["function"]["arguments"] += function.get("arguments") or ""


async def serve_stream(state: RouterState, request: web.Request, paid: PaidRequest) -> web.StreamResponse:
    """Serve a stream: a node slot, the node's events held back until the first token (another node takes over if
    it fails before), then the relay. NoNode after --max-attempts nodes failed it."""
    tried: set[str] = set()
    for _attempt in range(state.settings.max_attempts):
        node = await take_slot(state, request, paid, tried)
        trace = begin_call(paid, node)
        asked = time.monotonic()
        try:
            # Hold back what comes before the first token: until then another node can still take over.
            events, first = await _unless_client_leaves(request, _open_stream(state, paid, node, trace))
        except (NodeFailed, StreamBroken) as exc:
            paid.trace.end_call(error=exc)
            free_slot(state, paid, node)
            failed_over(state, paid, node, exc, tried)
            continue
        except BaseException as exc:
            paid.trace.end_call(error=exc)
            free_slot(state, paid, node)
            raise
        finally:
            paid.trace.waited += time.monotonic() - asked  # the node's time to its first token
        relay = _StreamRelay(state, paid, node)
        try:
            return await relay.run(request, first, events)
        except BaseException as exc:
            paid.trace.end_call(error=exc)
            raise
        finally:
            relay.checkpoints.stop()
            free_slot(state, paid, node)
    raise no_node_left(state, paid)


def _chunk_prefix(paid: PaidRequest) -> bytes:
    """How the JSON of a chunk that the client may get as the node wrote it starts: with this request's id."""
    return b'{"id":' + json.dumps(paid.id).encode() + b","


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


async def _open_stream(
    state: RouterState, paid: PaidRequest, node: HerdNode, trace: Mapping[str, str] | None
) -> tuple[EventStream, list[bytes]]:
    """The node's stream and its events up to the first token; the stream is closed if this fails or is cancelled
    (closing it is how the node learns to stop, even while it still decodes the prompt)."""
    events = await state.upstream.stream(  # type: ignore[union-attr]
        node, paid.path, paid.body, paid.id, cache_salt=paid.cache_salt, trace=trace
    )
    try:
        return events, await _first_events(node, events, _chunk_prefix(paid))
    except BaseException:
        await events.aclose()
        raise


async def _unless_client_leaves(request: web.Request, work: Awaitable[_T]) -> _T:
    """`work`'s result; if the client leaves first, `work` is cancelled and ClientGone raised."""
    # `work` runs in this task; a timer looks for the client now and then, and cancels the task if it left.
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    gone = False
    timer: asyncio.TimerHandle | None = None

    def look() -> None:
        nonlocal gone, timer
        if client_gone(request):
            gone = True
            task.cancel()
        else:
            timer = loop.call_later(CLIENT_POLL_SECONDS, look)

    timer = loop.call_later(CLIENT_POLL_SECONDS, look)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # cancelled by `look`, by nothing else
            raise ClientGone("the client went away before the first token") from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


class _StreamRelay:
    """One stream from `node` to the client: what it delivered so far, its transcript, and its settlement."""

    def __init__(self, state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
        self.state, self.paid, self.node = state, paid, node
        # What it delivered so far: the running counts of the last token chunk relayed (its prompt, of which
        # cached, and completion tokens), what a cut or broken stream and a checkpoint charge (see wire.node).
        self.counts = _NOTHING
        self.prefix = _chunk_prefix(paid)
        self.transcript = Transcript([] if paid.claim is not None or paid.text is not None else None)
        self.last_token_ns = 0  # when the last token chunk came (epoch ns), with tracing on
        self.finish_reason: str | None = None  # as the node said it, with tracing on
        self.checkpoints = Checkpoints(state, paid, node)  # what it delivered, for a crash of the router

    async def run(self, request: web.Request, first: list[bytes], events: EventStream) -> web.StreamResponse:
        """Pass the node's events on token by token; settle on the usage event, or on what was delivered."""
        state, paid, node = self.state, self.paid, self.node
        trace = paid.trace
        # The router's overhead so far: the stream's whole is in its usage record (the headers cannot wait).
        headers = {**answer_headers(state, paid, node), OVERHEAD_HEADER: f"{trace.overhead_ms():.3f}"}
        try:
            sse = await paid.open_sse(request, headers)
        except BaseException:
            await events.aclose()  # the response could not start: nothing delivered, full refund
            raise
        try:
            # Events that arrived together leave together: one write for what one read brought.
            for i, payload in enumerate(first):
                last = i == len(first) - 1
                await self._forward(sse, payload, flush=last and not events.buffered)
            # Then every read's events in one go: a token chunk costs no coroutine of its own.
            while True:
                asked = time.monotonic()
                batch = await events.batch()
                trace.waited += time.monotonic() - asked  # the node's time, not the router's
                if not batch:
                    break
                for payload in batch:
                    token = token_chunk(payload, self.prefix)
                    if token is not None:
                        self._pass_token(sse, token)
                    else:
                        await self._forward(sse, payload, flush=False)
                if not events.ended:  # else [DONE] goes out with them, below
                    await sse.flush()
                    self.checkpoints.delivered(self.counts, request.transport)
            await sse.done()
        except StreamBroken as exc:
            # The node died after tokens reached the client: end the stream with an error, charge what was delivered.
            log.warning("%s", exc, extra=paid.log_fields(node))
            await events.aclose()
            trace.end_call(error=exc)
            mark_failed(state, node, exc)
            await self._settle_delivered("broken", str(exc))
            message = "the node serving this stream failed; you were charged only for the tokens delivered"
            with suppress(ConnectionError):
                await sse.send(error_body(message, type="server_error", code="node_failed"))
                await sse.done()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client cut the stream: closing the node's stream stops its generation.
            await events.aclose()
            trace.end_call({"gen_ai.usage.output_tokens": self.counts.completion_tokens, "llamakit.status": "cut"})
            await self._settle_delivered("cut", "the client closed the stream")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return sse.response
        await self._settle_delivered("ok", None)  # only if the node sent no usage
        return sse.response

    async def _settle_delivered(self, status: str, error: str | None) -> None:
        state, paid, node = self.state, self.paid, self.node
        await settle_delivered(state, paid, node, self.counts, status, error)

    def _pass_token(self, sse: SseWriter, token: tuple[bytes, TokenCounts]) -> None:
        """Queue a token chunk (see upstream.token_chunk) for the client, and count what it delivered."""
        chunk, self.counts = token
        sse.queue_raw(chunk)
        first_token(self.state, self.paid)
        self.transcript.keep(chunk)
        if self.paid.trace.on:
            self.last_token_ns = time.time_ns()

    async def _forward(self, sse: SseWriter, payload: bytes, *, flush: bool = True) -> None:
        state, paid, node = self.state, self.paid, self.node
        token = token_chunk(payload, self.prefix)
        if token is not None:  # the common case: the node's bytes, passed on without their counts
            self._pass_token(sse, token)
            if flush:
                await sse.flush()
            return
        event = parse_event(node, payload)
        self.transcript.read()  # what came before this event first
        counts = event.pop("llamakit", None)
        same = counts is None and event.get("id") == paid.id
        event["id"] = paid.id
        usage = event.get("usage")
        if paid.trace.on:
            self._traced(event, usage, token=counts is not None)
        if usage:
            bill = paid.bill(usage)
            end_call(paid, bill.prompt_tokens, bill.completion_tokens, self.finish_reason)
            charged = await settle(
                state, paid, node, bill, "ok", remember=self._remember(usage, bill)
            )  # what it cost: nothing when its hold went back while it ran, see settle._hold_gone
            remember_prefix(state, paid, node, self.transcript.text)
            if not paid.include_usage:
                if flush:
                    await sse.flush()
                return
            event["usage"] = bill.usage(usage, state.settings.money, charged)
            if paid.fallbacks:
                event["passed_over"] = paid.passed_over_list()
        elif "error" in event:
            raise StreamBroken(f"node {node.name} reported: {event['error'].get('message')}")
        if same and not usage:
            await sse.send_raw(payload, flush=flush)
        else:
            await sse.send(event, flush=flush)
        if counts is not None:
            # A chunk from a node that does not say `cached_tokens` (older than it) has none, as split_counts reads.
            self.counts = TokenCounts(
                counts["prompt_tokens"], counts["completion_tokens"], counts.get("cached_tokens") or 0
            )
            first_token(state, paid)
        if self.transcript.kept is not None:
            self.transcript.add(event)

    def _traced(self, event: dict[str, Any], usage: dict[str, Any] | None, *, token: bool) -> None:
        """What the trace notes of an event that is not a plain token: its finish reason, and at the usage (the
        node's last word) when the last token came."""
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if token:  # a token whose chunk was parsed (a tool call's): a delivery too
            self.last_token_ns = time.time_ns()
        if usage and self.last_token_ns:
            tokens = usage.get("completion_tokens", 0)
            self.paid.trace.call_event(
                "llamakit.last_token", {"gen_ai.usage.output_tokens": tokens}, at_ns=self.last_token_ns
            )

    def _remember(self, usage: dict[str, Any], bill: Bill) -> Remembered | None:
        """The whole answer the stream delivered, in the shape of a plain answer, for a retry to be given."""
        paid = self.paid
        if paid.claim is None:
            return None
        money = self.state.settings.money
        total = Usage(**bill.usage(usage, money))
        text, finish = self.transcript.text, self.transcript.finish_reason
        if paid.path.endswith("/chat/completions"):
            calls = [self.transcript.tool_calls[i] for i in sorted(self.transcript.tool_calls)] or None
            body = chat_completion_body(
                id=paid.id, model=paid.model, text=None if calls and not text else text,
                finish_reason=finish, usage=total, tool_calls=calls,
            )  # fmt: skip
        else:
            body = completion_body(id=paid.id, model=paid.model, text=text, finish_reason=finish, usage=total)
        if paid.fallbacks:
            body["passed_over"] = paid.passed_over_list()
        headers = {**answer_headers(self.state, paid, self.node), **cost_headers(money, bill.charge)}
        return paid.claim.remember(body, headers)
