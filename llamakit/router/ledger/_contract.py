"""What every ledger backend promises: the types, the errors, argument checks and the async `Ledger` interface.

The public methods of `Ledger` check their arguments here, once, and hand a backend only what is valid;
a backend (`_sqlite.py`, `_postgres.py`) implements the underscored methods, each one transaction.

Exceptions:

    LedgerError                 anything the ledger refuses, and database failures
    ├── LedgerUnavailable       the database cannot be reached or written now (disk full, PostgreSQL lost)
    ├── AccountExists           create_account with a name that is taken
    ├── UnknownAccount          no account with that id or name
    ├── UnknownKey              no key with that prefix (or whole key)
    ├── InsufficientFunds       hold for more than the balance (carries `needed` and `balance`)
    ├── SpendCapExceeded        hold past one of the key's spend caps (`needed`, `cap`, `period`; see _keys)
    └── HoldClosed              settle/release of a hold that is not open (or does not exist)

Invalid arguments (a negative amount, a bool where an int belongs) raise `ValueError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypedDict, TypeVar

from llamakit.money.currency import CreditValue, format_price, parse_credit_value
from llamakit.money.fees import format_bid
from llamakit.router.ledger._api_keys import (
    KeyLimits,
    KeyUse,
    SpendCapExceeded,
    day_of,
    key_name,
    key_use,
    limits_from_row,
    month_of,
)
from llamakit.router.ledger._archive import ARCHIVE_CHUNK, ArchiveReport, append_lines, start_archive
from llamakit.router.ledger._audit import Audit, AuditSession, audit_scan
from llamakit.router.ledger._base import MAX_AMOUNT, MAX_NAME_LEN, LedgerError, LedgerUnavailable
from llamakit.router.ledger._batches import BatchStore
from llamakit.text import check_name

__all__ = [
    "ACCOUNT_KINDS",
    "KEY_PREFIX",
    "MAX_AMOUNT",
    "MAX_PAGE",
    "UNATTRIBUTED",
    "Account",
    "AccountActivity",
    "AccountExists",
    "AccountState",
    "ApiKey",
    "Books",
    "CacheSavings",
    "Close",
    "Delivered",
    "Event",
    "EventSummary",
    "Hold",
    "HoldClosed",
    "InsufficientFunds",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "PeriodTotals",
    "Refusal",
    "Remembered",
    "Row",
    "Settlement",
    "SpendCapExceeded",
    "Totals",
    "UnknownAccount",
    "UnknownKey",
    "UsageRecord",
    "price_columns",
]

KEY_PREFIX: Final = "lk-"
ACCOUNT_KINDS: Final = ("user", "agent", "dev")
# The key under which fees_by_node reports charges that no node was named for.
UNATTRIBUTED: Final = "(unattributed)"
MAX_PAGE: Final = 1000
DISPLAY_PREFIX_LEN: Final = 8
_MAX_LABEL_LEN: Final = 64
RECOVERED_ERROR: Final = "the router stopped before the request finished"


class AccountExists(LedgerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an account named {name!r} already exists; pick another name")
        self.name = name


class UnknownAccount(LedgerError):
    def __init__(self, account: int | str) -> None:
        what = f"id {account}" if isinstance(account, int) else f"name {account!r}"
        super().__init__(f"there is no account with {what}")
        self.account = account


class UnknownKey(LedgerError):
    def __init__(self, prefix: str | None) -> None:
        super().__init__(f"no API key has the prefix {prefix!r}" if prefix else "no API key matches the key given")
        self.prefix = prefix


class InsufficientFunds(LedgerError):
    def __init__(self, *, needed: int, balance: int) -> None:
        super().__init__(
            f"insufficient funds: the request needs a hold of {needed} credits but the balance is {balance}; "
            f"deposit at least {needed - balance} more, or lower max_tokens or the bid"
        )
        self.needed = needed
        self.balance = balance


class HoldClosed(LedgerError):
    def __init__(self, request_id: str, status: str | None) -> None:
        if status is None:
            message = f"there is no hold for request {request_id!r}"
        else:
            message = f"the hold for request {request_id!r} is already {status}; it can be closed only once"
        super().__init__(message)
        self.request_id = request_id
        self.status = status


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    kind: str
    balance: int
    created: float


@dataclass(frozen=True)
class ApiKey:
    """What the ledger knows about a key: never the key itself, only its display prefix; its limits, the
    spend it has made so far and its name, if it was given one (see `_keys`)."""

    prefix: str
    account_id: int
    created: float
    revoked: float | None
    limits: KeyLimits = field(default_factory=KeyLimits)
    use: KeyUse = field(default_factory=KeyUse)
    name: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class Delivered:
    """What a running stream had delivered to its client at its latest checkpoint (`Ledger.checkpoint`): tokens
    (`cached_tokens` of its prompt read from the node's cache), their charge in credits at the request's fees and
    bid (capped by the hold; the cached tokens at their own fee, which took `cache_discount` off it), the model and
    node that served them, and when (epoch seconds). It is what recovering the hold charges when the router dies
    with it open."""

    prompt_tokens: int
    completion_tokens: int
    charge: int
    model: str
    node: str | None
    at: float
    cached_tokens: int = 0
    cache_discount: int = 0


@dataclass(frozen=True)
class Hold:
    request_id: str
    account_id: int
    model: str
    amount: int
    bid: str
    status: str
    created: float
    user: str | None = None  # the OpenAI `user` the request named
    key_hash: str | None = None  # the API key that made it (its SHA-256), whose spend caps it counts against
    delivered: Delivered | None = None  # an open stream's latest checkpoint, if it has one


@dataclass(frozen=True)
class Settlement:
    """The outcome of settling a hold: what was charged, what went back to the balance, the new balance."""

    request_id: str
    account_id: int
    node: str | None
    held: int
    charged: int
    refunded: int
    balance: int


@dataclass(frozen=True)
class Remembered:
    """An answer kept under a client's idempotency key: `fingerprint` identifies the request it answered."""

    key: str
    fingerprint: str
    response: str


@dataclass(frozen=True)
class AccountState:
    balance: int
    held: int
    spent: int
    deposited: int


@dataclass(frozen=True)
class UsageRecord:
    id: int
    request_id: str
    account_id: int
    model: str
    node: str | None
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    bid: str
    held: int
    latency_ms: float | None
    queue_ms: float | None
    error: str | None
    created: float
    user: str | None = None  # the OpenAI `user` the request named
    http_status: int | None = None  # set on a refused request's record: the status it was refused with
    key_prefix: str | None = None  # the display prefix of the API key that made the request
    # What a credit was worth when the record was made (exact decimal text) and in which currency; None on
    # records made before the ledger kept them (schema version 9) or by a ledger given no money.
    credit_value: str | None = None
    currency: str | None = None
    # Prompt tokens the node read from its cache (among `prompt_tokens`), and the credits that saved the client
    # (`cost` is after it; see fees.cache_discount). 0 on records made before the ledger kept them (version 12).
    cached_tokens: int = 0
    cache_discount: int = 0
    # The models named before `model` in a request's `models` list that did not serve it, in order, each
    # `{"model", "reason", "message"}` (reason: the error code, such as `no_node` or `queue_full`).
    passed_over: tuple[Mapping[str, str], ...] = ()
    # Milliseconds the router spent on the request itself (its time less the queue's and the node's, up to its
    # settlement); None on refusals, recoveries and records made before schema version 11.
    overhead_ms: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def priced_at(self, current: CreditValue) -> tuple[CreditValue, bool]:
        """The money this record is priced in: its own, or `current` when it has none (True then)."""
        if self.credit_value is None or self.currency is None:
            return current, True
        try:
            return CreditValue(parse_credit_value(self.credit_value), self.currency), False
        except ValueError:  # written behind the ledger's back: priced as the records that have none
            return current, True


@dataclass(frozen=True)
class Event:
    id: int
    account_id: int
    kind: str
    data: Mapping[str, Any]
    created: float


# An event is an outcome an agent reports (a trade, a skip, an error), not a store: its data is bounded, and an
# account keeps its latest MAX_EVENTS_KEPT, so that no tenant can fill the ledger's disk, or slow the operator's
# stats (which read every kept event), for free.
MAX_EVENT_BYTES = 8192
MAX_EVENTS_KEPT = 10_000


class EventSummary(TypedDict):
    """One account's agent events: how many of each kind, and the latest position and PnL reported."""

    counts: dict[str, int]
    total: int
    position: float | None
    pnl: float | None
    last: float


@dataclass(frozen=True)
class Books:
    """Ledger-wide totals in credits."""

    deposits: int
    balances: int
    holds: int
    charges: int

    @property
    def balanced(self) -> bool:
        return self.deposits == self.balances + self.holds + self.charges


@dataclass(frozen=True)
class CacheSavings:
    """Ledger-wide: prompt tokens the nodes read from their caches, and the credits their fee saved the clients."""

    cached_tokens: int
    discount: int


@dataclass(frozen=True)
class PeriodTotals:
    """The whole ledger in one UTC period (`period`: '2026-12-07' a day, '2026-12' a month): credits charged,
    usage records (refusals included), refused requests, and the accounts that made a request in it."""

    period: str
    spent: int = 0
    requests: int = 0
    refusals: int = 0
    accounts: int = 0


@dataclass(frozen=True)
class Totals:
    """The ledger's running totals: the books, how many accounts and usage records (ever, archived ones too), the
    current UTC day and month, and the time before which records were archived (None: never)."""

    books: Books
    accounts: int
    requests: int
    today: PeriodTotals
    month: PeriodTotals
    archived_before: float | None = None


ACCOUNT_ORDERS: Final = ("name", "spent_today")


@dataclass(frozen=True)
class Close:
    """One checked settlement (`charge` is not None) or release of the hold of `request_id`, for a backend.

    `bid` None means the hold's own bid; `now` is the clock's time in seconds since the epoch.
    """

    request_id: str
    charge: int | None
    node: str | None
    status: str
    prompt_tokens: int
    completion_tokens: int
    bid: str | None
    latency_ms: float | None
    queue_ms: float | None
    error: str | None
    remember: Remembered | None
    now: float
    money: CreditValue | None = None  # what the usage record is priced at; None keeps no price
    http_status: int | None = None  # a release's: the error status the request was answered with, if any
    model: str | None = None  # the model that served the request (or was tried last); None: the hold's
    cached_tokens: int = 0
    cache_discount: int = 0
    passed_over: str | None = None  # JSON text of UsageRecord.passed_over; None when none was
    overhead_ms: float | None = None  # the router's own time on the request (UsageRecord.overhead_ms)


def price_columns(money: CreditValue | None) -> tuple[str | None, str | None]:
    """The usage record's `credit_value` (exact decimal text) and `currency` columns for `money`."""
    return (None, None) if money is None else (format_price(money.value), money.currency)


class Row(Protocol):
    """A database row read by column name: `sqlite3.Row` and `asyncpg.Record` both are."""

    def __getitem__(self, key: str, /) -> Any: ...


def account_from(row: Row) -> Account:
    return Account(id=row["id"], name=row["name"], kind=row["kind"], balance=row["balance"], created=row["created"])


def hold_from(row: Row) -> Hold:
    return Hold(
        request_id=row["id"],
        account_id=row["account_id"],
        model=row["model"],
        amount=row["amount"],
        bid=row["bid"],
        status=row["status"],
        created=row["created"],
        user=row["user"],
        key_hash=row["key_hash"],
        delivered=delivered_from(row),
    )


def delivered_from(row: Row) -> Delivered | None:
    """A `holds` row's checkpoint (schema version 14's delivered_* columns, 16's cached ones), or None when it has
    none."""
    if row["delivered_at"] is None:
        return None
    return Delivered(
        prompt_tokens=row["delivered_prompt_tokens"],
        completion_tokens=row["delivered_completion_tokens"],
        charge=row["delivered_charge"],
        model=row["delivered_model"],
        node=row["delivered_node"],
        at=row["delivered_at"],
        cached_tokens=row["delivered_cached_tokens"],
        cache_discount=row["delivered_cache_discount"],
    )


def key_from(row: Row, now: float) -> ApiKey:
    """An `api_keys` row as an ApiKey, its use as of `now`."""
    return ApiKey(row["prefix"], row["account_id"], row["created"], row["revoked"], limits_from_row(row),
                  key_use(row, now), row["name"])  # fmt: skip


RowT = TypeVar("RowT", bound=Row)


def pick_key(rows: Sequence[RowT], prefix: str | None) -> RowT:
    """The key a selector means among the `api_keys` rows it matched: the only one, or the only active one.

    UnknownKey when there is none; ValueError when a prefix matches several active keys (or several revoked
    ones and no active one).
    """
    if not rows:
        raise UnknownKey(prefix)
    if len(rows) > 1:
        active = [r for r in rows if r["revoked"] is None]
        if len(active) != 1:
            raise ValueError(f"the prefix {prefix!r} matches {len(rows)} keys; give the whole key")
        return active[0]
    return rows[0]


def usage_from(row: Row) -> UsageRecord:
    return UsageRecord(
        id=row["id"],
        request_id=row["request_id"],
        account_id=row["account_id"],
        model=row["model"],
        node=row["node"],
        status=row["status"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cost=row["cost"],
        bid=row["bid"],
        held=row["held"],
        latency_ms=row["latency_ms"],
        queue_ms=row["queue_ms"],
        error=row["error"],
        created=row["created"],
        user=row["user"],
        http_status=row["http_status"],
        key_prefix=row["key_prefix"],
        credit_value=row["credit_value"],
        currency=row["currency"],
        cached_tokens=row["cached_tokens"],
        cache_discount=row["cache_discount"],
        passed_over=_passed_over_from(row["passed_over"]),
        overhead_ms=row["overhead_ms"],
    )


def _passed_over_from(text: str | None) -> tuple[Mapping[str, str], ...]:
    if not text:
        return ()
    try:
        entries = json.loads(text)
    except ValueError:  # written behind the ledger's back: nothing to show rather than a failed page
        return ()
    return tuple(e for e in entries if isinstance(e, dict)) if isinstance(entries, list) else ()


def passed_over_text(passed_over: Sequence[Mapping[str, str]] | None) -> str | None:
    """`passed_over` entries (`{"model", "reason", "message"}`, strings) as the JSON text the ledger keeps; None
    for none. ValueError for anything else."""
    if not passed_over:
        return None
    if isinstance(passed_over, str | bytes) or len(passed_over) > MAX_PASSED_OVER:
        raise ValueError(f"passed_over must be a list of at most {MAX_PASSED_OVER} entries, got {passed_over!r}")
    entries = []
    for entry in passed_over:
        if not isinstance(entry, Mapping) or set(entry) != {"model", "reason", "message"}:
            raise ValueError(f"a passed_over entry is {{'model', 'reason', 'message'}}, got {entry!r}")
        if not all(isinstance(v, str) for v in entry.values()):
            raise ValueError(f"a passed_over entry's values are strings, got {entry!r}")
        entries.append({"model": storable(entry["model"][:MAX_NAME_LEN]), "reason": storable(entry["reason"][:64]),
                        "message": storable(entry["message"][:500])})  # fmt: skip
    return json.dumps(entries)


# A request names at most wire.completions.MAX_MODELS models; a few more are room to spare.
MAX_PASSED_OVER: Final = 8


@dataclass(frozen=True)
class Refusal:
    """A request refused before anything was held (a 400, 402, 404 or 429 to a known account), for a backend."""

    request_id: str
    account_id: int
    model: str
    status: str
    http_status: int
    error: str
    user: str | None
    now: float
    key_prefix: str | None = None
    money: CreditValue | None = None  # what the usage record is priced at; None keeps no price
    bid: str = "1"  # the request's price multiplier: a batch line's is its batch's discount


@dataclass(frozen=True)
class AccountActivity:
    """One account as the operator's dashboard shows it: money now, and what it did in a period (since `since`,
    for `account_activity`; in the UTC day, for `top_accounts` and `accounts_page`)."""

    id: int
    name: str
    kind: str
    balance: int
    held: int
    spent: int  # charged in the period
    requests: int  # usage records in the period, refusals included
    refusals: int  # refused requests in the period
    last_seen: float | None  # the newest usage record, ever
    spent_total: int | None = None  # charged in all (top_accounts and accounts_page say; account_activity not)
    deposited: int | None = None  # deposited in all (the same)


def recovery(
    request_id: str,
    delivered: Delivered | None,
    now: float,
    money: CreditValue | None,
    *,
    status: str = "recovered",
    error: str = RECOVERED_ERROR,
) -> Close:
    """The closing of a hold left open by a router that stopped before its request finished (at start-up, or by
    another router of a cluster): what its latest checkpoint says was `delivered` is charged (at most the hold; see
    `Ledger.checkpoint`) and the rest refunded; with no checkpoint (a whole request, whose answer never went out,
    or a stream that had not reached one), all of it is refunded."""
    if delivered is None or delivered.completion_tokens == 0:
        return Close(request_id=request_id, charge=None, node=None, status=status, prompt_tokens=0,
                     completion_tokens=0, bid=None, latency_ms=None, queue_ms=None, error=f"{error}; refunded in full",
                     remember=None, now=now, money=money)  # fmt: skip
    charged = (
        f"{error}; charged for the {delivered.completion_tokens} token(s) delivered by its last checkpoint, "
        "the rest refunded"
    )
    return Close(request_id=request_id, charge=delivered.charge, node=delivered.node, status=status,
                 prompt_tokens=delivered.prompt_tokens, completion_tokens=delivered.completion_tokens, bid=None,
                 latency_ms=None, queue_ms=None, error=charged, remember=None, now=now, money=money,
                 model=delivered.model, cached_tokens=delivered.cached_tokens,
                 cache_discount=delivered.cache_discount)  # fmt: skip


def count(name: str, value: object, *, positive: bool = False) -> int:
    """`value` as a number of credits or tokens in 0..MAX_AMOUNT (1.. when `positive`), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_AMOUNT:
        raise ValueError(f"{name} must be at most {MAX_AMOUNT}, got {value}")
    return value


def storable(text: str) -> str:
    """`text` as both databases can store it: a lone surrogate (valid in a Python str and in JSON's escapes, not
    in UTF-8) and NUL (which PostgreSQL's text refuses) are written as their escapes (`\\ud800`, `\\x00`).
    Any text a client typed can reach the ledger (an OpenAI `user`, a model name, an error quoting a prompt),
    and a write that fails on it would leave a hold open or a refusal unrecorded."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _storable_json(value: Any) -> Any:
    """`value` (JSON-like) with every string in it `storable`: PostgreSQL's json also refuses a lone surrogate's
    escape and \\u0000."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k) if isinstance(k, str) else k: _storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(v) for v in value]
    return value


def _label(name: str, value: object, *, limit: int = _MAX_LABEL_LEN) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(value)}")
    return storable(value)


def _millis(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of milliseconds or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _bid_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(f"bid must be a number or a numeric string, got {value!r}")
    return _label("bid", format_bid(value) if isinstance(value, Decimal) else str(value))


def hash_key(api_key: str) -> str:
    """The SHA-256 (hex) under which an API key is stored."""
    return hashlib.sha256(api_key.encode("utf-8", errors="surrogatepass")).hexdigest()


def _key_selector(prefix_or_key: object) -> tuple[str | None, str | None]:
    """(the SHA-256 of a whole key, None) or (None, a display prefix); ValueError for anything else."""
    if not isinstance(prefix_or_key, str) or len(prefix_or_key) < DISPLAY_PREFIX_LEN:
        raise ValueError(f"give a whole API key or its {DISPLAY_PREFIX_LEN}-character prefix (like 'lk-AbCdE')")
    if len(prefix_or_key) > DISPLAY_PREFIX_LEN:
        return hash_key(prefix_or_key), None
    return None, prefix_or_key


def _page(limit: int, before: int | None) -> tuple[int, int | None]:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"limit must be an int, got {limit!r}")
    if before is not None:
        count("before", before)
    # One past a page: a caller asks for a record more than it shows, to tell whether there are more.
    return max(1, min(MAX_PAGE + 1, limit)), before


class Ledger(ABC):
    """Accounts and money, one transaction per call: credits are only ever moved, never lost.

    At any moment, total deposited = Σ balances + Σ open holds + Σ charges (see `books`). Every method is a
    coroutine and none blocks the event loop. Open with `async with ledger_at(url) as ledger:` (or `await
    ledger.open()` … `await ledger.close()`); the schema is migrated on opening. Amounts are integer credits;
    times (`created`, `revoked`) are seconds since the epoch from the ledger's `clock`.

    `hold`, `settle` and `release` are group-committed: calls that arrive while the database is busy share one
    transaction, each still all-or-nothing on its own, and none returns before its transaction is committed.
    """

    url: str  # where the books are, with any password left out
    batch_store: BatchStore  # files and batches (OpenAI's Batch API), in the same database (see _batches.py)
    events_kept: int = MAX_EVENTS_KEPT  # per account, the latest (see record_event)

    def __init__(self, *, clock: Callable[[], float] = time.time, money: CreditValue | None = None) -> None:
        self._clock = clock
        # What a credit is worth to the router that keeps these books, written on each usage record so that
        # its price stays what it was sold at; None writes none (the record is then priced at the reader's).
        self.money = money
        # The router that makes this ledger's holds, written with each hold where the backend keeps it
        # (PostgreSQL), so that another router can release them when this one's lease runs out.
        self.router_id: str | None = None
        # Group commits run so far: each one transaction for all the holds, settlements and releases in it.
        self.batches = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema to this llamakit's version; LedgerError if that cannot be done."""

    @abstractmethod
    async def close(self) -> None:
        """Finish the calls already made, then disconnect; later calls raise LedgerError. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- accounts --------------------------------------------------------------------------------------

    async def create_account(self, name: str, *, kind: str = "user") -> Account:
        """A new account with a zero balance; AccountExists if `name` is taken, ValueError for a name that is
        empty, longer than MAX_NAME_LEN or holds a control character (see llamakit.text)."""
        _label("name", name, limit=MAX_NAME_LEN)
        check_name(name)  # the name as given: one with a lone surrogate is refused, not stored escaped
        if kind not in ACCOUNT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ACCOUNT_KINDS)}, got {kind!r}")
        return await self._create_account(name, kind, self._clock())

    async def get_account(self, account_id: int) -> Account:
        """UnknownAccount if there is none with that id."""
        return await self._get_account(count("account_id", account_id))

    async def account_by_name(self, name: str) -> Account:
        """UnknownAccount if there is none with that name."""
        return await self._account_by_name(name)

    async def list_accounts(self) -> list[Account]:
        """Every account, by id."""
        return await self._list_accounts()

    # -- API keys --------------------------------------------------------------------------------------

    async def create_key(self, account_id: int, *, limits: KeyLimits | None = None, name: str | None = None) -> str:
        """Make a new API key for the account, with `limits` (none by default) and a `name` to tell it by
        (stripped; none by default), and return it. This is the only time it is ever visible.

        ValueError for a bad name (see `_keys.key_name`).
        """
        name = key_name(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        await self._create_key(
            count("account_id", account_id),
            hash_key(key),
            key[:DISPLAY_PREFIX_LEN],
            self._clock(),
            limits or KeyLimits(),
            name,
        )
        return key

    async def list_keys(self, account_id: int) -> list[ApiKey]:
        """The account's keys (prefixes only) with their limits and use, oldest first."""
        return await self._list_keys(count("account_id", account_id), self._clock())

    async def find_key(self, prefix_or_key: str) -> ApiKey:
        """One key, given whole or by its display prefix, active or revoked, with its limits and use.

        UnknownKey when none matches; ValueError when a prefix matches more than one key.
        """
        key_hash, prefix = _key_selector(prefix_or_key)
        return await self._find_key(key_hash, prefix, self._clock())

    async def key_of(self, key_hash: str) -> ApiKey:
        """The key stored under `key_hash` (its SHA-256, see `hash_key`), active or revoked, with its limits and
        use; UnknownKey when none is."""
        return await self._find_key(key_hash, None, self._clock())

    async def set_key_limits(self, prefix_or_key: str, changes: Mapping[str, Any]) -> ApiKey:
        """Change a key's limits, in one transaction: only the fields in `changes` (a field set to None
        removes that limit; see KeyLimits). Returns the key as it is now.

        UnknownKey when none matches; ValueError for a prefix that matches more than one key, or a bad field.
        """
        key_hash, prefix = _key_selector(prefix_or_key)
        KeyLimits.from_dict(changes)  # refused here, before the database is asked, when a field is bad
        return await self._set_key_limits(key_hash, prefix, lambda old: KeyLimits.from_dict(changes, base=old),
                                          self._clock())  # fmt: skip

    async def rename_key(self, prefix_or_key: str, name: str | None) -> ApiKey:
        """Give a key a new name (stripped), or none with None or a blank name. Returns the key as it is now.

        UnknownKey when none matches; ValueError for a prefix that matches more than one key, or a bad name
        (see `_keys.key_name`).
        """
        key_hash, prefix = _key_selector(prefix_or_key)
        return await self._rename_key(key_hash, prefix, key_name(name), self._clock())

    async def limited_keys(
        self,
        *,
        accounts: Sequence[int] | None = None,
        limit: int | None = None,
        after: tuple[int, float, str] | None = None,
    ) -> list[ApiKey]:
        """The active keys that have a limit, with their use: what the operator's dashboard watches. By account,
        then age, then prefix; only those of `accounts` when given; at most `limit` (clamped to 1..1001) of them,
        after the key `after` (its account id, created, prefix: the last of the previous page) when given."""
        if accounts is not None:
            accounts = [count("account_id", a) for a in accounts]
        if limit is not None:
            limit, _ = _page(limit, None)
        if after is not None:
            account, created, prefix = after
            after = (count("account_id", account), float(created), str(prefix))
        return await self._limited_keys(self._clock(), accounts, limit, after)

    async def revoke_key(self, prefix_or_key: str) -> int:
        """Revoke a key given whole, or by its 8-character display prefix; returns how many were revoked.

        A prefix that matches more than one active key is refused (ValueError): give the whole key instead.
        """
        key_hash, prefix = _key_selector(prefix_or_key)
        return await self._revoke_key(key_hash=key_hash, prefix=prefix, now=self._clock())

    async def authenticate(self, api_key: str) -> Account | None:
        """The account an active (not revoked) key belongs to, or None.

        The key is looked up by its SHA-256, so no secret is ever compared byte by byte in Python.
        """
        found = await self.authenticate_key(api_key)
        return None if found is None else found[0]

    async def authenticate_key(self, api_key: str) -> tuple[Account, ApiKey] | None:
        """An active key's account and the key itself (limits, use), or None. The key's expiry is the
        caller's to apply, so that it can tell an expired key from an unknown one."""
        if not isinstance(api_key, str) or not api_key.startswith(KEY_PREFIX):
            return None
        return await self._authenticate(hash_key(api_key), self._clock())

    # -- money -----------------------------------------------------------------------------------------

    async def deposit(self, account_id: int, amount: int, *, note: str = "") -> int:
        """Add credits to an account; returns the new balance (ValueError past MAX_AMOUNT)."""
        count("amount", amount, positive=True)
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {note!r}")
        return await self._deposit(count("account_id", account_id), amount, note, self._clock())

    async def hold(
        self,
        account_id: int,
        amount: int,
        *,
        request_id: str,
        model: str,
        bid: object = "1",
        user: str | None = None,
        key_hash: str | None = None,
    ) -> Hold:
        """Move `amount` from the balance into an open hold for `request_id`; `user` (OpenAI's field) is kept
        on the hold and on the usage record that closes it. `key_hash` (see `hash_key`) names the API key
        that asks: the hold then counts against its spend caps, and its charge towards the key's spend.

        Raises InsufficientFunds when the balance is smaller than `amount`, SpendCapExceeded when the hold
        would take the key past a spend cap (changing nothing either way), and ValueError when `request_id`
        was used for a hold before or the key does not exist.
        """
        count("account_id", account_id)
        count("amount", amount)
        request_id = _label("request_id", request_id, limit=MAX_NAME_LEN)
        model = _label("model", model, limit=MAX_NAME_LEN)
        if user is not None:
            user = _label("user", user, limit=MAX_NAME_LEN)
        hold = Hold(request_id, account_id, model, amount, _bid_text(bid), "open", self._clock(), user, key_hash)
        await self._hold(hold)
        return hold

    async def find_hold(self, request_id: str) -> Hold | None:
        return await self._find_hold(request_id)

    async def settle(
        self,
        request_id: str,
        *,
        charge: int,
        node: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        status: str = "ok",
        bid: object = None,
        latency_ms: float | None = None,
        queue_ms: float | None = None,
        error: str | None = None,
        remember: Remembered | None = None,
        model: str | None = None,
        cached_tokens: int = 0,
        cache_discount: int = 0,
        passed_over: Sequence[Mapping[str, str]] | None = None,
        overhead_ms: float | None = None,
    ) -> Settlement:
        """Close an open hold: charge at most the held amount to `node`, return the rest, record usage.

        `bid` defaults to the bid the hold was made with; `overhead_ms` is the router's own time on the request.
        `remember` stores the answer under the client's idempotency key in the same transaction, so no crash can
        leave a charge whose answer a retry would not find. `model` is the model that served the request when it
        is not the hold's (a fallback: the charge and the usage record are that model's); `cached_tokens` (among
        `prompt_tokens`) and `cache_discount` (credits they saved) go on the usage record, and so do the models
        `passed_over` before it. HoldClosed when the hold is not open.
        """
        count("charge", charge)
        count("prompt_tokens", prompt_tokens)
        count("completion_tokens", completion_tokens)
        count("cached_tokens", cached_tokens)
        count("cache_discount", cache_discount)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) are part of prompt_tokens ({prompt_tokens})")
        status = _label("status", status)
        if node is not None:
            node = _label("node", node, limit=MAX_NAME_LEN)
        close = Close(
            request_id=request_id,
            charge=charge,
            node=node,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            bid=None if bid is None else _bid_text(bid),
            latency_ms=_millis("latency_ms", latency_ms),
            queue_ms=_millis("queue_ms", queue_ms),
            error=None if error is None else storable(str(error)),
            remember=remember,
            now=self._clock(),
            money=self.money,
            model=None if model is None else _label("model", model, limit=MAX_NAME_LEN),
            cached_tokens=cached_tokens,
            cache_discount=cache_discount,
            passed_over=passed_over_text(passed_over),
            overhead_ms=_millis("overhead_ms", overhead_ms),
        )
        return await self._close_hold(close)

    async def release(
        self,
        request_id: str,
        *,
        status: str = "refunded",
        error: str | None = None,
        node: str | None = None,
        latency_ms: float | None = None,
        queue_ms: float | None = None,
        http_status: int | None = None,
        model: str | None = None,
        passed_over: Sequence[Mapping[str, str]] | None = None,
        overhead_ms: float | None = None,
    ) -> None:
        """Close an open hold with a full refund (the request failed, timed out or was rejected).

        `status` is the error code (`no_node`, `context_length_exceeded` …) when the request was answered with an
        error, and `http_status` that error's status (400 to 599): the usage record then counts as a refusal, as
        one refused before anything was held does. `model` is the model tried last when it is not the hold's, and
        `passed_over` the models tried before it (see `settle`). HoldClosed when the hold is not open.
        """
        status = _label("status", status)
        if node is not None:
            node = _label("node", node, limit=MAX_NAME_LEN)
        if http_status is not None and not 400 <= http_status <= 599:
            raise ValueError(f"http_status must be 400 to 599, got {http_status!r}")
        close = Close(
            request_id=request_id,
            charge=None,
            node=node,
            status=status,
            prompt_tokens=0,
            completion_tokens=0,
            bid=None,
            latency_ms=_millis("latency_ms", latency_ms),
            queue_ms=_millis("queue_ms", queue_ms),
            error=None if error is None else storable(str(error)),
            remember=None,
            now=self._clock(),
            money=self.money,
            http_status=http_status,
            model=None if model is None else _label("model", model, limit=MAX_NAME_LEN),
            passed_over=passed_over_text(passed_over),
            overhead_ms=_millis("overhead_ms", overhead_ms),
        )
        await self._close_hold(close)

    def checkpoint(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        charge: int,
        model: str,
        node: str | None,
        cached_tokens: int = 0,
        cache_discount: int = 0,
    ) -> asyncio.Future[Any]:
        """Note on the open hold of `request_id` what its stream has delivered to the client so far: the tokens
        (`cached_tokens` of the prompt's read from the node's cache), their `charge` (credits, at the request's fees
        and bid, the cached tokens at their own fee, which took `cache_discount` credits off it), the `model` and
        `node` that served them. Should the router die before it settles, recovering the hold (`recover`,
        PostgresLedger.release_lost) charges that, never more than the hold, refunds the rest, and writes the
        cached tokens and the discount on the usage record. Moves no money; a later checkpoint replaces an earlier
        one.

        Queued for the next group commit with the holds and settlements, and returned at once, without waiting:
        the future (its result means nothing) is done when the checkpoint is committed (or found the hold closed
        already, which changes nothing), or fails with LedgerError when the database does. Call it on the event
        loop the ledger runs on. ValueError for a bad count (or more cached tokens than prompt tokens); LedgerError
        at once when the ledger is closed.
        """
        count("prompt_tokens", prompt_tokens)
        count("completion_tokens", completion_tokens)
        count("charge", charge)
        count("cached_tokens", cached_tokens)
        count("cache_discount", cache_discount)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) are part of prompt_tokens ({prompt_tokens})")
        delivered = Delivered(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            charge=charge,
            model=_label("model", model, limit=MAX_NAME_LEN),
            node=None if node is None else _label("node", node, limit=MAX_NAME_LEN),
            at=self._clock(),
            cached_tokens=cached_tokens,
            cache_discount=cache_discount,
        )
        return self._checkpoint(request_id, delivered)

    async def refuse(
        self,
        account_id: int,
        *,
        request_id: str,
        model: str,
        status: str,
        http_status: int,
        error: str,
        user: str | None = None,
        key_prefix: str | None = None,
        bid: object = "1",
    ) -> UsageRecord:
        """Record a request refused before anything was held: a usage record with no tokens and no cost, whose
        `status` is the error code (`insufficient_funds`, `invalid_value` …) and `http_status` the status;
        `key_prefix` is the display prefix of the key that asked; `bid` its price multiplier (a batch line's is
        its batch's discount)."""
        count("account_id", account_id)
        request_id = _label("request_id", request_id, limit=MAX_NAME_LEN)
        status = _label("status", status)
        if not 400 <= http_status <= 599:
            raise ValueError(f"http_status must be 400 to 599, got {http_status!r}")
        refusal = Refusal(
            request_id=request_id,
            account_id=account_id,
            model=storable(str(model)[:MAX_NAME_LEN]),
            status=status,
            http_status=http_status,
            error=storable(str(error)[:2000]),
            user=None if user is None else storable(str(user)[:MAX_NAME_LEN]),
            now=self._clock(),
            key_prefix=None if key_prefix is None else storable(str(key_prefix)[:DISPLAY_PREFIX_LEN]),
            money=self.money,
            bid=_bid_text(bid),
        )
        return await self._refuse(refusal)

    async def recall(self, account_id: int, key: str) -> Remembered | None:
        """The answer settled under idempotency `key` for this account, if any."""
        return await self._recall(account_id, key)

    async def probe(self) -> None:
        """One small write that changes nothing (a row or a header rewritten as it is), committed: returns once the
        database can be written again; LedgerUnavailable while it cannot (see `LedgerUnavailable`)."""
        await self._probe()

    async def recover(self) -> int:
        """Close every open hold, which only a crash can leave behind: charge what its latest `checkpoint` says its
        stream delivered (at most the hold) and refund the rest, or refund it all when it has none; returns how many.

        Call it at start-up, before taking requests: any hold still open then belongs to a request that
        died with the previous process.
        """
        return len(await self.recover_usage())

    async def recover_usage(self) -> list[UsageRecord]:
        """`recover`, returning the usage records it made (status 'recovered'), oldest hold first."""
        return await self._recover(self._clock())

    # -- reports ---------------------------------------------------------------------------------------

    async def account_state(self, account_id: int) -> AccountState:
        """Balance, open holds, charges and deposits of one account, from one snapshot."""
        return await self._account_state(count("account_id", account_id))

    async def usage_records(
        self,
        account_id: int,
        *,
        limit: int = 100,
        before: int | None = None,
        since: float | None = None,
        user: str | None = None,
    ) -> list[UsageRecord]:
        """An account's finished (and refused) requests, newest first; only those created at or after `since`
        (epoch seconds) and naming `user`, when given.

        Page with `before`: pass the smallest `id` of the previous page to get the next one.
        `limit` is clamped to 1..1001 (a page and one more). UnknownAccount when there is no such account.
        """
        limit, before = _page(limit, before)
        return await self._usage_records(count("account_id", account_id), limit, before, since, user)

    async def all_usage(
        self, limit: int = 100, *, before: int | None = None, since: float | None = None, user: str | None = None
    ) -> list[UsageRecord]:
        """Every account's finished requests, newest first, filtered and paged like `usage_records`."""
        limit, before = _page(limit, before)
        return await self._usage_records(None, limit, before, since, user)

    async def account_activity(self, since: float) -> list[AccountActivity]:
        """Every account with its balance, open holds, and its spend, requests and refusals since `since`."""
        return await self._account_activity(since)

    async def find_usage(self, request_id: str) -> UsageRecord | None:
        """The usage record of a finished request, so a retried request id can be answered, not re-run."""
        return await self._find_usage(request_id)

    async def books(self) -> Books:
        """Ledger-wide totals, from one snapshot: the running totals every deposit, hold, settlement and release
        keeps (archived charges included), read without scanning the history. `audit` proves them."""
        return await self._books()

    async def totals(self) -> Totals:
        """The books, the number of accounts and of usage records, and the current UTC day's and month's figures,
        from the running totals, in one snapshot."""
        now = self._clock()
        return await self._totals(day_of(now), month_of(now))

    async def fees_by_node(self) -> dict[str, int]:
        """Credits charged per node that served the request (UNATTRIBUTED for charges without a node), archived
        ones too: a running total per node."""
        return await self._fees_by_node()

    async def fees_total(self) -> int:
        return (await self.books()).charges

    async def top_accounts(self, *, limit: int = 50) -> list[AccountActivity]:
        """The accounts that spent most in the current UTC day (then by id), with that day's figures: at most
        `limit` (1..1001), each read from the running totals."""
        limit, _ = _page(limit, None)
        return await self._accounts_page(day_of(self._clock()), limit, "spent_today", None, None)

    async def accounts_page(
        self, *, limit: int = 50, order: str = "name", after: str | None = None, search: str | None = None
    ) -> list[AccountActivity]:
        """A page of accounts with the current UTC day's figures, for an operator paging through a hundred
        thousand of them: `order` 'name' (after the name `after`) or 'spent_today' (biggest spenders first, after
        the cursor `after`, 'SPENT:ID' of the last one shown); only names containing `search` (any case), when
        given. At most `limit` (1..1001). ValueError for another order or a bad cursor."""
        limit, _ = _page(limit, None)
        if order not in ACCOUNT_ORDERS:
            raise ValueError(f"order must be one of {', '.join(ACCOUNT_ORDERS)}, got {order!r}")
        if after is not None and order == "spent_today":
            spent, _, account = after.partition(":")
            if not (spent.isdigit() and account.isdigit()):
                raise ValueError(f"after must be the cursor 'SPENT:ID' of the last account of a page, got {after!r}")
        if search is not None and not isinstance(search, str):
            raise ValueError(f"search must be a string, got {search!r}")
        return await self._accounts_page(day_of(self._clock()), limit, order, after, search or None)

    async def account_names(self, account_ids: Sequence[int]) -> dict[int, str]:
        """The names of the accounts `account_ids` (unknown ids are left out)."""
        return await self._account_names(sorted({count("account_id", a) for a in account_ids}))

    async def audit(self) -> Audit:
        """Prove the books by a full scan of the history, against the running totals: every total, every account's
        held, spent and deposited, every node's fees, the current UTC day and month of each account and of the
        ledger, and every key's open holds (see `_audit`). Changes nothing, whatever it finds.

        The history is read in short reads (never one long snapshot), off the ledger's write path: on SQLite on a
        connection and a thread of its own. When an archive runs meanwhile the audit starts again.
        """
        for _ in range(3):
            async with self._audit_session() as session:
                audit = await audit_scan(session, self._clock())
            if audit is not None:
                return audit
        raise LedgerError("archives kept running during the audit: audit again when they are done")

    async def archive(self, before: float, path: str | Path) -> ArchiveReport:
        """Move every usage record created before `before` (epoch seconds), with the hold it closed, its charge and
        its remembered answer, out of the ledger into a new gzip JSON Lines file at `path` (see `_archive`).

        Running totals stay as they were (they count archived records too); what the audit needs of the moved
        records stays in the ledger as one line per account and per node. Open holds are never archived. The
        per-day and per-month figures of periods that end before `before` go with their records. ValueError
        when `path` exists; LedgerError when the database fails (what was moved before stays moved, and in
        the file).
        """
        if isinstance(before, bool) or not isinstance(before, int | float) or not math.isfinite(before):
            raise ValueError(f"before must be a time in epoch seconds, got {before!r}")
        target = Path(path)
        partial = await asyncio.to_thread(start_archive, target)
        records = charged = size = 0
        while rows := await self._archive_read(float(before), ARCHIVE_CHUNK):
            size += await asyncio.to_thread(append_lines, partial, rows)
            await self._archive_remove([int(row["usage_id"]) for row in rows])
            records += len(rows)
            charged += sum(int(row["charged"] or 0) for row in rows)
        await self._archive_finish(float(before), day_of(before), month_of(before))
        await asyncio.to_thread(partial.rename, target)
        return ArchiveReport(path=str(target), before=float(before), records=records, charged=charged, bytes=size)

    async def cache_savings(self) -> CacheSavings:
        """Every usage record's prompt tokens read from a node's cache, and the credits that saved the clients."""
        return await self._cache_savings()

    # -- agent events ----------------------------------------------------------------------------------

    async def record_event(self, account_id: int, kind: str, data: Mapping[str, Any]) -> int:
        """Store an agent outcome ('buy', 'skip', 'error', 'request', …) with JSON data; returns its id.

        Numeric `position` and `pnl` fields in `data` are reported by `event_summary`. ValueError when `data`,
        as compact JSON, is over MAX_EVENT_BYTES. The account keeps its latest `events_kept` events: older
        ones go as new ones come.
        """
        count("account_id", account_id)
        kind = _label("kind", kind)
        if not isinstance(data, Mapping):
            raise ValueError(f"event data must be a JSON object (a dict), got {type(data).__name__}")
        try:
            # allow_nan=False: NaN is not JSON, and the databases' JSON functions would reject the row later.
            text = json.dumps(_storable_json(dict(data)), allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event data must be JSON-serialisable without NaN or infinity: {exc}") from exc
        if len(text) > MAX_EVENT_BYTES:
            raise ValueError(f"event data must be at most {MAX_EVENT_BYTES} bytes as JSON, got {len(text)}")
        return await self._record_event(account_id, kind, text, self._clock())

    async def events(self, account_id: int, *, limit: int = 100) -> list[Event]:
        """An account's events, newest first; `limit` is clamped to 1..1000."""
        limit, _ = _page(limit, None)
        return await self._events(count("account_id", account_id), min(limit, MAX_PAGE))

    async def event_summary(self) -> dict[str, EventSummary]:
        """Per account name: event counts by kind, the total, the latest numeric position and PnL."""
        return await self._event_summary()

    # -- what a backend implements, each one transaction, arguments already checked --------------------

    @abstractmethod
    async def _create_account(self, name: str, kind: str, now: float) -> Account: ...

    @abstractmethod
    async def _get_account(self, account_id: int) -> Account: ...

    @abstractmethod
    async def _account_by_name(self, name: str) -> Account: ...

    @abstractmethod
    async def _list_accounts(self) -> list[Account]: ...

    @abstractmethod
    async def _create_key(
        self, account_id: int, key_hash: str, prefix: str, now: float, limits: KeyLimits, name: str | None
    ) -> None: ...

    @abstractmethod
    async def _list_keys(self, account_id: int, now: float) -> list[ApiKey]: ...

    @abstractmethod
    async def _find_key(self, key_hash: str | None, prefix: str | None, now: float) -> ApiKey:
        """UnknownKey, or ValueError when `prefix` matches several keys."""

    @abstractmethod
    async def _set_key_limits(
        self, key_hash: str | None, prefix: str | None, change: Callable[[KeyLimits], KeyLimits], now: float
    ) -> ApiKey:
        """In one transaction, with the key's row locked: its limits become `change(its limits)`."""

    @abstractmethod
    async def _rename_key(self, key_hash: str | None, prefix: str | None, name: str | None, now: float) -> ApiKey:
        """UnknownKey, or ValueError when `prefix` matches several keys."""

    @abstractmethod
    async def _limited_keys(
        self, now: float, accounts: Sequence[int] | None, limit: int | None, after: tuple[int, float, str] | None
    ) -> list[ApiKey]: ...

    @abstractmethod
    async def _revoke_key(self, *, key_hash: str | None, prefix: str | None, now: float) -> int: ...

    @abstractmethod
    async def _authenticate(self, key_hash: str, now: float) -> tuple[Account, ApiKey] | None: ...

    @abstractmethod
    async def _deposit(self, account_id: int, amount: int, note: str, now: float) -> int: ...

    @abstractmethod
    async def _hold(self, hold: Hold) -> None:
        """Group-committed; InsufficientFunds, UnknownAccount, or ValueError for a used request id."""

    @abstractmethod
    async def _find_hold(self, request_id: str) -> Hold | None: ...

    @abstractmethod
    async def _close_hold(self, close: Close) -> Settlement:
        """Group-committed settle (`close.charge` given) or release; HoldClosed unless the hold is open."""

    @abstractmethod
    def _checkpoint(self, request_id: str, delivered: Delivered) -> asyncio.Future[Any]:
        """Queued for the next group commit, not awaited: writes `delivered` on the hold if it is open."""

    @abstractmethod
    async def _recall(self, account_id: int, key: str) -> Remembered | None: ...

    @abstractmethod
    async def _probe(self) -> None: ...

    @abstractmethod
    async def _recover(self, now: float) -> list[UsageRecord]: ...

    @abstractmethod
    async def _account_state(self, account_id: int) -> AccountState: ...

    @abstractmethod
    async def _usage_records(
        self, account_id: int | None, limit: int, before: int | None, since: float | None, user: str | None
    ) -> list[UsageRecord]: ...

    @abstractmethod
    async def _refuse(self, refusal: Refusal) -> UsageRecord: ...

    @abstractmethod
    async def _account_activity(self, since: float) -> list[AccountActivity]: ...

    @abstractmethod
    async def _find_usage(self, request_id: str) -> UsageRecord | None: ...

    @abstractmethod
    async def _books(self) -> Books: ...

    @abstractmethod
    async def _fees_by_node(self) -> dict[str, int]: ...

    @abstractmethod
    async def _totals(self, day: str, month: str) -> Totals: ...

    @abstractmethod
    async def _accounts_page(
        self, day: str, limit: int, order: str, after: str | None, search: str | None
    ) -> list[AccountActivity]: ...

    @abstractmethod
    async def _account_names(self, account_ids: list[int]) -> dict[int, str]: ...

    @abstractmethod
    def _audit_session(self) -> AbstractAsyncContextManager[AuditSession]:
        """The reads of one audit, off the write path (see `_audit.AuditSession`)."""

    @abstractmethod
    async def _archive_read(self, before: float, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` usage records created before `before` as archive rows (`_archive.ARCHIVE_COLUMNS`)."""

    @abstractmethod
    async def _archive_remove(self, usage_ids: list[int]) -> None:
        """In one transaction: carry the charges and records of these usage records into archived_accounts and
        archived_nodes, and delete them with their holds, charges and remembered answers."""

    @abstractmethod
    async def _archive_finish(self, before: float, day: str, month: str) -> None:
        """Mark the ledger archived before `before`; drop the period rows of periods before `day` and `month`."""

    @abstractmethod
    async def _cache_savings(self) -> CacheSavings: ...

    @abstractmethod
    async def _record_event(self, account_id: int, kind: str, data: str, now: float) -> int: ...

    @abstractmethod
    async def _events(self, account_id: int, limit: int) -> list[Event]: ...

    @abstractmethod
    async def _event_summary(self) -> dict[str, EventSummary]: ...
