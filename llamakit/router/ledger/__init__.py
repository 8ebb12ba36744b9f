"""The router's books: accounts, API keys, deposits, holds, charges, usage and agent events.

`ledger_at(url)` picks the backend: PostgreSQL for `postgresql://user:password@host:port/dbname`, SQLite for
`sqlite:///path` or a plain path (the embedded default). Both keep one contract (`_contract.Ledger`), migrate
their schema with the versioned SQL files in `migrations/`, and never block the event loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from llamakit.money.currency import CreditValue
from llamakit.router.ledger._api_keys import (
    KEY_LIMIT_FIELDS,
    MAX_KEY_NAME_LEN,
    KeyLimits,
    KeyUse,
    SpendCapExceeded,
    key_name,
)
from llamakit.router.ledger._archive import ARCHIVE_COLUMNS, ArchiveReport
from llamakit.router.ledger._audit import Audit, Discrepancy
from llamakit.router.ledger._contract import (
    KEY_PREFIX,
    MAX_AMOUNT,
    MAX_EVENT_BYTES,
    MAX_EVENTS_KEPT,
    MAX_PAGE,
    UNATTRIBUTED,
    Account,
    AccountActivity,
    AccountExists,
    AccountState,
    ApiKey,
    Books,
    CacheSavings,
    Delivered,
    Event,
    EventSummary,
    Hold,
    HoldClosed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    PeriodTotals,
    Remembered,
    Settlement,
    Totals,
    UnknownAccount,
    UnknownKey,
    UsageRecord,
    hash_key,
)
from llamakit.router.ledger._migrations import latest

__all__ = [
    "ARCHIVE_COLUMNS",
    "KEY_LIMIT_FIELDS",
    "KEY_PREFIX",
    "MAX_AMOUNT",
    "MAX_EVENTS_KEPT",
    "MAX_EVENT_BYTES",
    "MAX_KEY_NAME_LEN",
    "MAX_PAGE",
    "UNATTRIBUTED",
    "Account",
    "AccountActivity",
    "AccountExists",
    "AccountState",
    "ApiKey",
    "ArchiveReport",
    "Audit",
    "Books",
    "CacheSavings",
    "Delivered",
    "Discrepancy",
    "Event",
    "EventSummary",
    "Hold",
    "HoldClosed",
    "InsufficientFunds",
    "KeyLimits",
    "KeyUse",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "PeriodTotals",
    "Remembered",
    "Settlement",
    "SpendCapExceeded",
    "Totals",
    "UnknownAccount",
    "UnknownKey",
    "UsageRecord",
    "backend_of",
    "hash_key",
    "key_name",
    "latest",
    "ledger_at",
    "redacted",
    "sqlite_path",
]

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def backend_of(url: str | os.PathLike[str]) -> str:
    """'postgres' or 'sqlite' for a `--db` value; ValueError for a URL of another kind."""
    text = os.fspath(url)
    scheme = urlsplit(text).scheme if "://" in text else ""
    if scheme in _POSTGRES_SCHEMES:
        return "postgres"
    if scheme in ("", "sqlite"):
        return "sqlite"
    raise ValueError(
        f"--db must be a SQLite file (a path or sqlite:///path) or postgresql://user:password@host:port/dbname; "
        f"got a {scheme}:// URL"
    )


def sqlite_path(url: str | os.PathLike[str]) -> str:
    """The file of a SQLite `--db` value: `sqlite:///rel.db` → 'rel.db', `sqlite:////abs.db` → '/abs.db'."""
    text = os.fspath(url)
    if not text.startswith("sqlite:"):
        return text
    rest = text.removeprefix("sqlite:").removeprefix("//")
    if rest in ("", "/", "/:memory:", ":memory:"):
        return ":memory:"
    return rest.removeprefix("/")


def redacted(url: str | os.PathLike[str]) -> str:
    """`url` fit to print: a PostgreSQL URL without its password."""
    text = os.fspath(url)
    if backend_of(text) != "postgres":
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def ledger_at(
    url: str | os.PathLike[str], *, clock: Callable[[], float] = time.time, money: CreditValue | None = None
) -> Ledger:
    """The ledger `url` names, not yet open: `async with ledger_at(url) as ledger:` opens and migrates it.

    `money` is what a credit is worth to the router: each usage record keeps it, and is priced at it later.

    ValueError for a URL that names no backend llamakit has.
    """
    if backend_of(url) == "postgres":
        from llamakit.router.ledger._postgres import PostgresLedger  # asyncpg only where it is used

        return PostgresLedger(os.fspath(url), display=redacted(url), clock=clock, money=money)
    from llamakit.router.ledger._sqlite import SqliteLedger

    return SqliteLedger(sqlite_path(url), clock=clock, money=money)
