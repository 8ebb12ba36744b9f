"""The router's own answers and bodies as pydantic models: what `/openapi.json` says its routes take and give.

Request bodies here are what the handlers validate with (strict JSON types: `parse_body`); answers name the
fields a client may rely on and allow others. OpenAI's shapes (completions, embeddings, Responses, the error
body) are in `llamakit.wire.answers`. Credits are integers, times epoch seconds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema, field_validator

from llamakit.money.fees import FeeSchedule
from llamakit.router.ledger import MAX_AMOUNT, MAX_EVENT_BYTES, Event
from llamakit.router.ledger._api_keys import KeyLimits
from llamakit.text import unsafe_at
from llamakit.wire.embeddings import validate_body
from llamakit.wire.errors import ApiError

__all__ = [
    "AccountAnswer",
    "AccountList",
    "BooksAnswer",
    "CurrentKey",
    "Deposit",
    "DepositAnswer",
    "EventCreated",
    "EventList",
    "FeesDeleted",
    "FeesSet",
    "Health",
    "HeartbeatAnswer",
    "Info",
    "Joined",
    "KeyChange",
    "KeyCreated",
    "KeyList",
    "KeyView",
    "Left",
    "Live",
    "ModelEntry",
    "ModelList",
    "NewAccount",
    "NewAccountAnswer",
    "NewEvent",
    "NewKey",
    "NodeHeartbeat",
    "NodeJoin",
    "NodeLeave",
    "NodeList",
    "NodeRemoved",
    "NodeView",
    "Ready",
    "Revoked",
    "Stats",
    "TenantAccount",
    "UsagePage",
    "parse_body",
]

_Model = TypeVar("_Model", bound=BaseModel)


def parse_body(model: type[_Model], data: object) -> _Model:
    """`model` from a parsed JSON body; 400 naming the first field in error (`data` not an object: 400 too)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return validate_body(model, data)


class _Body(BaseModel):
    """A request body: strict JSON types; fields it does not name are ignored, as they were before."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# An API key's limits, as `KeyLimits` takes them (`llamakit.router.limits.key_limits` checks them, naming the
# field at fault); null removes a limit when a key's limits are changed.
LimitsBody = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [TypeAdapter(KeyLimits).json_schema(), {"type": "null"}]}),
    Field(description="the key's limits (docs/money.md#key-limits); null: none"),
]
_NAME_ALLOWED = "plain text on one line"


# --- request bodies -----------------------------------------------------------------------------------------


class NewAccount(_Body):
    """`POST /admin/accounts`: an account and its first API key (with `limits`), and an opening deposit."""

    name: str = Field(description="unique; plain text")
    kind: Literal["user", "agent", "dev"] = "user"
    deposit: int = Field(default=0, ge=0, le=MAX_AMOUNT, description="credits")
    limits: LimitsBody = None

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an account needs a 'name'")
        return value.strip()


class Deposit(_Body):
    """`POST /admin/accounts/{account}/deposits`."""

    amount: int = Field(ge=1, le=MAX_AMOUNT, description="credits")
    note: str = ""


class NewKey(_Body):
    """`POST /admin/accounts/{account}/keys`: a name to tell it by (free text, not unique) and its limits."""

    name: Any = Field(default=None, json_schema_extra={"type": ["string", "null"], "maxLength": 100})
    limits: LimitsBody = None


class KeyChange(_Body):
    """`PATCH /admin/keys/{key}`: a new name (null removes it) and/or the limits to change (null removes one)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: Any = Field(default=None, json_schema_extra={"type": ["string", "null"], "maxLength": 100})
    limits: LimitsBody = None


class NewEvent(_Body):
    """`POST /v1/events`: an agent's outcome (`kind` such as buy, skip or error) and its data."""

    kind: str = Field(min_length=1, description="such as 'buy', 'skip' or 'error'")
    data: dict[str, Any] = Field(default_factory=dict, description=f"at most {MAX_EVENT_BYTES} bytes of JSON")


class NodeJoin(_Body):
    """`POST /herd/join`: a node's URL, name, models and slots."""

    url: str = Field(pattern=r"^https?://", description="the node's http(s) URL, as the router reaches it")
    name: str = Field(min_length=1, max_length=64, description=_NAME_ALLOWED)
    models: list[Annotated[str, Field(min_length=1)]]
    slots: int = Field(ge=1, le=1024)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if unsafe_at(value) is not None:
            raise ValueError(f"'name' must be 1 to 64 characters of {_NAME_ALLOWED}")
        return value

    @field_validator("models")
    @classmethod
    def _plain_models(cls, value: list[str]) -> list[str]:
        if any(unsafe_at(m) is not None for m in value):
            raise ValueError(f"'models' must be a list of model names ({_NAME_ALLOWED})")
        return value


class NodeHeartbeat(_Body):
    """`POST /herd/heartbeat`: a joined node says it lives, and what it serves now."""

    name: str
    status: str = Field(default="ready", description="'ready', or another state: no work until ready")
    models: list[str] | None = None
    slots: int | None = Field(default=None, ge=1, le=1024)


