"""What calls return: a `Generation` (text with its metering) and the router's models, info and account.

All are frozen pydantic models that ignore fields they do not know, so a newer router does not break an
older SDK.
"""

from __future__ import annotations

import html
from decimal import Decimal
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from llamakit.money.currency import format_price
from llamakit.sdk._logprobs import TokenLogprob

__all__ = [
    "Account",
    "ApiKeyInfo",
    "CostDetails",
    "Embeddings",
    "Fees",
    "Generation",
    "Info",
    "KeyLimits",
    "KeyRates",
    "KeySpend",
    "Model",
    "ModelInfo",
    "NodeCounts",
    "PassedOver",
    "Prices",
    "PromptTokensDetails",
    "RouterUsage",
    "TokenUsage",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PromptTokensDetails(_Frozen):
    """`cached_tokens`: prompt tokens the node found in its prompt cache (a chat's history, a shared system
    prompt of the same account) and did not decode again. They are among the prompt tokens, priced at the
    model's `cached_prompt_token_fee` when it has one (`Fees`), else as any prompt token."""

    cached_tokens: int | None = None


class CostDetails(_Frozen):
    """What the cost leaves out, as OpenRouter's `cost_details`: `cache_discount` is what the cached prompt tokens'
    own fee took off the price (in the router's currency, exact), `cache_discount_credits` the same in credits."""

    cache_discount: Decimal | None = None
    cache_discount_credits: int | None = None


class PassedOver(_Frozen):
    """A model of a call's `models` that did not serve it: `reason` is the router's error code (`no_node`,
    `queue_full`, `model_not_found` …), `message` what it said."""

    model: str
    reason: str
    message: str | None = None


def credits_as_cost_credits(data: Any) -> Any:
    """Usage as a router older than prices in a currency sent it (or an older SDK logged it): its `cost` was
    the credits charged, which is `cost_credits` now; its price is unknown."""
    if isinstance(data, dict) and "cost_credits" not in data and isinstance(data.get("cost"), int):
        data = {**data, "cost_credits": data["cost"], "cost": None}
    return data


class TokenUsage(_Frozen):
    """Exact token counts as the node's tokenizer counted them, and what they cost: `cost_credits` is what
    the router's ledger charged, `cost` its price in the router's currency (credits × the credit value, an
    exact decimal)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    cost: Decimal | None = None
    cost_credits: int | None = None
    cost_details: CostDetails | None = None

    _older_router = model_validator(mode="before")(credits_as_cost_credits)

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens served from the node's prompt cache, when the node says."""
        return None if self.prompt_tokens_details is None else self.prompt_tokens_details.cached_tokens

    @property
    def cache_discount(self) -> Decimal | None:
        """What the cached prompt tokens' fee took off the price, in the router's currency (None: not said)."""
        return None if self.cost_details is None else self.cost_details.cache_discount

    @property
    def cache_discount_credits(self) -> int | None:
        """The same in credits."""
        return None if self.cost_details is None else self.cost_details.cache_discount_credits


class Generation(_Frozen):
    """One generated text and everything the call measured about it.

    `str(generation)` is the text, so a result can be used where a string is expected. Times are in
    seconds: `latency` is the whole call as the caller waited for it (retries included), `ttft` the time to
    the first text piece of a stream (None for a call that is not streamed), `queue_wait` the time spent in
    the router's bid queue when the router reports it.
    """

    text: str
    model: str | None = None
    node: str | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    cost: Decimal | None = Field(default=None, description="the price of this call in `currency`, exact")
    cost_credits: int | None = Field(default=None, description="credits charged for this call")
    currency: str | None = Field(default=None, description="the router's currency (ISO 4217) that `cost` is in")
    bid: float | None = Field(default=None, description="the bid multiplier the router applied")
    latency: float | None = None
    ttft: float | None = None
    queue_wait: float | None = None
    attempts: int = 1
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="each generated token's log probability, when asked for with `logprobs`"
    )
    passed_over: list[PassedOver] | None = Field(
        default=None,
        description="with `models=`: the models that did not serve the call, in order, and why (`model` served it)",
    )

    def __str__(self) -> str:
        return self.text

    def summary(self) -> str:
        """One line: model and node, tokens, cost and bid, times."""
        parts: list[str] = []
        where = self.model or "?"
        if self.node:
            where += f" on {self.node}"
        if self.passed_over:
            where += " (after " + ", ".join(f"{p.model}: {p.reason}" for p in self.passed_over) + ")"
        parts.append(where)
        if self.usage is not None:
            u = self.usage
            cached = f" ({u.cached_tokens} cached)" if u.cached_tokens else ""
            parts.append(
                f"{u.prompt_tokens} prompt{cached} + {u.completion_tokens} completion = {u.total_tokens} tokens"
            )
        if self.cost_credits is not None:
            price = f" ({price_text(self.cost, self.currency)})" if self.cost is not None else ""
            bid = f" at bid {self.bid:g}" if self.bid is not None else ""
            saved = self.usage.cache_discount_credits if self.usage is not None else None
            cache = f", {saved} saved by the cache" if saved else ""
            parts.append(f"{self.cost_credits} credits{price}{bid}{cache}")
        if self.latency is not None:
            timing = f"{self.latency:.2f} s"
            if self.ttft is not None:
                timing += f" (first token {self.ttft:.2f} s)"
            parts.append(timing)
        if self.attempts > 1:
            parts.append(f"{self.attempts} attempts")
        return " · ".join(parts)

    def _repr_html_(self) -> str:
        return (
            '<div class="llamakit-generation">'
            f'<div style="white-space: pre-wrap">{html.escape(self.text)}</div>'
            f'<div style="opacity: 0.6; font-size: smaller">{html.escape(self.summary())}</div>'
            "</div>"
        )

    def _repr_markdown_(self) -> str:
        return f"{self.text}\n\n<sub>{html.escape(self.summary())}</sub>"


