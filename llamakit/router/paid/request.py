"""A priced request with an open hold (`PaidRequest`), and the id it goes by everywhere."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from llamakit.money.fees import FeeSchedule, settle_amount
from llamakit.router.affinity import Affinity
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import Account
from llamakit.router.limits import UNLIMITED, Admission
from llamakit.router.paid.idempotency import Claim
from llamakit.router.tracing import RequestTrace
from llamakit.web import SseWriter

__all__ = ["PaidRequest", "new_request_id"]


def new_request_id() -> str:
    """A new request's id: `req-` and 32 hex digits, the microseconds since the epoch and then 72 random bits.

    Ids in the order they are made keep the ledger's indexes on them (holds, charges, usage) growing at one
    end: a batch of settlements writes a few index pages, not one random page per request per index (with
    uuid4 ids, the ledger's thread spent about 15 % more CPU and its checkpoints twice as much).
    """
    return f"req-{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


@dataclass
class PaidRequest:
    """A priced request with an open hold of `held` credits, made by `quote` and closed by `settle`."""

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

    def charge(self, prompt_tokens: int, completion_tokens: int) -> int:
        """What `prompt_tokens` and `completion_tokens` cost at this request's fees and bid, never more than the
        hold: `ceil(bid × (base + prompt_fee × prompt_tokens + completion_fee × completion_tokens))` (docs/money.md)."""
        return settle_amount(self.fees, self.bid, prompt_tokens, completion_tokens, self.held)
