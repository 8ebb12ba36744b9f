"""A priced request with an open hold (`PaidRequest`), and the id it goes by everywhere."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from llamakit.money.currency import CreditValue
from llamakit.money.fees import FeeSchedule, cache_discount, settle_amount
from llamakit.router.affinity import Affinity
from llamakit.router.dispatch import BATCH_BID
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import Account
from llamakit.router.limits import UNLIMITED, Admission
from llamakit.router.paid.fallback import Candidate, PassedOver
from llamakit.router.paid.idempotency import Claim
from llamakit.router.tracing import RequestTrace
from llamakit.web import SseWriter

__all__ = ["Bill", "PaidRequest", "cached_tokens", "new_request_id"]


def new_request_id() -> str:
    """A new request's id: `req-` and 32 hex digits, the microseconds since the epoch and then 72 random bits.

    Ids in the order they are made keep the ledger's indexes on them (holds, charges, usage) growing at one
    end: a batch of settlements writes a few index pages, not one random page per request per index (with
    uuid4 ids, the ledger's thread spent about 15 % more CPU and its checkpoints twice as much).
    """
    return f"req-{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


def cached_tokens(usage: dict[str, Any] | None) -> int:
    """`usage.prompt_tokens_details.cached_tokens` as the node reported it, at most its `prompt_tokens`; 0 when
    absent or malformed."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = usage.get("prompt_tokens")
    if not isinstance(cached, int) or isinstance(cached, bool) or cached <= 0 or not isinstance(prompt, int):
        return 0
    return min(cached, prompt)


@dataclass(frozen=True)
class Bill:
    """What a request's tokens cost: `cached_tokens` of its `prompt_tokens` were read from the node's cache, and
    `cache_discount` credits is what their own fee took off `charge` (see PaidRequest.bill)."""

    prompt_tokens: int
    completion_tokens: int
    charge: int
    cached_tokens: int = 0
    cache_discount: int = 0

    def usage(
        self, reported: dict[str, Any], money: CreditValue, charged: int | None = None, *, cache: bool = True
    ) -> dict[str, Any]:
        """The node's `reported` usage as the client gets it: the price (`cost`, `cost_credits`) and, with `cache`
        (generations; embeddings have no prompt cache), the cached tokens in `prompt_tokens_details` and what
        they saved in `cost_details`. `charged` is what the ledger took when it is not `charge` (nothing, when
        the hold went back while the request ran)."""
        charged = self.charge if charged is None else charged
        if not cache:
            return {**reported, **money.cost_fields(charged)}
        discount = self.cache_discount if charged == self.charge else 0
        details = reported.get("prompt_tokens_details")
        return {
            **reported,
            "prompt_tokens_details": {**(details if isinstance(details, dict) else {}),
                                      "cached_tokens": self.cached_tokens},
            **money.cost_fields(charged),
            "cost_details": money.discount_fields(discount),
        }  # fmt: skip


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


@dataclass
class PaidRequest:
    """A priced request with an open hold of `held` credits, made by `quote` and closed by `settle`.

    `model` and `fees` are those of the model the request is for now; a request that named `models` may move on
    to its `candidates` in turn (see fallback.py), and `passed_over` says which models it left and why."""

    id: str
    account: Account
    model: str
    path: str  # the node's route: /v1/chat/completions, /v1/completions or /v1/embeddings
    body: dict[str, Any]  # what the node is sent
    bid: Decimal
    fees: FeeSchedule
    held: int
    stream: bool
    include_usage: bool
    arrived: float  # time.monotonic() when it was held
    user: str | None = None
    claim: Claim | None = None
    # Its clock (the router's own time on it: its overhead) and, with tracing on, its spans.
    trace: RequestTrace = field(default_factory=RequestTrace)
    # The request's place under its key's rate limits, given back with its tokens when it ends.
    admission: Admission = UNLIMITED
    key_prefix: str | None = None  # the display prefix of the API key that made it
    # The request's text and its block hashes as the prefix map cuts it, and the node likely to hold its
    # prefix (see affinity.py); None when affinity is off.
    text: str | None = None
    chain: list[int] = field(default_factory=list)
    affinity: Affinity | None = None
    # How the answer reaches the client: a whole answer as the node's (chat, completion, embeddings) or
    # translated (the Responses API); a stream's chunks as they are, or translated by another writer.
    present: Callable[[dict[str, Any]], dict[str, Any]] = _as_is
    open_sse: Callable[[web.Request, dict[str, str]], Awaitable[SseWriter]] = SseWriter.relay
    # What happened to it, as it goes.
    queue_ms: float | None = None
    dispatched: float | None = None  # time.monotonic() when a node was assigned
    first_token: float | None = None  # time.monotonic() when a stream's first token went to the client
    node: HerdNode | None = None
    overhead_ms: float | None = None  # the router's own time on it, as its usage record has it (see record.py)
    closed: bool = False  # its hold was settled or released (or that is under way): see settle.py
    node_failure: str | None = None  # what a client may be told of the last node that failed it (NodeFailed.said)
    # Model fallbacks: whether the request named `models` (its answers then say `passed_over`), the models it
    # may still go to, in order (or passed over already, when quoted: see fallback.pass_over), and those it left.
    fallbacks: bool = False
    candidates: list[Candidate | PassedOver] = field(default_factory=list)
    passed_over: list[PassedOver] = field(default_factory=list)
    # A batch line (llamakit.router.batches): priced at `discount` × its price, queued at BATCH_BID behind every
    # interactive request, for up to `queue_timeout` seconds (None: --queue-timeout). None: an interactive request.
    discount: Decimal | None = None
    queue_timeout: float | None = None
    # A batch line whose batch was cancelled (or expired) while it waited for a slot: it leaves the queue as a
    # request whose client went away does, refunded.
    withdrawn: bool = False

    @property
    def multiplier(self) -> Decimal:
        """What its fees are multiplied by: its bid, and a batch line's discount; its usage record's `bid`."""
        return self.bid if self.discount is None else self.bid * self.discount

    @property
    def queue_bid(self) -> Decimal:
        """Its place in the bid queue: its bid, or BATCH_BID for a batch line."""
        return self.bid if self.discount is None else BATCH_BID

    @property
    def cache_salt(self) -> str:
        """Whose prompt cache the request may reuse at its node: its account's only (wire.headers.CACHE_SALT_HEADER)."""
        return f"account-{self.account.id}"

    def log_fields(self, node: HerdNode | None = None) -> dict[str, Any]:
        """The fields of a log line about this request (a JSON line's, see llamakit.logs): its id, account, model
        and node."""
        served = node or self.node
        return {
            "request_id": self.id,
            "account": self.account.name,
            "model": self.model,
            "node": served.name if served is not None else None,
        }

    def charge(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """What `prompt_tokens` (`cached_tokens` of them read from the node's cache) and `completion_tokens` cost
        at this request's fees and bid, never more than the hold: `ceil(bid × (base + prompt_fee × fresh prompt
        tokens + cached_fee × cached tokens + completion_fee × completion_tokens))`, × the discount of a batch line
        (docs/money.md)."""
        return settle_amount(
            self.fees, self.bid, prompt_tokens, completion_tokens, self.held, cached_tokens, discount=self.discount
        )

    def bill(self, usage: dict[str, Any]) -> Bill:
        """The Bill of a node's `usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details`), at this
        request's fees and bid: the cached prompt tokens at their own fee."""
        return self.bill_tokens(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), cached_tokens(usage))

    def bill_tokens(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Bill:
        """The Bill of these tokens at this request's fees and bid: `cached_tokens` of the prompt (at most all of
        it) at their own fee, and what that took off the charge. A finished request's comes from its usage
        (`bill`), a cut, broken or checkpointed stream's from its running counts (wire.node.TokenCounts): the
        same rule for both (docs/money.md#cached-prompt-tokens)."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        charge = self.charge(prompt_tokens, completion_tokens, cached)
        saved = 0
        if cached:
            saved = cache_discount(
                self.fees, self.bid, prompt_tokens, completion_tokens, self.held, cached, discount=self.discount
            )
        return Bill(prompt_tokens, completion_tokens, charge, cached, saved)

    @property
    def generates(self) -> bool:
        """A chat or text completion (or a Response), not embeddings."""
        return not self.path.endswith("/embeddings")

    def passed_over_list(self) -> list[dict[str, str]]:
        """The models passed over, as answers and usage records carry them."""
        return [p.as_dict() for p in self.passed_over]