def price_text(cost: Decimal, currency: str | None) -> str:
    """A price for people: '0.000027 USD' (positional, without trailing zeros)."""
    return f"{format_price(cost)} {currency}" if currency else format_price(cost)


class Embeddings(_Frozen):
    """The vectors of one `embed` call, one per input in input order, and what the call measured.

    `vectors[i]` is input i's vector (unit length, as the node's model pools and normalises it); `len()` and
    indexing work on the vectors. `usage.prompt_tokens` counts every token embedded (there are no completion
    tokens), `cost_credits` is what they cost in credits and `cost` its price in `currency`. Times are in
    seconds, as in `Generation`.
    """

    vectors: list[list[float]]
    model: str | None = None
    node: str | None = None
    request_id: str | None = None
    usage: TokenUsage | None = None
    cost: Decimal | None = Field(default=None, description="the price of this call in `currency`, exact")
    cost_credits: int | None = Field(default=None, description="credits charged for this call")
    currency: str | None = Field(default=None, description="the router's currency (ISO 4217) that `cost` is in")
    bid: float | None = Field(default=None, description="the bid multiplier the router applied")
    latency: float | None = None
    queue_wait: float | None = None
    attempts: int = 1

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, index: int) -> list[float]:
        return self.vectors[index]

    @property
    def dimensions(self) -> int:
        """The length of each vector (0 when there are none)."""
        return len(self.vectors[0]) if self.vectors else 0


class Fees(_Frozen):
    """A model's price in credits: a fixed fee per request plus a fee per prompt and per completion token, and a
    fee per prompt token a node read from its cache (`cached_prompt_token_fee`; None: the prompt token fee)."""

    base_fee: int
    prompt_token_fee: int
    completion_token_fee: int
    cached_prompt_token_fee: int | None = None

    @property
    def cached_fee(self) -> int:
        """What a cached prompt token costs: `cached_prompt_token_fee`, else `prompt_token_fee`."""
        return self.prompt_token_fee if self.cached_prompt_token_fee is None else self.cached_prompt_token_fee

    def cost(self, prompt_tokens: int, completion_tokens: int, bid: float = 1.0, cached_tokens: int = 0) -> float:
        """The price in credits at `bid` before the router rounds it up to whole credits (an estimate for
        planning), `cached_tokens` of the prompt tokens at the cached fee; `Model.prices` has the fees in the
        router's currency."""
        fresh = prompt_tokens - cached_tokens
        return bid * (
            self.base_fee
            + self.prompt_token_fee * fresh
            + self.cached_fee * cached_tokens
            + self.completion_token_fee * completion_tokens
        )


class Prices(_Frozen):
    """A model's fees as prices in the router's currency: per request, and per million prompt and completion
    tokens (at bid 1); per million cached prompt tokens when the model has a fee of its own for them."""

    currency: str
    per_request: Decimal
    per_million_prompt_tokens: Decimal
    per_million_completion_tokens: Decimal
    per_million_cached_prompt_tokens: Decimal | None = None


class Model(_Frozen):
    """A model the herd serves (`GET /v1/models`): its fees in credits, and as prices in the router's currency."""

    id: str
    fees: Fees | None = None
    prices: Prices | None = None
    batch_discount: Decimal | None = None  # what a batch line pays of its price (docs/api.md#batches)
    nodes: int | None = None
    slots: int | None = None
    owned_by: str | None = None


class ModelInfo(_Frozen):
    """One model in `GET /v1/info`: its fees (and their prices), how many requests wait for it, how many nodes
    serve it."""

    fees: Fees
    prices: Prices | None = None
    queue_length: int = 0
    nodes: int = 0


class NodeCounts(_Frozen):
    total: int = 0
    ready: int = 0


