"""Idempotency keys: a retried request is answered again, never generated or charged again.

A client sends `Idempotency-Key` with every call and the same key on each retry. The answer of a settled
request is stored with its charge, in the same ledger transaction; a repeat gets that answer back (streamed
again if it asks for a stream) with `Idempotent-Replayed: true`. A repeat that arrives while the first is
still running waits for it instead of starting a second generation. A key reused for a different request
is refused with 422, as Stripe does.

"The same request" is the same route and the same JSON meaning: a retry whose body a client's library wrote
again with other spacing, another key order, other escapes or `1.0` for `1` is the same request (`fingerprint`
hashes the body's canonical JSON). Answers remembered before that (hashed from the body's bytes) still match a
repeat of the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from llamakit.money.currency import CreditValue
from llamakit.router.ledger import Ledger, Remembered
from llamakit.router.pricing import cost_headers
from llamakit.router.tracing import RequestTrace
from llamakit.web import SseWriter, json_response
from llamakit.wire.completions import Usage, chat_chunk_body, completion_chunk_body
from llamakit.wire.errors import ApiError
from llamakit.wire.headers import (
    COST_CREDITS_HEADER,
    COST_HEADER,
    IDEMPOTENCY_HEADER,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    OVERHEAD_HEADER,
    REPLAYED_HEADER,
)

__all__ = [
    "Claim",
    "Fingerprint",
    "Idempotency",
    "KeyInUse",
    "KeyReused",
    "canonical_json",
    "fingerprint",
    "once",
    "recall_answer",
    "replay",
    "without_cost_headers",
]

MAX_KEY_LENGTH = MAX_IDEMPOTENCY_KEY_LENGTH


class KeyReused(Exception):
    """The key was used before for a different request (another path or body): 422 `idempotency_key_reused`."""


class KeyInUse(Exception):
    """(--cluster) The first request under the key still runs after the longest wait: 409 `idempotency_key_in_use`."""


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a request under an idempotency key: `value` (stored with its answer) hashes the route and
    the body's canonical JSON; `raw` hashes the route and the body's bytes, as fingerprints were made before, so
    that an answer remembered then still matches a repeat of the same bytes."""

    value: str
    raw: str

    def matches(self, stored: str) -> bool:
        return stored in (self.value, self.raw)


def fingerprint(path: str, body: bytes) -> Fingerprint:
    """The fingerprint of a request to `path` whose body is the JSON text `body` (already parsed once by the
    route, so valid JSON no deeper than MAX_BODY_DEPTH)."""
    canonical = canonical_json(json.loads(body, parse_float=Decimal, parse_int=Decimal))
    return Fingerprint(_sha256(path, canonical.encode("utf-8", "surrogatepass")), _sha256(path, body))


def _sha256(path: str, body: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + body).hexdigest()