class NodeLeave(_Body):
    """`POST /herd/leave`."""

    name: str


# --- answers ------------------------------------------------------------------------------------------------


class Health(_Open):
    status: Literal["ok", "ledger_unavailable"]  # 503 with ledger_unavailable while the ledger cannot be written
    nodes: int
    ready: int
    models: list[str]
    ledger: dict[str, Any] | None = None  # whether the ledger can be written, and since when it cannot


class Ready(_Open):
    ready: bool  # 503 with false while the router takes no paid requests
    reason: str | None = None  # ledger_unavailable


class Live(_Open):
    live: Literal[True]


_BATCH_DISCOUNT = (
    "what a batch line pays of its price (--batch-discount, decimal text): ceil(discount × the charge at bid 1); "
    "docs/money.md#batches"
)


class ModelEntry(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    fees: dict[str, int] = Field(description="credits: base_fee, prompt_token_fee, completion_token_fee")
    prices: dict[str, Any] = Field(description="the fees in the operator's currency (per million tokens)")
    batch_discount: str = Field(description=_BATCH_DISCOUNT)
    nodes: int
    slots: int


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelEntry]


class Info(_Open):
    """`GET /v1/info`: fees, queue lengths and the last multiplier, so that a client can decide what to bid."""

    models: dict[str, dict[str, Any]]
    fees: dict[str, dict[str, int]]
    batch_discount: str = Field(description=_BATCH_DISCOUNT)
    currency: str
    credit_value: float
    credit_value_exact: str
    queue_length: int
    last_multiplier: float
    last_multiplier_exact: str
    nodes: dict[str, int]
    default_max_tokens: int


class KeyView(_Open):
    """An API key as its holder and the operator see it (`llamakit.router.limits.key_view`)."""

    prefix: str
    name: str | None
    created: float
    revoked: float | None
    active: bool
    expired: bool
    limits: KeyLimits
    spend: dict[str, int]
    remaining: dict[str, int | None]
    rates: dict[str, int] | None = None


class CurrentKey(KeyView):
    account: str


class AccountAnswer(_Open):
    id: int
    name: str
    kind: str
    balance: int
    held: int
    spent: int
    deposited: int


class TenantAccount(AccountAnswer):
    key: KeyView


class AccountList(_Open):
    data: list[AccountAnswer]


class NewAccountAnswer(AccountAnswer):
    api_key: str = Field(description="the account's first API key: shown once, never kept")


class DepositAnswer(_Open):
    account: str
    deposited: int
    balance: int


class UsageEntry(_Open):
    id: int
    request_id: str
    account_id: int
    model: str
    node: str | None
    status: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float = Field(description="the price in `currency`")
    cost_credits: int
    bid: str
    held: int
    created: float
    currency: str
    account: str | None = Field(default=None, description="the account's name (the operator's route)")


class UsagePage(_Open):
    object: Literal["list"]
    data: list[UsageEntry]
    has_more: bool
    next_before: int | None


class EventCreated(_Open):
    id: int
    kind: str


class EventList(_Open):
    object: Literal["list"]
    data: list[Event]


class FeesSet(_Open):
    model: str
    base_fee: int
    prompt_token_fee: int
    completion_token_fee: int


class FeesDeleted(_Open):
    model: str
    deleted: FeeSchedule
    fees: FeeSchedule | None


class NodeView(_Open):
    id: str
    name: str
    url: str
    models: list[str]
    state: Literal["ready", "draining", "down"]
    slots: int
    n_ctx: int | None
    busy: int


class NodeList(_Open):
    data: list[NodeView]


class NodeRemoved(_Open):
    removed: str


class BooksAnswer(_Open):
    deposits: int
    balances: int
    holds: int
    charges: int
    balanced: bool = Field(description="deposits == balances + holds + charges")
    audit: dict[str, Any] | None = Field(
        default=None, description="what the last audit found: ok (null before one ran), checked, discrepancies"
    )


class Stats(_Open):
    """`GET /admin/stats` (and each event of `/admin/stats/stream`): the dashboard's snapshot."""

    time: float
    uptime: float
    nodes: list[dict[str, Any]]
    queue: dict[str, Any]
    fees: dict[str, Any]
    books: BooksAnswer
    requests: dict[str, Any]
    batches: dict[str, Any] | None = Field(
        default=None, description="open batches, their lines pending and running, and the oldest few (docs/api.md)"
    )


class KeyCreated(_Open):
    account: str
    api_key: str = Field(description="the key: shown once, never kept")
    key: KeyView


class KeyList(_Open):
    account: str
    data: list[KeyView]


class Revoked(_Open):
    revoked: int


class Joined(_Open):
    id: str
    heartbeat_seconds: float


class HeartbeatAnswer(_Open):
    id: str
    state: str


class Left(_Open):
    removed: str | None