class Info(_Frozen):
    """The router's public market data (`GET /v1/info`, no key needed): what to pay and what others paid.

    `last_multiplier` is the bid of the request dispatched last; `queue_length` counts waiting requests of
    every model. Out-bid the queue with `bid="auto"`. A credit is worth `credit_value` of `currency`.
    """

    models: dict[str, ModelInfo] = Field(default_factory=dict)
    currency: str | None = None
    credit_value: Decimal | None = None
    batch_discount: Decimal | None = None  # what a batch line pays of its price (docs/api.md#batches)
    queue_length: int = 0
    last_multiplier: float = 1.0
    nodes: NodeCounts = Field(default_factory=NodeCounts)
    default_max_tokens: int | None = None


class KeyLimits(_Frozen):
    """What an API key may do; None is no limit. Spend caps in credits (in all, per UTC day, per UTC month),
    requests and tokens per minute, requests in flight, an expiry (epoch seconds), the models allowed."""

    spend_cap: int | None = None
    spend_cap_day: int | None = None
    spend_cap_month: int | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    expires_at: float | None = None
    models: list[str] | None = None


class KeySpend(_Frozen):
    """Credits an API key has spent (charges of finished requests) in all, today and this month (UTC), and
    `held` for its requests in flight, which count against every cap until they settle."""

    total: int = 0
    today: int = 0
    this_month: int = 0
    held: int = 0


class KeyRates(_Frozen):
    """What the router counts towards a key's rate limits: requests and tokens in the last 60 s, in flight. Only
    a key with a rate limit (rpm, tpm or requests in flight) is counted; for others `rates` is None."""

    requests_last_minute: int = 0
    tokens_last_minute: int = 0
    requests_in_flight: int = 0


class ApiKeyInfo(_Frozen):
    """The API key asking (`GET /v1/key`): its display prefix, the name the operator gave it (None: none, or a
    router that keeps no names), its limits, spend and, per cap, what is left."""

    prefix: str
    name: str | None = None
    active: bool = True
    expired: bool = False
    limits: KeyLimits = Field(default_factory=KeyLimits)
    spend: KeySpend = Field(default_factory=KeySpend)
    remaining: dict[str, int | None] = Field(default_factory=dict)
    rates: KeyRates | None = None


class RouterUsage(_Frozen):
    """One of the account's requests as the router's ledger recorded it (`GET /v1/account/usage`): refused ones
    too (`http_status` set, no tokens, no cost). `cost_credits` is what was charged, `cost` its price in
    `currency` at `credit_value`, what a credit was worth when the request was made (the operator may have
    changed it since; `priced_at_current_value` is true for a record made before the router kept that, priced
    at the value it runs with now, and None from a router that does not say). Times are the router's:
    `created` (epoch seconds) when it was settled or refused, `latency_ms` from its arrival, `queue_ms` waiting
    for a node. `cached_tokens` of the prompt tokens came from a node's cache, which took `cache_discount_credits`
    (`cache_discount` in `currency`) off the cost; `passed_over` names the models of its `models` that did not
    serve it (`model` is the one that did)."""

    id: int
    request_id: str
    model: str
    node: str | None = None
    status: str
    http_status: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_credits: int = 0
    cost: Decimal | None = None
    cache_discount_credits: int = 0
    cache_discount: Decimal | None = None
    passed_over: list[PassedOver] = Field(default_factory=list)
    currency: str | None = None
    credit_value: Decimal | None = Field(
        default=None, validation_alias=AliasChoices("credit_value_exact", "credit_value")
    )
    priced_at_current_value: bool | None = None
    bid: str = "1"
    held: int = 0
    latency_ms: float | None = None
    queue_ms: float | None = None
    error: str | None = None
    user: str | None = None
    key_prefix: str | None = None
    created: float

    @property
    def arrived(self) -> float | None:
        """When the router received the request (epoch seconds), from its own clock."""
        return None if self.latency_ms is None else self.created - self.latency_ms / 1000

    @property
    def dispatched(self) -> float | None:
        """When a node was given the request (epoch seconds, the router's clock); None if it never ran."""
        if self.arrived is None or self.queue_ms is None:
            return None
        return self.arrived + self.queue_ms / 1000


class Account(_Frozen):
    """The caller's account (`GET /v1/account`), in credits: `balance` is free to spend, `held` reserved
    for requests in flight, `spent` charged so far, `deposited` paid in; `key` is the API key asking."""

    id: int | None = None
    name: str | None = None
    kind: str | None = None
    balance: int
    held: int = 0
    spent: int = 0
    deposited: int = 0
    key: ApiKeyInfo | None = None

    def _repr_html_(self) -> str:
        return (
            f"<b>{html.escape(self.name or 'account')}</b>: balance {self.balance}, held {self.held}, "
            f"spent {self.spent}, deposited {self.deposited} credits"
        )