def canonical_json(value: Any) -> str:
    """One text for every way of writing the same JSON value: object keys sorted, no spaces, strings as
    `json.dumps` escapes them, numbers by their decimal value (`1`, `1.0` and `10e-1` are `1`; read with
    `parse_float=Decimal, parse_int=Decimal`, so a long integer keeps all its digits)."""
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(json.dumps(k) + ":" + canonical_json(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return _canonical_number(value)
    return json.dumps(value)


def _canonical_number(value: Decimal) -> str:
    """`value` as digits without trailing zeros and an exponent (`1.50` → `15e-1`), exactly: no context, so
    no rounding and no overflow whatever the number's length or exponent."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN or Infinity, which json.loads reads too
        return str(value)
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return "0"
    stripped = text.rstrip("0")
    return ("-" if sign else "") + stripped + "e" + str(exponent + len(text) - len(stripped))


@dataclass(frozen=True)
class Claim:
    """The right to run the request for `key`; `remember` stores its answer when it settles."""

    account_id: int
    key: str
    fingerprint: Fingerprint

    def remember(self, body: dict[str, Any], headers: dict[str, str]) -> Remembered:
        return Remembered(self.key, self.fingerprint.value, json.dumps({"body": body, "headers": headers}))


class Idempotency:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._running: dict[tuple[int, str], tuple[Fingerprint, asyncio.Future[None]]] = {}

    @staticmethod
    def key_of(request: web.Request) -> str | None:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return None
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            raise ApiError(
                400,
                f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
                param=IDEMPOTENCY_HEADER,
            )
        return key

    async def claim(
        self, account_id: int, key: str, print_: Fingerprint, trace: RequestTrace | None = None
    ) -> Claim | Remembered:
        """A claim to run the request, or the answer of the request that already ran under `key`. The time a repeat
        waits for the first request under its key is counted in `trace.waited` (not the router's own time)."""
        while True:
            remembered = await self.ledger.recall(account_id, key)
            if remembered is not None:
                self._check(remembered.fingerprint, print_)
                return remembered
            running = self._running.get((account_id, key))
            if running is None:
                self._running[(account_id, key)] = (print_, asyncio.get_running_loop().create_future())
                return Claim(account_id, key, print_)
            self._check(running[0].value, print_)
            # The first attempt is still running: wait for it, then look again (it may have failed).
            asked = time.monotonic()
            await asyncio.shield(running[1])
            if trace is not None:
                trace.waited += time.monotonic() - asked

    def release(self, claim: Claim) -> None:
        """The request under `claim` has ended, settled or not: let any waiting repeat look again."""
        _print, done = self._running.pop((claim.account_id, claim.key))
        done.set_result(None)

    @staticmethod
    def _check(stored: str, given: Fingerprint) -> None:
        if not given.matches(stored):
            raise KeyReused(
                f"this {IDEMPOTENCY_HEADER} was already used for a different request; use a new key per request"
            )


def recall_answer(
    remembered: Remembered, money: CreditValue, *, overhead_ms: float
) -> tuple[dict[str, Any], dict[str, str]]:
    """The remembered answer's body and headers, with the usage and cost the first answer had, marked replayed and
    with `overhead_ms` (the router's own time on the replay, in milliseconds) as its `X-Llamakit-Overhead-Ms`.

    An answer remembered by a router older than prices in a currency has `usage.cost` and `X-Llamakit-Cost`
    in credits: those become `cost_credits` and `X-Llamakit-Cost-Credits`, and `cost` the price at today's
    credit value, so that no client reads credits as money.
    """
    saved = json.loads(remembered.response)
    body: dict[str, Any] = saved["body"]
    headers: dict[str, str] = {
        **saved["headers"],
        REPLAYED_HEADER: "true",
        OVERHEAD_HEADER: f"{overhead_ms:.3f}",  # the replay's, never the first answer's
    }
    usage = body.get("usage")
    if isinstance(usage, dict) and "cost_credits" not in usage and isinstance(usage.get("cost"), int):
        usage.update(money.cost_fields(usage["cost"]))
    if COST_HEADER in headers and COST_CREDITS_HEADER not in headers:
        headers.update(cost_headers(money, int(headers[COST_HEADER])))
    return body, headers


def without_cost_headers(headers: dict[str, str]) -> dict[str, str]:
    """A replayed stream's headers: its cost is in its usage chunk, as in the stream it repeats."""
    return {k: v for k, v in headers.items() if k not in (COST_HEADER, COST_CREDITS_HEADER)}


async def once(
    request: web.Request,
    idempotency: Idempotency,
    account_id: int,
    path: str,
    *,
    trace: RequestTrace,
    run: Callable[[Claim | None], Awaitable[web.StreamResponse]],
    replay: Callable[[Remembered, RequestTrace], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Every paid endpoint's idempotency, in one place: without an `Idempotency-Key`, `run(None)`; with one, the
    remembered answer of the request that ran under it (`replay(remembered, trace)`, which tells the router's own
    time from `trace`), or the right to run it (`run(claim)`, whose settlement remembers the answer), waiting
    while a first request under the key still runs (a wait `trace` counts as not the router's own time). 400 for a
    key that is not 1–255 printable ASCII characters; KeyReused when the key was used for another request."""
    key = Idempotency.key_of(request)
    if key is None:
        return await run(None)
    claimed = await idempotency.claim(account_id, key, fingerprint(path, await request.read()), trace)
    if isinstance(claimed, Remembered):
        return await replay(claimed, trace)
    try:
        return await run(claimed)
    finally:
        idempotency.release(claimed)


async def replay(
    request: web.Request,
    remembered: Remembered,
    money: CreditValue,
    *,
    trace: RequestTrace,
    stream: bool,
    include_usage: bool,
) -> web.StreamResponse:
    """Answer a repeat with the remembered answer, whole or as a stream, as the repeat asks; its
    `X-Llamakit-Overhead-Ms` is the router's own time on the repeat (`trace`) until its headers go out."""
    body, headers = recall_answer(remembered, money, overhead_ms=trace.overhead_ms())
    if not stream:
        return json_response(body, headers=headers)
    sse = await SseWriter.open(request, without_cost_headers(headers))
    rid, model = body["id"], body["model"]
    choice = body["choices"][0]
    usage = Usage(**body["usage"])
    if body["object"] == "chat.completion":
        await sse.send(chat_chunk_body(id=rid, model=model, delta={"role": "assistant", "content": ""}))
        message = choice["message"]
        if message.get("content") is not None:
            await sse.send(chat_chunk_body(id=rid, model=model, delta={"content": message["content"]}))
        for index, call in enumerate(message.get("tool_calls") or ()):
            await sse.send(chat_chunk_body(id=rid, model=model, delta={"tool_calls": [{"index": index, **call}]}))
        await sse.send(chat_chunk_body(id=rid, model=model, delta={}, finish_reason=choice["finish_reason"]))
        if include_usage:
            await sse.send(chat_chunk_body(id=rid, model=model, delta=None, usage=usage))
    else:
        await sse.send(completion_chunk_body(id=rid, model=model, text=choice["text"]))
        await sse.send(completion_chunk_body(id=rid, model=model, text="", finish_reason=choice["finish_reason"]))
        if include_usage:
            await sse.send(completion_chunk_body(id=rid, model=model, text=None, usage=usage))
    await sse.done()
    return sse.response
