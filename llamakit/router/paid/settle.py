"""Close a paid request's hold, exactly once: settle it on the exact tokens (the node's usage, or what a cut stream
delivered), or release it in full when nothing was generated for the client.

Each path claims the closing (`paid.closed`) before it awaits the ledger, so no other path closes the same hold,
and shields the ledger call with its bookkeeping (usage record, metrics) from the client's cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time

from llamakit.router.herd import HerdNode
from llamakit.router.ledger import HoldClosed, LedgerError, LedgerUnavailable, Remembered
from llamakit.router.paid.record import finished
from llamakit.router.paid.request import Bill, PaidRequest
from llamakit.router.state import RouterState
from llamakit.wire.node import TokenCounts

__all__ = ["refund", "settle", "settle_delivered"]

log = logging.getLogger(__name__)


async def settle(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode,
    bill: Bill,
    status: str,
    error: str | None = None,
    *,
    remember: Remembered | None = None,
) -> int:
    """Charge `bill.charge` credits (`paid.bill(usage)`, computed once by the caller, who may have written it into
    the answer `remember` stores) and give back the rest of the hold. Returns what was charged: the charge; when the
    hold was gone (another router closed it), what that router charged (a stream's latest checkpoint, else 0); or 0
    when the database failed (the hold is released in full once it answers again)."""
    # Claimed before the ledger is awaited, so no other path closes this hold too; shielded, so a client that
    # leaves while the ledger commits cuts neither the settlement nor its bookkeeping short.
    paid.closed = True
    return await asyncio.shield(_settled(state, paid, node, bill, status, error, remember))


async def _settled(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode,
    bill: Bill,
    status: str,
    error: str | None,
    remember: Remembered | None,
) -> int:
    latency_ms = (time.monotonic() - paid.arrived) * 1000
    prompt_tokens, completion_tokens = bill.prompt_tokens, bill.completion_tokens
    paid.overhead_ms = paid.trace.overhead_ms()  # the router's own time up to its settlement
    try:
        with paid.trace.span("llamakit.settle", {"llamakit.credits.charge": bill.charge, "llamakit.status": status}):
            settlement = await state.ledger.settle(
                paid.id,
                charge=bill.charge,
                node=node.name,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                status=status,
                latency_ms=latency_ms,
                queue_ms=paid.queue_ms,
                error=error,
                remember=remember,
                overhead_ms=paid.overhead_ms,
                model=paid.model if paid.passed_over else None,
                cached_tokens=bill.cached_tokens,
                cache_discount=bill.cache_discount,
                passed_over=paid.passed_over_list(),
            )
    except HoldClosed as exc:
        _hold_gone(paid, exc)
        # The work is done and the client gets it, for what the router that closed the hold charged.
        charged = await _charged_elsewhere(state, paid)
        finished(state, paid, node, "router_lost", Bill(prompt_tokens, completion_tokens, charged, bill.cached_tokens),
                 str(exc))  # fmt: skip
        return charged
    except LedgerError as exc:
        # The database failed to settle: the client still gets its answer, free, and the hold goes back in full
        # once the database answers again (nothing was charged: the settlement is one transaction).
        _failed(state, paid, exc, "its settlement failed; its hold is released in full once the ledger answers")
        state.gate.owe_release(
            paid.id, error="the settlement failed: the database could not be written", queue_ms=paid.queue_ms
        )
        free = Bill(prompt_tokens, completion_tokens, 0, bill.cached_tokens)
        finished(state, paid, node, "error", free, "the settlement failed")
        return 0
    charged = settlement.charged
    node.record(completion_tokens, charged, whole=status != "broken")
    discount = bill.cache_discount if charged == bill.charge else 0
    state.metrics.settled(paid.model, node.name, prompt_tokens, completion_tokens, charged, bill.cached_tokens,
                          discount)  # fmt: skip
    finished(state, paid, node, status, Bill(prompt_tokens, completion_tokens, charged, bill.cached_tokens, discount),
             error)  # fmt: skip
    return charged


async def settle_delivered(
    state: RouterState, paid: PaidRequest, node: HerdNode, delivered: TokenCounts, status: str, error: str | None
) -> None:
    """A stream that ended without its usage (cut by the client, or broken): charged for the tokens it `delivered`
    (the running counts of its last token chunk), its cached prompt tokens at their own fee as a finished stream's
    are; refunded in full when it delivered none."""
    if paid.closed:
        return
    if delivered.completion_tokens == 0:
        await refund(state, paid, status=status, error=error)
    else:
        bill = paid.bill_tokens(delivered.prompt_tokens, delivered.completion_tokens, delivered.cached_tokens)
        await settle(state, paid, node, bill, status, error)


async def refund(
    state: RouterState, paid: PaidRequest, *, status: str, error: str | None, http_status: int | None = None
) -> None:
    """Release the hold in full (nothing was generated for the client); `http_status` is the error it got."""
    if paid.closed:
        return
    paid.closed = True  # claimed before the await, as in settle
    await asyncio.shield(_release_hold(state, paid, status=status, error=error, http_status=http_status))


async def _release_hold(
    state: RouterState, paid: PaidRequest, *, status: str, error: str | None, http_status: int | None
) -> None:
    paid.overhead_ms = paid.trace.overhead_ms()
    try:
        with paid.trace.span("llamakit.settle", {"llamakit.credits.charge": 0, "llamakit.status": status}):
            await state.ledger.release(
                paid.id, status=status, error=error, queue_ms=paid.queue_ms, http_status=http_status,
                overhead_ms=paid.overhead_ms, model=paid.model if paid.passed_over else None,
                passed_over=paid.passed_over_list(),
            )  # fmt: skip
    except HoldClosed as exc:
        _hold_gone(paid, exc)
        status, error, http_status = "router_lost", str(exc), None
    except LedgerError as exc:
        # The database failed: the hold is released once it answers again. The client still gets the error its
        # request met, not this one.
        _failed(state, paid, exc, "its hold could not be released now; it is once the ledger answers")
        state.gate.owe_release(paid.id, error=error or "refunded", queue_ms=paid.queue_ms)
    finished(state, paid, None, status, Bill(0, 0, 0), error, http_status)


def _failed(state: RouterState, paid: PaidRequest, exc: LedgerError, what: str) -> None:
    """A ledger failure of a request's settlement or release: an outage is said once (the gate's log line, not
    one per request); any other failure is logged with its traceback."""
    if isinstance(exc, LedgerUnavailable):
        state.gate.failed(exc)
        log.debug("request %s: %s (%s)", paid.id, what, exc)
    else:
        log.error("request %s: %s", paid.id, what, exc_info=exc)


def _hold_gone(paid: PaidRequest, exc: HoldClosed) -> None:
    """The request's hold was closed behind this router's back: with several routers, another one closed it
    because this router's lease ran out (a pause longer than --lease; see dispatch/cluster.py), with a usage
    record of its own, charging only what a stream's latest checkpoint said it had delivered. Nothing more is
    charged, and the client still gets what was made for it rather than a 500."""
    log.warning("request %s: %s (closed by another router while this one's lease had run out?); charged only what "
                "its last checkpoint said it had delivered", paid.id, exc, extra=paid.log_fields())  # fmt: skip


async def _charged_elsewhere(state: RouterState, paid: PaidRequest) -> int:
    """What the router that closed this request's hold charged for it (its usage record's cost); 0 when unknown."""
    try:
        record = await state.ledger.find_usage(paid.id)
    except LedgerError:
        return 0
    return 0 if record is None else record.cost
