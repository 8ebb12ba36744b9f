"""The router's books in one SQLite file: accounts, API keys, deposits, holds, charges, usage and agent events.

Every method is one transaction, so credits are only ever moved, never lost: at any moment
total deposited = Σ balances + Σ open holds + Σ charges (see `Ledger.books`).

Exceptions:

    LedgerError                 anything the ledger refuses, and database failures
    ├── AccountExists           create_account with a name that is taken
    ├── UnknownAccount          no account with that id or name
    ├── InsufficientFunds       hold for more than the balance (carries `needed` and `balance`)
    └── HoldClosed              settle/release of a hold that is not open (or does not exist)

Invalid arguments (a negative amount, a bool where an int belongs) raise `ValueError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypedDict

from llamakit.fees import format_bid

__all__ = [
    "KEY_PREFIX",
    "MAX_AMOUNT",
    "SCHEMA_VERSION",
    "UNATTRIBUTED",
    "Account",
    "AccountExists",
    "AccountState",
    "ApiKey",
    "Books",
    "Event",
    "EventSummary",
    "Hold",
    "HoldClosed",
    "InsufficientFunds",
    "Ledger",
    "LedgerError",
    "Remembered",
    "Settlement",
    "UnknownAccount",
    "UsageRecord",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
KEY_PREFIX: Final = "lk-"
ACCOUNT_KINDS: Final = ("user", "agent", "dev")
# The key under which fees_by_node reports charges that no node was named for.
UNATTRIBUTED: Final = "(unattributed)"
MAX_PAGE: Final = 1000
# Far beyond any real balance, and far below SQLite's 64-bit integers, whose overflow would turn a sum into a float.
MAX_AMOUNT: Final = 10**15
_DISPLAY_PREFIX_LEN: Final = 8
_MAX_NAME_LEN: Final = 100
_MAX_LABEL_LEN: Final = 64

_SCHEMA: Final = (
    """
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('user', 'agent', 'dev')),
        balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
        created REAL NOT NULL
    )
    """,
    """
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        prefix TEXT NOT NULL,
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        created REAL NOT NULL,
        revoked REAL
    )
    """,
    "CREATE INDEX api_keys_account ON api_keys (account_id)",
    "CREATE INDEX api_keys_prefix ON api_keys (prefix)",
    """
    CREATE TABLE deposits (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        amount INTEGER NOT NULL CHECK (amount > 0),
        note TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    )
    """,
    "CREATE INDEX deposits_account ON deposits (account_id)",
    """
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        model TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0),
        bid TEXT NOT NULL DEFAULT '1',
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'released')),
        created REAL NOT NULL,
        closed REAL
    )
    """,
    # Open holds are few and are what books(), account_state() and recover() look for.
    "CREATE INDEX holds_open ON holds (account_id) WHERE status = 'open'",
    """
    CREATE TABLE charges (
        id INTEGER PRIMARY KEY,
        hold_id TEXT NOT NULL UNIQUE REFERENCES holds (id),
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        node TEXT,
        model TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0),
        prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
        created REAL NOT NULL
    )
    """,
    "CREATE INDEX charges_account ON charges (account_id)",
    "CREATE INDEX charges_node ON charges (node)",
    """
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        model TEXT NOT NULL,
        node TEXT,
        status TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cost INTEGER NOT NULL DEFAULT 0 CHECK (cost >= 0),
        bid TEXT NOT NULL,
        held INTEGER NOT NULL,
        latency_ms REAL,
        queue_ms REAL,
        error TEXT,
        created REAL NOT NULL
    )
    """,
    "CREATE INDEX usage_account ON usage (account_id, id)",
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL
    )
    """,
    "CREATE INDEX events_account ON events (account_id, id)",
)

# Version 2: answers remembered by idempotency key, so a retried request is answered, not charged, again.
_SCHEMA_V2: Final = (
    """
    CREATE TABLE idempotency (
        account_id INTEGER NOT NULL REFERENCES accounts (id),
        key TEXT NOT NULL,
        request_id TEXT NOT NULL REFERENCES holds (id),
        fingerprint TEXT NOT NULL,
        response TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (account_id, key)
    )
    """,
)


