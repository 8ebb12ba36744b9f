"""BatchRunner: the lines of every batch in progress, run through the paid path on slots no interactive request wants.

Each round (when a batch is made or cancelled, when a line ends, and every ROUND_SECONDS) the runner claims, per
model, as many pending lines as the ready nodes serving it have slots, less the lines it runs already. A claimed
line is quoted and held like any request (at bid 1 × the batch's discount: docs/money.md#batches) and waits for
a slot at BATCH_BID, behind every interactive request (dispatch.BATCH_BID); it is served and settled on its exact
tokens, and its answer is remembered with its charge under the line's idempotency key. Holds are taken one line
at a time, as lines are claimed: a batch never holds its whole cost.

How a line ends:

- answered: a line of the output file, with its usage and cost;
- refused or failed (a 4xx, a node's refusal): a line of the error file, its hold released in full;
- it could not run now (no node, the queue full, the ledger away): back to pending, tried again later;
- its API key's rpm_limit, tpm_limit or max_parallel_requests has no room for it now (counted apart from the
  key's interactive requests: limits.KeyRates): back to pending, nothing held; the runner claims no more lines
  of the key's batches than their room (`_per_key`), so the line waits for the window, never refused for it;
- the balance (or a spend cap) cannot pay it: back to pending while other lines of its batch run (their holds
  come back as they settle), else the batch stops: its remaining lines fail with `insufficient_quota`;
- its batch is cancelled or expires while it waits for a slot: it fails (`batch_cancelled`, `batch_expired`),
  refunded; a line already on a node runs to its end and is charged.

A router that stops leaves its running lines to the next start (one router) or to the other routers once its
lease is gone (a cluster: `BatchStore.requeue_lost`); a line settled just before its router died is found by its
idempotency key and not run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeVar

from aiohttp import web

from llamakit.outage import Outage
from llamakit.router.batches.lines import answered_line, custom_id_of, failed_line, not_run_line
from llamakit.router.errors import http_error
from llamakit.router.ledger import LedgerError, UnknownAccount, UnknownKey
from llamakit.router.ledger._batches import BatchStore, ClaimedLine, LineOutcome, Render
from llamakit.router.limits import KEY_CACHE_SECONDS, Caller
from llamakit.router.paid.endpoint import record_refusal
from llamakit.router.paid.idempotency import Claim, Fingerprint
from llamakit.router.paid.quote import EMBEDDINGS_PATH, quote_embeddings, quote_generation
from llamakit.router.paid.request import PaidRequest, cached_tokens
from llamakit.router.paid.serve import serve_line
from llamakit.router.paid.settle import refund
from llamakit.router.state import RouterState
from llamakit.router.tracing import RequestTrace
from llamakit.wire.completions import ChatCompletionRequest, CompletionRequest, validate_request
from llamakit.wire.embeddings import parse_embedding_request
from llamakit.wire.errors import ApiError
from llamakit.wire.headers import REQUEST_ID_HEADER

__all__ = ["ROUND_SECONDS", "RUNNER", "BatchRunner"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds between the rounds that run without a reason: claim what the herd has room for, requeue the lines of
# routers that died (a cluster), expire late batches, stop waiting lines of cancelled ones.
ROUND_SECONDS: Final = 1.0
# Refusals after which a line goes back to pending, to be tried again: nothing is wrong with it.
_LATER: Final = frozenset({"no_node", "queue_full", "queue_share_exceeded", "queue_timeout", "ledger_unavailable",
                           "router_lease_lost", "router_lost"})  # fmt: skip
# The key's rate or concurrency limit has no room now (limits.KeyRates.admit): the line waits for it.
RATE_LIMITED: Final = "rate_limit_exceeded"
_SHORT: Final = frozenset({"insufficient_funds", "spend_cap_exceeded"})
CANCELLED: Final[tuple[str, str]] = ("batch_cancelled", "This request was not run: its batch was cancelled.")
EXPIRED: Final[tuple[str, str]] = (
    "batch_expired",
    "This request could not be executed before the completion window expired.",
)


def render(code: str, message: str) -> Render:
    """The error line of a line that never ran, from its request as uploaded."""
    return lambda request: not_run_line(custom_id_of(request), code, message)


class _Later(Exception):
    """The line cannot run now: back to pending (its batch rests `rest` seconds at this router)."""

    def __init__(self, rest: float = 0.0) -> None:
        self.rest = rest


class _Stop(Exception):
    """The batch can run no more lines: `code` and `message` go on each remaining line and on the batch."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Running:
    line: ClaimedLine
    task: asyncio.Task[None] | None = None
    paid: PaidRequest | None = None  # once held
    cancelled: tuple[str, str] | None = None  # why the runner stopped it: (code, message)

    @property
    def started(self) -> bool:
        """On a node already: it runs to its end and is charged."""
        return self.paid is not None and self.paid.dispatched is not None


