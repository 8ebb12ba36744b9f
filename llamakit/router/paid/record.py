"""The usage record of every outcome, refusals included: one line in the usage log (`--usage-log`), one row of the
dashboard's latest requests, and the metrics a request ends with. The ledger keeps its own copy (its `usage`
table), written in the same transaction as the hold's settlement, release or refusal."""

from __future__ import annotations

import logging
import time
from typing import Any

from llamakit.money.currency import CreditValue
from llamakit.money.fees import format_bid
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import UsageRecord
from llamakit.router.paid.request import Bill, PaidRequest
from llamakit.router.state import RouterState

__all__ = ["REQUEST_LOG", "publish", "recovered_record", "refusal_record", "usage_record"]

# One line per finished request, with its usage record's fields (a JSON line's: see llamakit.logs), when the
# router runs with --log-requests (this logger at INFO).
REQUEST_LOG = logging.getLogger("llamakit.requests")
_LOGGED = (
    "request_id", "account", "model", "node", "status", "http_status", "prompt_tokens", "completion_tokens",
    "cost_credits", "held", "bid", "latency_ms", "queue_ms", "ttft_ms", "overhead_ms", "error", "user",
)  # fmt: skip


def usage_record(
    money: CreditValue,
    *,
    created: float,
    request_id: str,
    account: str,
    model: str,
    node: str | None,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    cost_credits: int,
    held: int,
    bid: str,
    latency_ms: float | None,
    queue_ms: float | None,
    ttft_ms: float | None,
    error: str | None,
    user: str | None,
    key_prefix: str | None,
    http_status: int | None,
    cached_tokens: int = 0,
    cache_discount: int = 0,
    passed_over: list[dict[str, str]] | None = None,
    overhead_ms: float | None = None,
) -> dict[str, Any]:
    """One usage record, as the usage log and `/admin/stats`' `requests.recent` carry it: `time` (epoch seconds),
    tokens (`cached_tokens` of the prompt's read from the node's cache), `cost` (the price in `currency`) and
    `cost_credits`, `cache_discount` and `cache_discount_credits` (what the cached tokens' fee took off it),
    `held` credits, the `bid`, milliseconds of latency, queue, first token and the router's own time
    (`overhead_ms`: X-Llamakit-Overhead-Ms), `http_status` when the client got an error, and the models
    `passed_over` before `model` (a request's `models` fallbacks)."""
    return {
        "time": created,
        "request_id": request_id,
        "account": account,
        "model": model,
        "node": node,
        "status": status,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "completion_tokens": completion_tokens,
        **money.cost_fields(cost_credits),
        **money.discount_fields(cache_discount),
        "currency": money.currency,
        "held": held,
        "bid": bid,
        "latency_ms": latency_ms,
        "queue_ms": queue_ms,
        "ttft_ms": ttft_ms,
        "overhead_ms": overhead_ms,
        "error": error,
        "user": user,
        "key_prefix": key_prefix,
        "http_status": http_status,
        "passed_over": passed_over or [],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def finished(
    state: RouterState,
    paid: PaidRequest,
    node: HerdNode | None,
    status: str,
    bill: Bill,
    error: str | None,
    http_status: int | None = None,
) -> None:
    """Record a paid request that ended (settled or refunded) with what it was charged (`bill.charge`): its usage
    record, its key's tokens, its metrics, its span's outcome and (--log-requests) its log line."""
    prompt_tokens, completion_tokens = bill.prompt_tokens, bill.completion_tokens
    now = time.monotonic()
    latency = now - paid.arrived
    if paid.overhead_ms is None:  # settled or released without reaching the ledger's call
        paid.overhead_ms = paid.trace.overhead_ms()
    record = usage_record(
        state.settings.money,
        created=time.time(),
        request_id=paid.id,
        account=paid.account.name,
        model=paid.model,
        node=node.name if node is not None else None,
        status=status,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_credits=bill.charge,
        held=paid.held,
        bid=format_bid(paid.multiplier),
        latency_ms=_ms(latency),
        queue_ms=None if paid.queue_ms is None else round(paid.queue_ms, 3),
        ttft_ms=None if paid.first_token is None else _ms(paid.first_token - paid.arrived),
        error=error,
        user=paid.user,
        key_prefix=paid.key_prefix,
        http_status=http_status,
        cached_tokens=bill.cached_tokens,
        cache_discount=bill.cache_discount,
        passed_over=paid.passed_over_list(),
        overhead_ms=paid.overhead_ms,
    )
    paid.admission.finish(prompt_tokens + completion_tokens)
    state.metrics.finished(paid.model, status)
    generating = now - paid.dispatched if paid.dispatched is not None else 0.0
    state.metrics.observe_request(paid.model, latency, completion_tokens, generating)
    state.metrics.overhead(paid.model, paid.overhead_ms / 1000)
    if paid.trace.on:
        paid.trace.set(_span_attributes(record))
    publish(state, record)


def _span_attributes(record: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """A finished request's outcome on its span: GenAI's usage attributes and llamakit's own. Its
    `gen_ai.response.model` is the model that answered (after model fallbacks, not the one asked first, which
    `gen_ai.request.model` keeps), and absent when none did: a request refunded before a node served it."""
    attributes: dict[str, str | int | float | bool] = {
        "gen_ai.response.id": record["request_id"],
        "gen_ai.usage.input_tokens": record["prompt_tokens"],
        "gen_ai.usage.output_tokens": record["completion_tokens"],
        "llamakit.credits.charged": record["cost_credits"],
        "llamakit.status": record["status"],
    }
    if record["cached_tokens"]:
        attributes["llamakit.usage.cached_tokens"] = record["cached_tokens"]
        attributes["llamakit.credits.cache_discount"] = record["cache_discount_credits"]
    if record["node"] is not None:  # a node answered, for the model the record names
        attributes["gen_ai.response.model"] = record["model"]
    if record["passed_over"]:
        attributes["llamakit.passed_over"] = ", ".join(f"{p['model']}={p['reason']}" for p in record["passed_over"])
    for key in ("node", "queue_ms", "overhead_ms"):
        if record[key] is not None:
            attributes[f"llamakit.{key}"] = record[key]
    return attributes


def refusal_record(
    money: CreditValue,
    *,
    request_id: str,
    account: str,
    model: str,
    status: str,
    http_status: int,
    error: str,
    user: str | None,
    key_prefix: str | None,
    bid: str = "1",
) -> dict[str, Any]:
    """The record of a request refused before anything was held: no tokens, no cost, `bid` 1 (a batch line's: its
    batch's discount)."""
    return usage_record(
        money, created=time.time(), request_id=request_id, account=account, model=model, node=None, status=status,
        prompt_tokens=0, completion_tokens=0, cost_credits=0, held=0, bid=bid, latency_ms=None, queue_ms=None,
        ttft_ms=None, error=error, user=user, key_prefix=key_prefix, http_status=http_status,
    )  # fmt: skip


def recovered_record(money: CreditValue, record: UsageRecord, account: str) -> dict[str, Any]:
    """The record of a hold released at start-up (left open by a router that stopped), from the ledger's row."""
    priced, _ = record.priced_at(money)
    return usage_record(
        priced, created=record.created, request_id=record.request_id, account=account, model=record.model,
        node=record.node, status=record.status, prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, cost_credits=record.cost, held=record.held, bid=record.bid,
        latency_ms=record.latency_ms, queue_ms=record.queue_ms, ttft_ms=None, error=record.error, user=record.user,
        key_prefix=record.key_prefix, http_status=record.http_status, cached_tokens=record.cached_tokens,
        cache_discount=record.cache_discount, passed_over=[dict(p) for p in record.passed_over],
        overhead_ms=record.overhead_ms,
    )  # fmt: skip


def publish(state: RouterState, record: dict[str, Any]) -> None:
    """Show `record` in the dashboard's latest requests, write it to the usage log (if there is one) and log it
    (--log-requests: one line on `llamakit.requests`, its fields a JSON line's)."""
    state.requests.add(record)
    if state.usage_log is not None:
        state.usage_log.write(record)
    if REQUEST_LOG.isEnabledFor(logging.INFO):
        REQUEST_LOG.info(
            "%s %s %s %s: %d+%d tokens, %d credits",
            record["request_id"], record["model"], record["status"], record["node"] or "-", record["prompt_tokens"],
            record["completion_tokens"], record["cost_credits"], extra={k: record[k] for k in _LOGGED},
        )  # fmt: skip
