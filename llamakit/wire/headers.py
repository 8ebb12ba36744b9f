"""The HTTP headers llamakit adds to OpenAI's API, named once for the router, the node and the SDK.

Client ↔ router: a paid answer carries its request id, node, bid, queue wait, the router's overhead, price and
credits; a client may
send its bid and an idempotency key (Stripe's and OpenAI's `Idempotency-Key`). Router → node: the request id
(the node names its answer after it), whose prompt cache the request may reuse, and the keepalive interval.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BID_HEADER",
    "CACHE_SALT_HEADER",
    "COST_CREDITS_HEADER",
    "COST_HEADER",
    "CURRENCY_HEADER",
    "HEADER_DESCRIPTIONS",
    "IDEMPOTENCY_HEADER",
    "KEEPALIVE_HEADER",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "NODE_HEADER",
    "OVERHEAD_HEADER",
    "PASSED_OVER_HEADER",
    "QUEUE_HEADER",
    "REPLAYED_HEADER",
    "REQUEST_ID_HEADER",
]

# The paid request's id: the id of its usage record in the ledger, and of the node's answer.
REQUEST_ID_HEADER: Final = "X-Llamakit-Request-Id"
NODE_HEADER: Final = "X-Llamakit-Node"  # the node that served the answer
BID_HEADER: Final = "X-Llamakit-Bid"  # the bid (a multiplier ≥ 1), sent by a client or echoed by the router
QUEUE_HEADER: Final = "X-Llamakit-Queue-Ms"  # milliseconds the request waited for a node slot
# Milliseconds the router spent on the request itself: its time less the queue wait and the node's time (for a
# stream, until its first byte; its usage record has the whole stream's; for an answer replayed under an idempotency
# key, the replay's own time). LiteLLM's x-litellm-overhead-duration-ms.
OVERHEAD_HEADER: Final = "X-Llamakit-Overhead-Ms"
COST_HEADER: Final = "X-Llamakit-Cost"  # the price in the operator's currency, as exact decimal text
COST_CREDITS_HEADER: Final = "X-Llamakit-Cost-Credits"  # the integer credits the ledger moved
CURRENCY_HEADER: Final = "X-Llamakit-Currency"  # ISO 4217 code of COST_HEADER, on every answer a node served
# The models of a request's `models` list passed over before the one that served it, in order, as
# `<model>=<reason>` joined by ", " (the model percent-encoded, the reason an error code such as `no_node`).
PASSED_OVER_HEADER: Final = "X-Llamakit-Passed-Over"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"  # "true" on an answer given again under an idempotency key
# Whose prompt cache a request may reuse at its node: one salt per account, so that no tenant's request reuses
# (and, by its cached_tokens or its speed, learns) the start of another tenant's prompt.
CACHE_SALT_HEADER: Final = "X-Llamakit-Cache-Salt"
# How often, in seconds, a node's generation that is advancing says so while no text is due: the router waits
# that long at most for a byte before it takes the node for hung, and sets it from its own node timeout.
KEEPALIVE_HEADER: Final = "X-Llamakit-Keepalive"

MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255  # characters of printable ASCII

# What each header means, as `/openapi.json` describes it (the router's headers; the node's two are internal).
HEADER_DESCRIPTIONS: Final = {
    REQUEST_ID_HEADER: "the paid request's id: its usage record's, and the node's answer's",
    NODE_HEADER: "the node that served the answer",
    BID_HEADER: "the bid, a multiplier from 1 to 1000 on every fee (decimal text, at most 20 decimal places)",
    QUEUE_HEADER: "milliseconds the request waited for a node slot",
    OVERHEAD_HEADER: "milliseconds the router spent on the request itself, less the queue wait and the node's time "
    "(a stream's until its first byte; an answer replayed under an Idempotency-Key has the replay's own)",
    COST_HEADER: "the price in the operator's currency, as exact decimal text (a whole answer; a stream's is in "
    "its usage chunk)",
    COST_CREDITS_HEADER: "the integer credits the ledger charged (a whole answer)",
    CURRENCY_HEADER: "ISO 4217 code of the price",
    IDEMPOTENCY_HEADER: f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters: a retry under the same key "
    "gets the first answer again, never a second charge (docs/api.md#idempotency)",
    REPLAYED_HEADER: "'true' on an answer given again under an Idempotency-Key",
}