class BatchRunner:
    """Runs batch lines at this router (see the module). `start()` in the app's start-up, `stop()` at its end."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        settings = state.settings
        self.cluster = settings.cluster
        self.router_id = settings.cluster_id if settings.cluster else "router"
        self._running: dict[tuple[str, int], _Running] = {}
        self._wake = asyncio.Event()
        self._resting: dict[str, float] = {}  # batch id → time.monotonic() until which none of its lines is claimed
        self._callers: dict[str, tuple[Caller, float]] = {}
        self._upkeep = 0.0
        self._task: asyncio.Task[None] | None = None
        self.outage = Outage(log, "running batches", cost="rounds failed")

    @property
    def store(self) -> BatchStore:
        return self.state.ledger.batch_store

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch runner")

    async def stop(self) -> None:
        """Stop claiming and cancel the lines running here: refunded, they run again after a restart (or at
        another router of a cluster)."""
        tasks = [t for t in (self._task, *(r.task for r in self._running.values())) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Something changed (a batch made or cancelled, a line ended): a round now."""
        self._wake.set()

    def cancelled(self, batch_id: str, reason: tuple[str, str] = CANCELLED) -> None:
        """The batch was cancelled (or expired): its lines that wait here for a slot leave the queue, refunded, as
        a request whose client goes away does; those on a node already run to their end."""
        for running in self._running.values():
            if running.line.batch_id == batch_id and not running.started:
                running.cancelled = reason
                if running.paid is not None:
                    running.paid.withdrawn = True
        self.wake()

    def here(self) -> dict[str, int]:
        """The lines this router runs: `waiting` for a slot (held, queued behind every interactive request) and
        `on_nodes`; the others are between the two (being quoted, or writing how they ended)."""
        held = [r.paid for r in self._running.values() if r.paid is not None and not r.paid.closed]
        waiting = sum(1 for paid in held if paid.dispatched is None)
        on_nodes = len(held) - waiting
        return {"lines": len(self._running), "waiting": waiting, "on_nodes": on_nodes}

    # -- rounds ------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            await self.store.requeue_lost(self.router_id, cluster=self.cluster, start=True)
        except LedgerError as exc:
            self.outage.failed(exc, consequence="lines left running by a stopped router wait for the next round")
        while True:
            self._wake.clear()
            try:
                await self._round()
                self.outage.ended()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                self.outage.failed(exc, traceback=None if isinstance(exc, LedgerError) else exc)
                self.outage.count()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ROUND_SECONDS)

    async def _round(self) -> None:
        if self.state.stopping.is_set():
            return
        now = time.monotonic()
        if now - self._upkeep >= ROUND_SECONDS:
            self._upkeep = now
            if self.cluster:  # the lines of routers whose lease ran out (a router's own start did it for one)
                await self.store.requeue_lost(self.router_id, cluster=True, start=False)
            code, message = EXPIRED
            await self.store.expire_batches({"code": code, "message": message}, render(code, message))
            await self._look_at_batches()
        self._resting = {b: until for b, until in self._resting.items() if until > now}
        room = self._room()
        if not any(n > 0 for n in room.values()):
            return
        claimed = await self.store.claim_lines(self.router_id, room, skip=list(self._resting), per_key=self._per_key())
        for line in claimed:
            running = _Running(line)
            self._running[(line.batch_id, line.line)] = running
            running.task = asyncio.create_task(self._run(running), name=f"batch line {line.batch_id}:{line.line}")

    def _room(self) -> dict[str, int]:
        """Per model: the slots of the ready nodes serving it, less the lines running here."""
        slots: dict[str, int] = {}
        for node in self.state.herd.nodes.values():
            if node.state == "ready":
                for model in node.models:
                    slots[model] = slots.get(model, 0) + node.slots
        for running in self._running.values():
            if running.line.model in slots:
                slots[running.line.model] -= 1
        return slots

    def _per_key(self) -> dict[str, int]:
        """Per API key seen here with a rate or concurrency limit: the lines its batches may start now, what its
        batch window has room for less its lines claimed here but not yet let in. A key not seen yet is not
        limited: its first lines over the limit go back to pending, and from then on it is known."""
        rates = self.state.rates
        starting: dict[str, int] = {}
        for running in self._running.values():
            if running.paid is None:
                starting[running.line.key_hash] = starting.get(running.line.key_hash, 0) + 1
        per_key: dict[str, int] = {}
        for key_hash, (caller, _) in self._callers.items():
            room = rates.room(caller, batch=True)
            if room is not None:
                per_key[key_hash] = max(0, room - starting.get(key_hash, 0))
        return per_key

    async def _look_at_batches(self) -> None:
        """Stop the waiting lines of batches cancelled (at another router) or expired."""
        ids = sorted({r.line.batch_id for r in self._running.values()})
        if not ids:
            return
        statuses = await self.store.statuses(ids)
        wall = time.time()
        for running in list(self._running.values()):
            line = running.line
            if statuses.get(line.batch_id) == "cancelling":
                self.cancelled(line.batch_id)
            elif line.expires < wall:
                self.cancelled(line.batch_id, EXPIRED)

    # -- a line ------------------------------------------------------------------------------------------

    async def _run(self, running: _Running) -> None:
        line = running.line
        try:
            try:
                outcome = await self._outcome(running)
            except _Later as later:
                if later.rest:
                    self._resting[line.batch_id] = time.monotonic() + later.rest
                await self._written(lambda: self.store.return_line(line, self.router_id))
                return
            except _Stop as stop:
                log.warning("batch %s stops: %s", line.batch_id, stop.message)
                stopped, failing = {"code": stop.code, "message": stop.message}, render(stop.code, stop.message)
                await self._written(lambda: self.store.stop_batch(line.batch_id, stopped, failing))
                outcome = LineOutcome("failed", failing(line.request))
            except Exception:  # a bug: the line is tried again, the traceback said once per line
                log.exception("batch %s line %d failed; it goes back to pending", line.batch_id, line.line)
                await self._written(lambda: self.store.return_line(line, self.router_id))
                return
            await self._written(lambda: self.store.finish_line(line, self.router_id, outcome))
        finally:
            self._running.pop((line.batch_id, line.line), None)
            self.wake()

    async def _written(self, write: Callable[[], Awaitable[_T]]) -> _T:
        """`write()` (a line's state), made again while the ledger cannot be written: the line would otherwise stay
        running at this router until it restarts."""
        while True:
            try:
                return await write()
            except LedgerError as exc:
                self.outage.failed(exc, consequence="lines that end meanwhile are written once it answers")
                self.outage.count()
                await asyncio.sleep(ROUND_SECONDS)

    async def _outcome(self, running: _Running) -> LineOutcome:
        state, line = self.state, running.line
        request = json.loads(line.request)
        custom_id, body = request["custom_id"], request["body"]
        remembered = await state.ledger.recall(line.account_id, line.key)
        if remembered is not None:  # settled by a router that died before it wrote the line's end
            return _answered(custom_id, json.loads(remembered.response)["body"])
        caller = await self._caller(line)
        try:
            if running.cancelled is None:
                running.paid = paid = await self._quote(caller, line, body)
        except Exception as exc:
            error = http_error(exc)
            if error is None:
                raise
            if error.code in _SHORT:
                raise await self._short(line, error) from exc
            if error.code in _LATER or error.code == RATE_LIMITED:
                raise _Later(rest=ROUND_SECONDS) from exc
            await record_refusal(state, caller, error, body, bid=Decimal(line.discount))
            return LineOutcome("failed", failed_line(custom_id, error.headers.get(REQUEST_ID_HEADER), error.status,
                                                     error.body()))  # fmt: skip
        if running.cancelled is not None:  # its batch was cancelled (or expired) before it could wait for a slot
            if running.paid is not None:
                await refund(state, running.paid, status="cancelled", error=running.cancelled[1])
                running.paid.admission.finish()
            return LineOutcome("failed", not_run_line(custom_id, *running.cancelled))
        try:
            answer = await serve_line(state, paid)
        except ApiError as error:  # refunded in full
            if running.cancelled is not None:  # it left the queue for its batch's end
                return LineOutcome("failed", not_run_line(custom_id, *running.cancelled))
            if error.code in _LATER:
                raise _Later(rest=ROUND_SECONDS) from error
            return LineOutcome("failed", failed_line(custom_id, paid.id, error.status, error.body()))
        return _answered(custom_id, answer)

    async def _quote(self, caller: Caller, line: ClaimedLine, body: dict[str, Any]) -> PaidRequest:
        """The line priced and held (400s and 404s as its endpoint's, raised as ApiError)."""
        state = self.state
        discount = Decimal(line.discount)
        digest = hashlib.sha256(line.request.encode("utf-8", "surrogatepass")).hexdigest()
        claim = Claim(line.account_id, line.key, Fingerprint(digest, digest))
        trace = RequestTrace()
        if line.endpoint == EMBEDDINGS_PATH:
            embeddings = parse_embedding_request(body)
            paid = await quote_embeddings(state, None, caller, embeddings, body, claim, trace, discount=discount)
        else:
            kind = ChatCompletionRequest if line.endpoint.endswith("/chat/completions") else CompletionRequest
            generation = validate_request(kind, body)
            paid = await quote_generation(
                state, None, caller, generation, body, line.endpoint, claim, trace, discount=discount
            )
        paid.queue_timeout = max(1.0, line.expires - time.time())  # it may wait for a slot as long as its batch
        return paid

    async def _short(self, line: ClaimedLine, error: ApiError) -> Exception:
        """The balance (or a spend cap) cannot pay `line`: it waits while other lines of its batch run (their holds
        come back as they settle), else the batch stops."""
        if await self.store.running_lines(line.batch_id) > 1:
            return _Later(rest=ROUND_SECONDS)
        return _Stop("insufficient_quota", f"the batch's account can no longer pay for its lines: {error.message}")

    async def _caller(self, line: ClaimedLine) -> Caller:
        """The API key that made the batch, as a request's caller: its limits and spend caps apply to each line.
        _Stop when it was revoked, expired or is gone."""
        now = time.time()
        cached = self._callers.get(line.key_hash)
        if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
            caller = cached[0]
        else:
            ledger = self.state.ledger
            try:
                key = await ledger.key_of(line.key_hash)
                account = await ledger.get_account(line.account_id)
            except (UnknownKey, UnknownAccount) as exc:
                raise _Stop("invalid_api_key", "the API key that made this batch no longer exists") from exc
            caller = Caller(account, line.key_hash, key)
            self._callers[line.key_hash] = (caller, now)
        if not caller.key.active:
            raise _Stop("invalid_api_key", "the API key that made this batch was revoked: its other lines do not run")
        expires = caller.limits.expires_at
        if expires is not None and now >= expires:
            raise _Stop("expired_api_key", "the API key that made this batch expired: its other lines do not run")
        return caller


def _answered(custom_id: str, answer: dict[str, Any]) -> LineOutcome:
    usage = answer.get("usage") or {}
    cost = usage.get("cost_credits")
    return LineOutcome(
        "completed",
        answered_line(custom_id, str(answer.get("id", "")), answer),
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        cached_tokens=cached_tokens(usage),
        cost=_count(cost),
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# The runner of the app (see llamakit.router.app).
RUNNER = web.AppKey("batch_runner", BatchRunner)