class LedgerError(Exception):
    """The ledger refused an operation or its database failed; nothing was changed."""


class AccountExists(LedgerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an account named {name!r} already exists; pick another name")
        self.name = name


class UnknownAccount(LedgerError):
    def __init__(self, account: int | str) -> None:
        what = f"id {account}" if isinstance(account, int) else f"name {account!r}"
        super().__init__(f"there is no account with {what}")
        self.account = account


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
    """What the ledger knows about a key: never the key itself, only its display prefix."""

    prefix: str
    account_id: int
    created: float
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class Hold:
    request_id: str
    account_id: int
    model: str
    amount: int
    bid: str
    status: str
    created: float


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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Event:
    id: int
    account_id: int
    kind: str
    data: Mapping[str, Any]
    created: float


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


def _count(name: str, value: object, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_AMOUNT:
        raise ValueError(f"{name} must be at most {MAX_AMOUNT}, got {value}")
    return value


def _label(name: str, value: object, *, limit: int = _MAX_LABEL_LEN) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(value)}")
    return value


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


def _hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", errors="surrogatepass")).hexdigest()


def _account(row: sqlite3.Row) -> Account:
    return Account(id=row["id"], name=row["name"], kind=row["kind"], balance=row["balance"], created=row["created"])


def _hold(row: sqlite3.Row) -> Hold:
    return Hold(
        request_id=row["id"],
        account_id=row["account_id"],
        model=row["model"],
        amount=row["amount"],
        bid=row["bid"],
        status=row["status"],
        created=row["created"],
    )


def _usage(row: sqlite3.Row) -> UsageRecord:
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
    )


class Ledger:
    """Accounts and money in SQLite, safe to share between threads.

    Calls are synchronous: each is a short transaction on one connection guarded by a lock, well under a
    millisecond, so the router calls them straight from its event loop. A file ledger uses WAL with
    synchronous=NORMAL: a power cut may lose the last transactions but never leaves the books unbalanced.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            # An in-memory database answers "memory" and stays as it is.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
            wal = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            if wal:
                # Checkpoints copy the WAL back into the database file: tens of milliseconds that would
                # stall the router's event loop every few dozen commits. A thread of ours does them instead.
                conn.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"cannot open the ledger at {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if wal:
            self._checkpointer = threading.Thread(target=self._checkpoints, name="ledger-checkpoints", daemon=True)
            self._checkpointer.start()

    def _checkpoints(self, every: float = 0.25) -> None:
        """Checkpoint the WAL in the background (PASSIVE: never waits for, or blocks, the writer)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            while not self._stop_checkpoints.wait(every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or locked: the next round will do it
                    log.debug("ledger checkpoint skipped: %s", exc)
        finally:
            conn.close()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger has schema version {version}, newer than this llamakit understands "
                    f"({SCHEMA_VERSION}); upgrade llamakit"
                )
            if version < 1:
                for statement in _SCHEMA:
                    conn.execute(statement)
            if version < 2:
                for statement in _SCHEMA_V2:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            self._checkpointer.join()
            self._checkpointer = None
        with self._lock:
            if not self._closed:
                self._closed = True
                with suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            conn = self._conn
            try:
                conn.execute(begin)
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"ledger database error: {exc}") from exc
                raise

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a balance checked is still the balance when debited,
        # even if another process (the CLI) writes to the same file.
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        # A read transaction so multi-statement reads see one consistent snapshot.
        return self._transaction("BEGIN")

    # -- accounts ------------------------------------------------------------------------------------

    @staticmethod
    def _account_row(conn: sqlite3.Connection, account_id: int) -> sqlite3.Row:
        _count("account_id", account_id)
        row: sqlite3.Row | None = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
        if row is None:
            raise UnknownAccount(account_id)
        return row

    def create_account(self, name: str, *, kind: str = "user") -> Account:
        _label("name", name, limit=_MAX_NAME_LEN)
        if kind not in ACCOUNT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ACCOUNT_KINDS)}, got {kind!r}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AccountExists(name)
            cursor = conn.execute(
                "INSERT INTO accounts (name, kind, created) VALUES (?, ?, ?)", (name, kind, self._clock())
            )
            assert cursor.lastrowid is not None
            return _account(self._account_row(conn, cursor.lastrowid))

    def get_account(self, account_id: int) -> Account:
        with self._read() as conn:
            return _account(self._account_row(conn, account_id))

    def account_by_name(self, name: str) -> Account:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAccount(name)
        return _account(row)

    def list_accounts(self) -> list[Account]:
        with self._read() as conn:
            return [_account(row) for row in conn.execute("SELECT * FROM accounts ORDER BY id")]

    # -- API keys ------------------------------------------------------------------------------------

    def create_key(self, account_id: int) -> str:
        """Make a new API key for the account and return it. This is the only time it is ever visible."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._write() as conn:
            self._account_row(conn, account_id)
            conn.execute(
                "INSERT INTO api_keys (key_hash, prefix, account_id, created) VALUES (?, ?, ?, ?)",
                (_hash_key(key), key[:_DISPLAY_PREFIX_LEN], account_id, self._clock()),
            )
        return key

    def list_keys(self, account_id: int) -> list[ApiKey]:
        with self._read() as conn:
            self._account_row(conn, account_id)
            rows = conn.execute(
                "SELECT prefix, account_id, created, revoked FROM api_keys WHERE account_id = ? "
                "ORDER BY created, prefix",
                (account_id,),
            ).fetchall()
        return [ApiKey(r["prefix"], r["account_id"], r["created"], r["revoked"]) for r in rows]

    def revoke_key(self, prefix_or_key: str) -> int:
        """Revoke a key given whole, or by its 8-character display prefix; returns how many were revoked.

        A prefix that matches more than one active key is refused: give the whole key instead.
        """
        if not isinstance(prefix_or_key, str) or len(prefix_or_key) < _DISPLAY_PREFIX_LEN:
            raise ValueError(f"give a whole API key or its {_DISPLAY_PREFIX_LEN}-character prefix (like 'lk-AbCdE')")
        now = self._clock()
        with self._write() as conn:
            if len(prefix_or_key) > _DISPLAY_PREFIX_LEN:
                cursor = conn.execute(
                    "UPDATE api_keys SET revoked = ? WHERE key_hash = ? AND revoked IS NULL",
                    (now, _hash_key(prefix_or_key)),
                )
                return cursor.rowcount
            matches = conn.execute(
                "SELECT COUNT(*) FROM api_keys WHERE prefix = ? AND revoked IS NULL", (prefix_or_key,)
            ).fetchone()[0]
            if matches > 1:
                raise ValueError(
                    f"the prefix {prefix_or_key!r} matches {matches} active keys; revoke with the whole key"
                )
            cursor = conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE prefix = ? AND revoked IS NULL", (now, prefix_or_key)
            )
            return cursor.rowcount

    def authenticate(self, api_key: str) -> Account | None:
        """The account an active key belongs to, or None.

        The key is looked up by its SHA-256, so no secret is ever compared byte by byte in Python.
        """
        if not isinstance(api_key, str) or not api_key.startswith(KEY_PREFIX):
            return None
        with self._read() as conn:
            row = conn.execute(
                "SELECT accounts.* FROM api_keys JOIN accounts ON accounts.id = api_keys.account_id "
                "WHERE api_keys.key_hash = ? AND api_keys.revoked IS NULL",
                (_hash_key(api_key),),
            ).fetchone()
        return None if row is None else _account(row)

    # -- money ---------------------------------------------------------------------------------------

    def deposit(self, account_id: int, amount: int, *, note: str = "") -> int:
        """Add credits to an account; returns the new balance."""
        _count("amount", amount, positive=True)
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {note!r}")
        with self._write() as conn:
            if self._account_row(conn, account_id)["balance"] + amount > MAX_AMOUNT:
                raise ValueError(f"a balance can be at most {MAX_AMOUNT} credits; deposit less")
            conn.execute(
                "INSERT INTO deposits (account_id, amount, note, created) VALUES (?, ?, ?, ?)",
                (account_id, amount, note, self._clock()),
            )
            conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account_id))
            balance: int = self._account_row(conn, account_id)["balance"]
            return balance

    def hold(self, account_id: int, amount: int, *, request_id: str, model: str, bid: object = "1") -> Hold:
        """Move `amount` from the balance into an open hold for `request_id`.

        Raises InsufficientFunds (and changes nothing) when the balance is smaller than `amount`.
        """
        _count("amount", amount)
        _label("request_id", request_id, limit=_MAX_NAME_LEN)
        _label("model", model, limit=_MAX_NAME_LEN)
        bid_text = _bid_text(bid)
        with self._write() as conn:
            balance = self._account_row(conn, account_id)["balance"]
            if conn.execute("SELECT 1 FROM holds WHERE id = ?", (request_id,)).fetchone():
                raise ValueError(f"request id {request_id!r} has already been used for a hold")
            if balance < amount:
                raise InsufficientFunds(needed=amount, balance=balance)
            conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, account_id))
            conn.execute(
                "INSERT INTO holds (id, account_id, model, amount, bid, created) VALUES (?, ?, ?, ?, ?, ?)",
                (request_id, account_id, model, amount, bid_text, now := self._clock()),
            )
            return Hold(request_id, account_id, model, amount, bid_text, "open", now)

    def find_hold(self, request_id: str) -> Hold | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM holds WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else _hold(row)

    @staticmethod
    def _open_hold(conn: sqlite3.Connection, request_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute("SELECT * FROM holds WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise HoldClosed(request_id, None)
        if row["status"] != "open":
            raise HoldClosed(request_id, row["status"])
        return row

    def settle(
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
    ) -> Settlement:
        """Close an open hold: charge at most the held amount to `node`, return the rest, record usage.

        `bid` defaults to the bid the hold was made with. `remember` stores the answer under the client's
        idempotency key in the same transaction, so no crash can leave a charge whose answer a retry
        would not find.
        """
        _count("charge", charge)
        _count("prompt_tokens", prompt_tokens)
        _count("completion_tokens", completion_tokens)
        _label("status", status)
        if node is not None:
            _label("node", node, limit=_MAX_NAME_LEN)
        latency = _millis("latency_ms", latency_ms)
        queued = _millis("queue_ms", queue_ms)
        bid_text = None if bid is None else _bid_text(bid)
        now = self._clock()
        with self._write() as conn:
            hold = self._open_hold(conn, request_id)
            held: int = hold["amount"]
            account_id: int = hold["account_id"]
            # The hold is the most the client agreed to pay; see fees.settle_amount.
            charged = min(charge, held)
            conn.execute(
                "INSERT INTO charges (hold_id, account_id, node, model, amount, prompt_tokens, "
                "completion_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, account_id, node, hold["model"], charged, prompt_tokens, completion_tokens, now),
            )
            conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (held - charged, account_id))
            conn.execute("UPDATE holds SET status = 'settled', closed = ? WHERE id = ?", (now, request_id))
            self._insert_usage(
                conn,
                hold,
                node=node,
                status=status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost=charged,
                bid=bid_text,
                latency_ms=latency,
                queue_ms=queued,
                error=error,
                now=now,
            )
            if remember is not None:
                conn.execute(
                    "INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (account_id, remember.key, request_id, remember.fingerprint, remember.response, now),
                )
            balance: int = self._account_row(conn, account_id)["balance"]
        return Settlement(
            request_id=request_id,
            account_id=account_id,
            node=node,
            held=held,
            charged=charged,
            refunded=held - charged,
            balance=balance,
        )

    def recall(self, account_id: int, key: str) -> Remembered | None:
        """The answer settled under `key` for this account, if any."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT key, fingerprint, response FROM idempotency WHERE account_id = ? AND key = ?", (account_id, key)
            ).fetchone()
        return None if row is None else Remembered(row["key"], row["fingerprint"], row["response"])

    def release(
        self,
        request_id: str,
        *,
        status: str = "refunded",
        error: str | None = None,
        node: str | None = None,
        latency_ms: float | None = None,
        queue_ms: float | None = None,
    ) -> None:
        """Close an open hold with a full refund (the request failed, timed out or was rejected)."""
        _label("status", status)
        latency = _millis("latency_ms", latency_ms)
        queued = _millis("queue_ms", queue_ms)
        now = self._clock()
        with self._write() as conn:
            hold = self._open_hold(conn, request_id)
            self._refund(
                conn, hold, status=status, error=error, node=node, latency_ms=latency, queue_ms=queued, now=now
            )

    def recover(self) -> int:
        """Refund every open hold, which only a crash can leave behind; returns how many.

        Call it at start-up, before taking requests: any hold still open then belongs to a request that
        died with the previous process.
        """
        return len(self.recover_usage())

    def recover_usage(self) -> list[UsageRecord]:
        """`recover`, returning the usage records of the refunds, so they can go to a usage log like any other."""
        now = self._clock()
        with self._write() as conn:
            holds = conn.execute("SELECT * FROM holds WHERE status = 'open' ORDER BY created").fetchall()
            for hold in holds:
                self._refund(
                    conn,
                    hold,
                    status="recovered",
                    error="the router stopped before the request finished",
                    node=None,
                    latency_ms=None,
                    queue_ms=None,
                    now=now,
                )
            return [
                _usage(conn.execute("SELECT * FROM usage WHERE request_id = ?", (hold["id"],)).fetchone())
                for hold in holds
            ]

    def _refund(
        self,
        conn: sqlite3.Connection,
        hold: sqlite3.Row,
        *,
        status: str,
        error: str | None,
        node: str | None,
        latency_ms: float | None,
        queue_ms: float | None,
        now: float,
    ) -> None:
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (hold["amount"], hold["account_id"]))
        conn.execute("UPDATE holds SET status = 'released', closed = ? WHERE id = ?", (now, hold["id"]))
        self._insert_usage(
            conn,
            hold,
            node=node,
            status=status,
            prompt_tokens=0,
            completion_tokens=0,
            cost=0,
            bid=None,
            latency_ms=latency_ms,
            queue_ms=queue_ms,
            error=error,
            now=now,
        )

    @staticmethod
    def _insert_usage(
        conn: sqlite3.Connection,
        hold: sqlite3.Row,
        *,
        node: str | None,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost: int,
        bid: str | None,
        latency_ms: float | None,
        queue_ms: float | None,
        error: str | None,
        now: float,
    ) -> None:
        conn.execute(
            "INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, completion_tokens, "
            "cost, bid, held, latency_ms, queue_ms, error, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                hold["id"],
                hold["account_id"],
                hold["model"],
                node,
                status,
                prompt_tokens,
                completion_tokens,
                cost,
                hold["bid"] if bid is None else bid,
                hold["amount"],
                latency_ms,
                queue_ms,
                None if error is None else str(error),
                now,
            ),
        )

    # -- reports -------------------------------------------------------------------------------------

    def account_state(self, account_id: int) -> AccountState:
        with self._read() as conn:
            balance: int = self._account_row(conn, account_id)["balance"]
            held, spent, deposited = conn.execute(
                "SELECT "
                "(SELECT COALESCE(SUM(amount), 0) FROM holds WHERE account_id = ?1 AND status = 'open'), "
                "(SELECT COALESCE(SUM(amount), 0) FROM charges WHERE account_id = ?1), "
                "(SELECT COALESCE(SUM(amount), 0) FROM deposits WHERE account_id = ?1)",
                (account_id,),
            ).fetchone()
        return AccountState(balance=balance, held=held, spent=spent, deposited=deposited)

    @staticmethod
    def _page(limit: int, before: int | None) -> tuple[int, int | None]:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ValueError(f"limit must be an int, got {limit!r}")
        if before is not None:
            _count("before", before)
        return max(1, min(MAX_PAGE, limit)), before

    def usage_records(self, account_id: int, *, limit: int = 100, before: int | None = None) -> list[UsageRecord]:
        """An account's finished requests, newest first.

        Page with `before`: pass the smallest `id` of the previous page to get the next one.
        `limit` is clamped to 1..1000.
        """
        limit, before = self._page(limit, before)
        with self._read() as conn:
            self._account_row(conn, account_id)
            rows = conn.execute(
                "SELECT * FROM usage WHERE account_id = ? AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
                (account_id, before, limit),
            ).fetchall()
        return [_usage(row) for row in rows]

    def all_usage(self, limit: int = 100, *, before: int | None = None) -> list[UsageRecord]:
        """Every account's finished requests, newest first, paged like `usage_records`."""
        limit, before = self._page(limit, before)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM usage WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2", (before, limit)
            ).fetchall()
        return [_usage(row) for row in rows]

    def find_usage(self, request_id: str) -> UsageRecord | None:
        """The usage record of a finished request, so a retried request id can be answered, not re-run."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else _usage(row)

    def books(self) -> Books:
        with self._read() as conn:
            deposits, balances, holds, charges = conn.execute(
                "SELECT "
                "(SELECT COALESCE(SUM(amount), 0) FROM deposits), "
                "(SELECT COALESCE(SUM(balance), 0) FROM accounts), "
                "(SELECT COALESCE(SUM(amount), 0) FROM holds WHERE status = 'open'), "
                "(SELECT COALESCE(SUM(amount), 0) FROM charges)"
            ).fetchone()
        return Books(deposits=deposits, balances=balances, holds=holds, charges=charges)

    def fees_by_node(self) -> dict[str, int]:
        """Credits charged per node that served the request (UNATTRIBUTED for charges without a node)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT COALESCE(node, ?), SUM(amount) FROM charges GROUP BY node ORDER BY 1", (UNATTRIBUTED,)
            ).fetchall()
        return {node: total for node, total in rows}

    def fees_total(self) -> int:
        with self._read() as conn:
            total: int = conn.execute("SELECT COALESCE(SUM(amount), 0) FROM charges").fetchone()[0]
        return total

    # -- agent events --------------------------------------------------------------------------------

    def record_event(self, account_id: int, kind: str, data: Mapping[str, Any]) -> int:
        """Store an agent outcome ('buy', 'skip', 'error', 'request', …) with JSON data; returns its id.

        Numeric `position` and `pnl` fields in `data` are reported by `event_summary`.
        """
        _label("kind", kind)
        if not isinstance(data, Mapping):
            raise ValueError(f"event data must be a JSON object (a dict), got {type(data).__name__}")
        try:
            # allow_nan=False: NaN is not JSON, and SQLite's JSON functions would reject the row later.
            text = json.dumps(dict(data), allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event data must be JSON-serialisable without NaN or infinity: {exc}") from exc
        with self._write() as conn:
            self._account_row(conn, account_id)
            cursor = conn.execute(
                "INSERT INTO events (account_id, kind, data, created) VALUES (?, ?, ?, ?)",
                (account_id, kind, text, self._clock()),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def events(self, account_id: int, *, limit: int = 100) -> list[Event]:
        """An account's events, newest first; `limit` is clamped to 1..1000."""
        limit, _ = self._page(limit, None)
        with self._read() as conn:
            self._account_row(conn, account_id)
            rows = conn.execute(
                "SELECT * FROM events WHERE account_id = ? ORDER BY id DESC LIMIT ?", (account_id, limit)
            ).fetchall()
        return [Event(r["id"], r["account_id"], r["kind"], json.loads(r["data"]), r["created"]) for r in rows]

    def event_summary(self) -> dict[str, EventSummary]:
        """Per account name: event counts by kind, the total, the latest numeric position and PnL."""
        summary: dict[str, EventSummary] = {}
        with self._read() as conn:
            for name, kind, count, last in conn.execute(
                "SELECT accounts.name, events.kind, COUNT(*), MAX(events.created) FROM events "
                "JOIN accounts ON accounts.id = events.account_id "
                "GROUP BY events.account_id, events.kind ORDER BY accounts.name, events.kind"
            ):
                entry = summary.setdefault(name, EventSummary(counts={}, total=0, position=None, pnl=None, last=last))
                entry["counts"][kind] = count
                entry["total"] += count
                entry["last"] = max(entry["last"], last)
            for field in ("position", "pnl"):
                path = f"$.{field}"
                for name, value in conn.execute(
                    "SELECT accounts.name, json_extract(events.data, ?1) FROM events "
                    "JOIN accounts ON accounts.id = events.account_id WHERE events.id IN ("
                    "  SELECT MAX(id) FROM events WHERE json_type(data, ?1) IN ('integer', 'real') "
                    "  GROUP BY account_id)",
                    (path,),
                ):
                    if field == "position":
                        summary[name]["position"] = value
                    else:
                        summary[name]["pnl"] = value
        return summary
