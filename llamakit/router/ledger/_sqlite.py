"""The ledger in one SQLite file, worked by a thread of its own so the event loop never waits on the database.

Calls are queued to the thread as jobs: the jobs made in one turn of the event loop go together, as one item
(one wake-up of the thread). The thread takes every job waiting when it wakes (up to `MAX_BATCH`) and runs them
in one transaction: holds and settlements that arrive together share one commit (group commit). A job that
fails is undone alone: the batch is rolled back and run again with each job inside a SAVEPOINT of its own
(the common batch, where nothing fails, pays for no savepoints). A job's future is resolved only after its
transaction is committed. WAL with synchronous=NORMAL: a power cut may lose the last transactions,
but a crash of the process loses nothing committed, and never leaves the books unbalanced.

The WAL stays bounded under sustained load. A thread of its own copies it back into the database (PASSIVE
checkpoints, fifty a second), which never waits for or blocks the writer, but cannot bring the WAL back to its
start while commits keep coming. So once the WAL holds WAL_RESET_BYTES (as the background counts its frames),
the ledger's own thread, between two batches, runs a RESTART checkpoint with no busy wait: the frames the
background left (a few pages), an fsync of the WAL and of the database, and the next commit writes from the
WAL's start. A reader in the middle of a read (the audit's, an archive's, another process's) or the background
checkpoint at work makes it give up at once and try again after a later batch; past twice WAL_RESET_BYTES it
waits for them, up to WAL_RESET_WAIT_MS. The holds and settlements that arrive meanwhile wait for that
checkpoint: a few milliseconds, once every WAL_RESET_BYTES (see docs/operating.md#the-wal).
`journal_size_limit` truncates the file to WAL_RESET_BYTES when it restarts from a larger one.

Audits and archives read on a connection (and a thread) of their own, in short reads, off the paid path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from llamakit.money.currency import CreditValue
from llamakit.router.ledger._api_keys import (
    HAS_LIMITS,
    KEY_LIMIT_FIELDS,
    KeyLimits,
    cap_refusal,
    day_of,
    key_use,
    limit_columns,
    limits_from_row,
    month_of,
)
from llamakit.router.ledger._audit import AuditFigures, Periods, rows_to_dict
from llamakit.router.ledger._contract import (
    MAX_AMOUNT,
    UNATTRIBUTED,
    Account,
    AccountActivity,
    AccountExists,
    AccountState,
    ApiKey,
    Books,
    CacheSavings,
    Close,
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
    Refusal,
    Remembered,
    Settlement,
    Totals,
    UnknownAccount,
    UsageRecord,
    account_from,
    delivered_from,
    hold_from,
    key_from,
    pick_key,
    price_columns,
    recovery,
    usage_from,
)
from llamakit.router.ledger._migrations import migrate_sqlite
from llamakit.router.ledger._sqlite_batches import SqliteBatches

__all__ = ["SqliteLedger"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# Enough to cover every request in flight at once on a busy router; more would only delay the first of them.
MAX_BATCH: Final = 256
# Past this size the ledger's thread resets the WAL between two batches (see the module's docstring).
WAL_RESET_BYTES: Final = 16 * 1024 * 1024
# What SQLite keeps of a WAL file it restarts by itself.
JOURNAL_SIZE_LIMIT: Final = 16 * 1024 * 1024
# Seconds between two tries to reset the WAL while readers keep it from being reset.
WAL_RESET_RETRY: Final = 0.02
# How long a reset waits for readers and the background checkpoint once the WAL holds twice WAL_RESET_BYTES.
WAL_RESET_WAIT_MS: Final = 1000
BUSY_TIMEOUT_MS: Final = 10_000


@dataclass(frozen=True)
class _Job(Generic[T]):
    run: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    write: bool


@dataclass(frozen=True)
class _Stop:
    done: asyncio.Future[None]


class SqliteLedger(Ledger):
    """The ledger in the SQLite file at `path` (':memory:' for one that lives as long as the object)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time, money: CreditValue | None = None) -> None:
        super().__init__(clock=clock, money=money)
        self.batch_store = SqliteBatches(self)
        self.path = path
        self.url = path
        self._jobs: queue.SimpleQueue[list[_Job[Any]] | _Stop] = queue.SimpleQueue()
        # Jobs made in this turn of the event loop, handed to the thread together at its end.
        self._outbox: list[_Job[Any]] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._wal = "" if path == ":memory:" or path.startswith("file:") else path + "-wal"
        self._wal_tried = 0.0
        self._wal_frames = 0  # in the WAL at the last background checkpoint
        self._frame_bytes = 4096 + 24  # a page and its frame header; the page size is read at opening
        # WAL resets so far, the longest one and the latest ones in seconds: what a checkpoint costs the paid path.
        self.wal_resets = 0
        self.wal_reset_longest = 0.0
        self.wal_reset_latest: deque[float] = deque(maxlen=100)
        # Audits and archives read on a connection of their own, in a thread, one read at a time.
        self._aside: sqlite3.Connection | None = None
        self._aside_lock = asyncio.Lock()

    # -- the thread ------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._worker is not None:
            return
        opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._worker = threading.Thread(target=self._work, args=(opened,), name="ledger-sqlite", daemon=True)
        self._worker.start()
        try:
            wal = await opened
        except BaseException:
            self._worker = None
            raise
        if wal:
            self._checkpointer = threading.Thread(target=self._checkpoints, name="ledger-checkpoints", daemon=True)
            self._checkpointer.start()

    def _connect(self) -> tuple[sqlite3.Connection, bool]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            _with_retries(lambda: _to_wal_and_migrated(conn))
            wal: bool = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            if wal:
                # Checkpoints copy the WAL back into the database file: tens of milliseconds that would stall
                # this thread every few dozen commits. A thread of their own does them instead.
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
                self._frame_bytes = conn.execute("PRAGMA page_size").fetchone()[0] + 24
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(f"cannot open the ledger at {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn, wal

    def _work(self, opened: asyncio.Future[bool]) -> None:
        loop = opened.get_loop()
        try:
            conn, wal = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle_futures, [(opened, False, exc)])
            return
        loop.call_soon_threadsafe(_settle_futures, [(opened, True, wal)])
        stop: _Stop | None = None
        try:
            while stop is None:
                first = self._jobs.get()
                if isinstance(first, _Stop):
                    stop = first
                    break
                batch: list[_Job[Any]] = first
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(more, _Stop):
                        stop = more
                        break
                    batch.extend(more)
                self._run(conn, batch)
                if wal and self._wal:
                    self._bound_wal(conn)
        finally:
            if wal:
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.debug("ledger checkpoint at close skipped: %s", exc)
            conn.close()
            if stop is not None:
                stop.done.get_loop().call_soon_threadsafe(_settle_futures, [(stop.done, True, None)])

    def _run(self, conn: sqlite3.Connection, batch: list[_Job[Any]]) -> None:
        """Run a batch of jobs in one transaction and hand each its outcome once it is committed."""
        # IMMEDIATE takes the write lock up front, so a balance checked is still the balance when debited,
        # even if another process writes to the same file.
        begin = "BEGIN IMMEDIATE" if any(job.write for job in batch) else "BEGIN"
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            conn.execute(begin)
            try:
                outcomes = [(job.future, True, job.run(conn)) for job in batch]
            except BaseException as exc:
                conn.execute("ROLLBACK")
                if len(batch) == 1:
                    outcomes = [(batch[0].future, False, _database_error(exc))]
                else:  # again, each job undone alone if it fails
                    conn.execute(begin)
                    outcomes = [self._one(conn, job) for job in batch]
            if conn.in_transaction:
                conn.execute("COMMIT")
            self.batches += 1
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):  # a failing disk may fail this too; it must not end the thread
                    conn.execute("ROLLBACK")
            failure = _database_error(exc)
            outcomes = [(job.future, False, failure) for job in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
        for loop, theirs in by_loop.items():
            with suppress(RuntimeError):  # that loop is closed: nobody waits for these any more
                loop.call_soon_threadsafe(_settle_futures, theirs)

    @staticmethod
    def _one(conn: sqlite3.Connection, job: _Job[Any]) -> tuple[asyncio.Future[Any], bool, Any]:
        conn.execute("SAVEPOINT job")
        try:
            result = job.run(conn)
        except BaseException as exc:
            conn.execute("ROLLBACK TO job")
            return job.future, False, _database_error(exc)
        finally:
            conn.execute("RELEASE job")
        return job.future, True, result

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        """Between two batches, on the ledger's thread: reset the WAL once it holds WAL_RESET_BYTES (as the last
        background checkpoint counted its frames)."""
        now = time.monotonic()
        held = self._wal_frames * self._frame_bytes
        if held < WAL_RESET_BYTES or now - self._wal_tried < WAL_RESET_RETRY:
            return
        self._wal_tried = now
        # A reader or a checkpoint at work: give up and try later; but past twice the size (a long reader, the
        # background checkpoint copying a large WAL), wait for them, up to WAL_RESET_WAIT_MS.
        wait = WAL_RESET_WAIT_MS if held >= 2 * WAL_RESET_BYTES else 0
        started = time.perf_counter()
        try:
            conn.execute(f"PRAGMA busy_timeout = {wait}")
            busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        except sqlite3.Error as exc:
            log.debug("ledger WAL reset skipped: %s", exc)
            return
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not busy:
            took = time.perf_counter() - started
            self._wal_frames = 0  # the next commit writes from the WAL's start
            self.wal_resets += 1
            self.wal_reset_longest = max(self.wal_reset_longest, took)
            self.wal_reset_latest.append(took)

    def _checkpoints(self, every: float = 0.02) -> None:
        """Checkpoint the WAL in the background (PASSIVE: never waits for, or blocks, the writer), and count the
        frames it holds for `_bound_wal`."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            while not self._stop_checkpoints.wait(every):
                try:
                    self._wal_frames = max(0, conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
                except sqlite3.Error as exc:  # busy or locked: the next round will do it
                    log.debug("ledger checkpoint skipped: %s", exc)
        finally:
            conn.close()

    def _call(self, run: Callable[[sqlite3.Connection], T], *, write: bool = False) -> asyncio.Future[T]:
        if self._closed or self._worker is None:
            raise LedgerError("the ledger is closed" if self._closed else "the ledger is not open: await open()")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._outbox:
            loop.call_soon(self._send)
        self._outbox.append(_Job(run, future, write))
        return future

    def _send(self) -> None:
        jobs, self._outbox = self._outbox, []
        self._jobs.put(jobs)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            await asyncio.to_thread(self._checkpointer.join)
        if self._worker is not None and self._worker.is_alive():
            if self._outbox:
                self._send()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._jobs.put(_Stop(done))
            await done
            await asyncio.to_thread(self._worker.join)
        async with self._aside_lock:
            if self._aside is not None:
                self._aside.close()
                self._aside = None

    async def _read_aside(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """`run` on the connection for audits and archives, in a thread (each call its own read transaction);
        on the ledger's thread for an in-memory ledger, which has no other connection."""
        if not self._wal:
            return await self._call(run)
        async with self._aside_lock:
            if self._closed:
                raise LedgerError("the ledger is closed")

            def read() -> T:
                if self._aside is None:
                    self._aside = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
                    )
                    self._aside.row_factory = sqlite3.Row
                    self._aside.execute("PRAGMA query_only = ON")
                try:
                    self._aside.execute("BEGIN")
                    try:
                        return run(self._aside)
                    finally:
                        self._aside.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise LedgerError(f"ledger database error: {exc}") from exc

            reading = asyncio.ensure_future(asyncio.to_thread(read))
            try:
                return await asyncio.shield(reading)
            except asyncio.CancelledError:
                # The thread still reads on the connection: the lock is held until it is done, or `close` would
                # close the connection under it (a segfault in sqlite3, seen when a router stops mid-audit).
                await asyncio.wait({reading})
                if not reading.cancelled():
                    reading.exception()  # its outcome is nobody's now: read, so that it is not reported as lost
                raise

    # -- accounts and keys -----------------------------------------------------------------------------

    async def _create_account(self, name: str, kind: str, now: float) -> Account:
        def run(conn: sqlite3.Connection) -> Account:
            if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AccountExists(name)
            row = conn.execute(
                "INSERT INTO accounts (name, kind, created) VALUES (?, ?, ?) RETURNING *", (name, kind, now)
            ).fetchone()
            conn.execute("UPDATE ledger_totals SET accounts = accounts + 1")
            return account_from(row)

        return await self._call(run, write=True)

    async def _get_account(self, account_id: int) -> Account:
        return await self._call(lambda conn: account_from(_account_row(conn, account_id)))

    async def _account_by_name(self, name: str) -> Account:
        def run(conn: sqlite3.Connection) -> Account:
            row = conn.execute("SELECT * FROM accounts WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownAccount(name)
            return account_from(row)

        return await self._call(run)

    async def _list_accounts(self) -> list[Account]:
        return await self._call(
            lambda conn: [account_from(r) for r in conn.execute("SELECT * FROM accounts ORDER BY id")]
        )

    async def _create_key(
        self, account_id: int, key_hash: str, prefix: str, now: float, limits: KeyLimits, name: str | None
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            _account_row(conn, account_id)
            conn.execute(
                f"INSERT INTO api_keys (key_hash, prefix, account_id, created, name, {', '.join(KEY_LIMIT_FIELDS)}) "
                f"VALUES (?, ?, ?, ?, ?{', ?' * len(KEY_LIMIT_FIELDS)})",
                (key_hash, prefix, account_id, now, name, *limit_columns(limits)),
            )

        await self._call(run, write=True)

    async def _list_keys(self, account_id: int, now: float) -> list[ApiKey]:
        def run(conn: sqlite3.Connection) -> list[ApiKey]:
            _account_row(conn, account_id)
            rows = conn.execute(
                "SELECT * FROM api_keys WHERE account_id = ? ORDER BY created, prefix", (account_id,)
            ).fetchall()
            return [key_from(r, now) for r in rows]

        return await self._call(run)

    async def _find_key(self, key_hash: str | None, prefix: str | None, now: float) -> ApiKey:
        return await self._call(lambda conn: key_from(_key_row(conn, key_hash, prefix), now))

    async def _set_key_limits(
        self, key_hash: str | None, prefix: str | None, change: Callable[[KeyLimits], KeyLimits], now: float
    ) -> ApiKey:
        def run(conn: sqlite3.Connection) -> ApiKey:
            row = _key_row(conn, key_hash, prefix)
            limits = change(limits_from_row(row))
            conn.execute(
                f"UPDATE api_keys SET {', '.join(f'{name} = ?' for name in KEY_LIMIT_FIELDS)} WHERE key_hash = ?",
                (*limit_columns(limits), row["key_hash"]),
            )
            return key_from(
                conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (row["key_hash"],)).fetchone(), now
            )

        return await self._call(run, write=True)

    async def _rename_key(self, key_hash: str | None, prefix: str | None, name: str | None, now: float) -> ApiKey:
        def run(conn: sqlite3.Connection) -> ApiKey:
            row = _key_row(conn, key_hash, prefix)
            renamed = conn.execute(
                "UPDATE api_keys SET name = ? WHERE key_hash = ? RETURNING *", (name, row["key_hash"])
            ).fetchone()
            return key_from(renamed, now)

        return await self._call(run, write=True)

    async def _limited_keys(
        self, now: float, accounts: Sequence[int] | None, limit: int | None, after: tuple[int, float, str] | None
    ) -> list[ApiKey]:
        where = [f"revoked IS NULL AND {HAS_LIMITS}"]  # the condition of the partial index api_keys_limited
        args: list[object] = []
        if accounts is not None:
            where.append("account_id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(list(accounts)))
        if after is not None:
            where.append("(account_id, created, prefix) > (?, ?, ?)")
            args.extend(after)
        query = f"SELECT * FROM api_keys WHERE {' AND '.join(where)} ORDER BY account_id, created, prefix"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        rows = await self._call(lambda conn: conn.execute(query, args).fetchall())
        return [key_from(row, now) for row in rows]

    async def _revoke_key(self, *, key_hash: str | None, prefix: str | None, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            if key_hash is not None:
                cursor = conn.execute(
                    "UPDATE api_keys SET revoked = ? WHERE key_hash = ? AND revoked IS NULL", (now, key_hash)
                )
                return cursor.rowcount
            matches = conn.execute(
                "SELECT COUNT(*) FROM api_keys WHERE prefix = ? AND revoked IS NULL", (prefix,)
            ).fetchone()[0]
            if matches > 1:
                raise ValueError(f"the prefix {prefix!r} matches {matches} active keys; revoke with the whole key")
            cursor = conn.execute("UPDATE api_keys SET revoked = ? WHERE prefix = ? AND revoked IS NULL", (now, prefix))
            return cursor.rowcount

        return await self._call(run, write=True)

    async def _authenticate(self, key_hash: str, now: float) -> tuple[Account, ApiKey] | None:
        def run(conn: sqlite3.Connection) -> tuple[Account, ApiKey] | None:
            key = conn.execute("SELECT * FROM api_keys WHERE key_hash = ? AND revoked IS NULL", (key_hash,)).fetchone()
            if key is None:
                return None
            return account_from(_account_row(conn, key["account_id"])), key_from(key, now)

        return await self._call(run)

    # -- money -----------------------------------------------------------------------------------------

    async def _deposit(self, account_id: int, amount: int, note: str, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            if _account_row(conn, account_id)["balance"] + amount > MAX_AMOUNT:
                raise ValueError(f"a balance can be at most {MAX_AMOUNT} credits; deposit less")
            conn.execute(
                "INSERT INTO deposits (account_id, amount, note, created) VALUES (?, ?, ?, ?)",
                (account_id, amount, note, now),
            )
            balance: int = conn.execute(
                "UPDATE accounts SET balance = balance + ?1, deposited = deposited + ?1 WHERE id = ?2 "
                "RETURNING balance",
                (amount, account_id),
            ).fetchone()[0]
            conn.execute("UPDATE ledger_totals SET deposits = deposits + ?1, balances = balances + ?1", (amount,))
            return balance

        return await self._call(run, write=True)

    async def _hold(self, hold: Hold) -> None:
        await self._call(lambda conn: _hold(conn, hold), write=True)

    async def _find_hold(self, request_id: str) -> Hold | None:
        def run(conn: sqlite3.Connection) -> Hold | None:
            row = conn.execute("SELECT * FROM holds WHERE id = ?", (request_id,)).fetchone()
            return None if row is None else hold_from(row)

        return await self._call(run)

    async def _close_hold(self, close: Close) -> Settlement:
        return await self._call(lambda conn: _close(conn, close), write=True)

    async def _recall(self, account_id: int, key: str) -> Remembered | None:
        def run(conn: sqlite3.Connection) -> Remembered | None:
            row = conn.execute(
                "SELECT key, fingerprint, response FROM idempotency WHERE account_id = ? AND key = ?", (account_id, key)
            ).fetchone()
            return None if row is None else Remembered(row["key"], row["fingerprint"], row["response"])

        return await self._call(run)

    async def _probe(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            # The schema version rewritten as it is: the database's first page goes to the WAL at the commit,
            # whether or not there is an account.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version = {int(version)}")

        await self._call(run, write=True)

    def _checkpoint(self, request_id: str, delivered: Delivered) -> asyncio.Future[Any]:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE holds SET delivered_prompt_tokens = ?, delivered_completion_tokens = ?, delivered_charge = ?, "
                "delivered_model = ?, delivered_node = ?, delivered_at = ?, delivered_cached_tokens = ?, "
                "delivered_cache_discount = ? WHERE id = ? AND status = 'open'",
                (delivered.prompt_tokens, delivered.completion_tokens, delivered.charge, delivered.model,
                 delivered.node, delivered.at, delivered.cached_tokens, delivered.cache_discount, request_id),
            )  # fmt: skip

        return self._call(run, write=True)

    async def _recover(self, now: float) -> list[UsageRecord]:
        def run(conn: sqlite3.Connection) -> list[UsageRecord]:
            rows = conn.execute("SELECT * FROM holds WHERE status = 'open' ORDER BY created, id").fetchall()
            holds = [row["id"] for row in rows]
            for row in rows:
                _close(conn, recovery(row["id"], delivered_from(row), now, self.money))
            return [
                usage_from(conn.execute("SELECT * FROM usage WHERE request_id = ?", (hold,)).fetchone())
                for hold in holds
            ]

        return await self._call(run, write=True)

    # -- reports ---------------------------------------------------------------------------------------

    async def _account_state(self, account_id: int) -> AccountState:
        def run(conn: sqlite3.Connection) -> AccountState:
            row = _account_row(conn, account_id)
            return AccountState(balance=row["balance"], held=row["held"], spent=row["spent"],
                                deposited=row["deposited"])  # fmt: skip

        return await self._call(run)

    async def _usage_records(
        self, account_id: int | None, limit: int, before: int | None, since: float | None, user: str | None
    ) -> list[UsageRecord]:
        def run(conn: sqlite3.Connection) -> list[UsageRecord]:
            if account_id is not None:
                _account_row(conn, account_id)
            rows = conn.execute(
                "SELECT * FROM usage WHERE (?1 IS NULL OR account_id = ?1) AND (?2 IS NULL OR id < ?2) "
                "AND (?3 IS NULL OR created >= ?3) AND (?4 IS NULL OR user = ?4) ORDER BY id DESC LIMIT ?5",
                (account_id, before, since, user, limit),
            ).fetchall()
            return [usage_from(row) for row in rows]

        return await self._call(run)

    async def _refuse(self, refusal: Refusal) -> UsageRecord:
        def run(conn: sqlite3.Connection) -> UsageRecord:
            seen = conn.execute(
                "UPDATE accounts SET last_seen = MAX(COALESCE(last_seen, ?1), ?1) WHERE id = ?2 RETURNING 1",
                (refusal.now, refusal.account_id),
            ).fetchone()
            if seen is None:
                raise UnknownAccount(refusal.account_id)
            _count_usage(conn, refusal.account_id, refusal.now, 0, refused=True)
            conn.execute("UPDATE ledger_totals SET requests = requests + 1")
            row = conn.execute(
                "INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, completion_tokens, "
                "cost, bid, held, error, created, user, http_status, key_prefix, credit_value, currency) "
                "VALUES (?, ?, ?, NULL, ?, 0, 0, 0, ?, 0, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    refusal.request_id,
                    refusal.account_id,
                    refusal.model,
                    refusal.status,
                    refusal.bid,
                    refusal.error,
                    refusal.now,
                    refusal.user,
                    refusal.http_status,
                    refusal.key_prefix,
                    *price_columns(refusal.money),
                ),
            ).fetchone()
            return usage_from(row)

        return await self._call(run, write=True)

    async def _account_activity(self, since: float) -> list[AccountActivity]:
        def run(conn: sqlite3.Connection) -> list[AccountActivity]:
            rows = conn.execute(
                "SELECT a.id, a.name, a.kind, a.balance, "
                "(SELECT COALESCE(SUM(amount), 0) FROM holds WHERE account_id = a.id AND status = 'open') AS held, "
                "(SELECT COALESCE(SUM(amount), 0) FROM charges WHERE account_id = a.id AND created >= ?1) AS spent, "
                "(SELECT COUNT(*) FROM usage WHERE account_id = a.id AND created >= ?1) AS requests, "
                "(SELECT COUNT(*) FROM usage WHERE account_id = a.id AND created >= ?1 AND http_status IS NOT NULL)"
                " AS refusals, "
                "(SELECT MAX(created) FROM usage WHERE account_id = a.id) AS last_seen "
                "FROM accounts a ORDER BY a.name",
                (since,),
            ).fetchall()
            return [AccountActivity(**dict(row)) for row in rows]

        return await self._call(run)

    async def _find_usage(self, request_id: str) -> UsageRecord | None:
        def run(conn: sqlite3.Connection) -> UsageRecord | None:
            row = conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
            return None if row is None else usage_from(row)

        return await self._call(run)

    async def _books(self) -> Books:
        def run(conn: sqlite3.Connection) -> Books:
            deposits, balances, holds, charges = conn.execute(
                "SELECT deposits, balances, holds, charges FROM ledger_totals"
            ).fetchone()
            return Books(deposits=deposits, balances=balances, holds=holds, charges=charges)

        return await self._call(run)

    async def _totals(self, day: str, month: str) -> Totals:
        def run(conn: sqlite3.Connection) -> Totals:
            row = conn.execute("SELECT * FROM ledger_totals").fetchone()
            periods = {
                r["period"]: PeriodTotals(r["period"], r["spent"], r["requests"], r["refusals"], r["accounts"])
                for r in conn.execute("SELECT * FROM ledger_periods WHERE period IN (?, ?)", (day, month))
            }
            books = Books(row["deposits"], row["balances"], row["holds"], row["charges"])
            return Totals(books=books, accounts=row["accounts"], requests=row["requests"],
                          today=periods.get(day, PeriodTotals(day)), month=periods.get(month, PeriodTotals(month)),
                          archived_before=row["archived_before"])  # fmt: skip

        return await self._call(run)

    async def _cache_savings(self) -> CacheSavings:
        def run(conn: sqlite3.Connection) -> CacheSavings:
            tokens, discount = conn.execute("SELECT cached_tokens, cache_discount FROM ledger_totals").fetchone()
            return CacheSavings(cached_tokens=tokens, discount=discount)

        return await self._call(run)

    async def _fees_by_node(self) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT node, charged FROM node_fees ORDER BY node").fetchall()
            return {node or UNATTRIBUTED: total for node, total in rows}

        return await self._call(run)

    async def _accounts_page(
        self, day: str, limit: int, order: str, after: str | None, search: str | None
    ) -> list[AccountActivity]:
        columns = (
            "a.id, a.name, a.kind, a.balance, a.held, COALESCE(p.spent, 0) AS spent, "
            "COALESCE(p.requests, 0) AS requests, COALESCE(p.refusals, 0) AS refusals, a.last_seen, "
            "a.spent AS spent_total, a.deposited"
        )
        found = "(?3 IS NULL OR instr(lower(a.name), lower(?3)) > 0)"
        if order == "name":
            query = (
                f"SELECT {columns} FROM accounts a LEFT JOIN account_periods p ON p.account_id = a.id AND "
                f"p.period = ?1 WHERE (?2 IS NULL OR a.name > ?2) AND {found} ORDER BY a.name LIMIT ?4"
            )
            args: tuple[object, ...] = (day, after, search, limit)
        else:
            spent, _, account = (after or "").partition(":")
            query = (
                f"SELECT {columns} FROM account_periods p JOIN accounts a ON a.id = p.account_id WHERE p.period = ?1 "
                "AND (?2 IS NULL OR p.spent < ?2 OR (p.spent = ?2 AND p.account_id > ?5)) "
                f"AND {found} ORDER BY p.spent DESC, p.account_id LIMIT ?4"
            )
            args = (day, int(spent) if after else None, search, limit, int(account) if after else None)
        rows = await self._call(lambda conn: conn.execute(query, args).fetchall())
        return [AccountActivity(*row) for row in rows]

    async def _account_names(self, account_ids: list[int]) -> dict[int, str]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT id, name FROM accounts WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(account_ids),)
            ).fetchall()
        )
        return {row["id"]: row["name"] for row in rows}

    # -- the audit and archives ------------------------------------------------------------------------

    @asynccontextmanager
    async def _audit_session(self) -> AsyncIterator[_SqliteAudit]:
        yield _SqliteAudit(self)

    async def _archive_read(self, before: float, limit: int) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(_ARCHIVE_READ, (before, limit)).fetchall()
            return [dict(row) for row in rows]

        return await self._read_aside(run)

    async def _archive_remove(self, usage_ids: list[int]) -> None:
        ids = json.dumps(usage_ids)

        def run(conn: sqlite3.Connection) -> None:
            for statement in _ARCHIVE_REMOVE:
                conn.execute(statement, (ids,))

        await self._call(run, write=True)

    async def _archive_finish(self, before: float, day: str, month: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE ledger_totals SET archived_before = MAX(COALESCE(archived_before, ?1), ?1)", (before,))
            for table in ("account_periods", "ledger_periods"):
                conn.execute(
                    f"DELETE FROM {table} WHERE (length(period) = 10 AND period < ?1) OR "
                    "(length(period) = 7 AND period < ?2)",
                    (day, month),
                )

        await self._call(run, write=True)

    # -- agent events ----------------------------------------------------------------------------------

    async def _record_event(self, account_id: int, kind: str, data: str, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            _account_row(conn, account_id)
            event_id: int = conn.execute(
                "INSERT INTO events (account_id, kind, data, created) VALUES (?, ?, ?, ?) RETURNING id",
                (account_id, kind, data, now),
            ).fetchone()[0]
            conn.execute(_FORGET_OLD_EVENTS, (account_id, self.events_kept))
            return event_id

        return await self._call(run, write=True)

    async def _events(self, account_id: int, limit: int) -> list[Event]:
        def run(conn: sqlite3.Connection) -> list[Event]:
            _account_row(conn, account_id)
            rows = conn.execute(
                "SELECT * FROM events WHERE account_id = ? ORDER BY id DESC LIMIT ?", (account_id, limit)
            ).fetchall()
            return [Event(r["id"], r["account_id"], r["kind"], json.loads(r["data"]), r["created"]) for r in rows]

        return await self._call(run)

    async def _event_summary(self) -> dict[str, EventSummary]:
        return await self._call(_event_summary)


def _to_wal_and_migrated(conn: sqlite3.Connection) -> None:
    # An in-memory database answers "memory" and stays as it is.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    migrate_sqlite(conn)


def _with_retries(step: Callable[[], None], *, within: float = 10.0) -> None:
    """Run `step` again while SQLite reports the database locked, for up to `within` seconds.

    Routers opening one new file together can deadlock on it: one switching it to WAL holds a shared lock
    and wants an exclusive one, while another migrating holds the write lock and wants to commit. SQLite
    then fails one of them at once, without waiting the busy timeout; trying again later succeeds.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _settle_futures(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """On the futures' loop: resolve each (a caller that gave up waiting has cancelled its future)."""
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _database_error(exc: BaseException) -> BaseException:
    """The LedgerError for a database error (LedgerUnavailable when the file cannot be written or read now: full,
    read-only, an I/O error, locked past the timeout); any other exception as it is."""
    if isinstance(exc, sqlite3.Error):
        # OperationalError is what SQLite says of its file and its locks; a bare DatabaseError, of a file it
        # cannot read (corrupt). The other subclasses (IntegrityError, ProgrammingError…) are this code's own.
        unavailable = isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
        error = (LedgerUnavailable if unavailable else LedgerError)(f"ledger database error: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _account_row(conn: sqlite3.Connection, account_id: int) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
    if row is None:
        raise UnknownAccount(account_id)
    return row


def _hold(conn: sqlite3.Connection, hold: Hold) -> None:
    # Two statements when the balance covers the hold, as it mostly does; the reasons for a refusal are looked up
    # only then. A used request id fails the INSERT, and the batch undoes the debit with it.
    debited = conn.execute(
        "UPDATE accounts SET balance = balance - ?1, held = held + ?1 WHERE id = ?2 AND balance >= ?1 "
        "RETURNING balance",
        (hold.amount, hold.account_id),
    ).fetchone()
    if debited is None:
        balance: int = _account_row(conn, hold.account_id)["balance"]
        _unused(conn, hold.request_id)
        raise InsufficientFunds(needed=hold.amount, balance=balance)
    if hold.key_hash is not None:
        _hold_on_key(conn, hold)
    try:
        conn.execute(
            "INSERT INTO holds (id, account_id, model, amount, bid, created, user, key_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (hold.request_id, hold.account_id, hold.model, hold.amount, hold.bid, hold.created, hold.user,
             hold.key_hash),
        )  # fmt: skip
    except sqlite3.IntegrityError:
        _unused(conn, hold.request_id)
        raise
    conn.execute("UPDATE ledger_totals SET balances = balances - ?1, holds = holds + ?1", (hold.amount,))


# The key's spend in this day and month: what is stored, unless it was stored for an earlier one.
_SPENT_DAY = "(CASE WHEN day = :day THEN spent_day ELSE 0 END)"
_SPENT_MONTH = "(CASE WHEN month = :month THEN spent_month ELSE 0 END)"


def _hold_on_key(conn: sqlite3.Connection, hold: Hold) -> None:
    """Count the hold against its key's spend caps; SpendCapExceeded, naming the first cap it would pass."""
    # One statement when the hold fits under every cap, as it mostly does.
    args = {"amount": hold.amount, "key": hold.key_hash, "day": day_of(hold.created), "month": month_of(hold.created)}
    counted = conn.execute(
        f"UPDATE api_keys SET held = held + :amount, spent_day = {_SPENT_DAY}, day = :day, "
        f"spent_month = {_SPENT_MONTH}, month = :month "
        "WHERE key_hash = :key AND (spend_cap IS NULL OR spent + held + :amount <= spend_cap) "
        f"AND (spend_cap_day IS NULL OR {_SPENT_DAY} + held + :amount <= spend_cap_day) "
        f"AND (spend_cap_month IS NULL OR {_SPENT_MONTH} + held + :amount <= spend_cap_month) RETURNING 1",
        args,
    ).fetchone()
    if counted is not None:
        return
    row = conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (hold.key_hash,)).fetchone()
    if row is None:
        raise ValueError("the hold names an API key that does not exist")
    refusal = cap_refusal(limits_from_row(row), key_use(row, hold.created), hold.amount)
    if refusal is None:  # cannot be: the statement above found a cap that this does not
        raise LedgerError("the key's spend caps disagree between SQL and Python")
    raise refusal


def _key_row(conn: sqlite3.Connection, key_hash: str | None, prefix: str | None) -> sqlite3.Row:
    """The one key given by its hash or display prefix (an active key before revoked ones); UnknownKey, or
    ValueError when the prefix is ambiguous."""
    column, value = ("key_hash", key_hash) if key_hash is not None else ("prefix", prefix)
    rows: list[sqlite3.Row] = conn.execute(f"SELECT * FROM api_keys WHERE {column} = ?", (value,)).fetchall()
    return pick_key(rows, prefix)


def _unused(conn: sqlite3.Connection, request_id: str) -> None:
    """ValueError if `request_id` was used for a hold before."""
    if conn.execute("SELECT 1 FROM holds WHERE id = ?", (request_id,)).fetchone():
        raise ValueError(f"request id {request_id!r} has already been used for a hold")


def _close(conn: sqlite3.Connection, close: Close) -> Settlement:
    # Closed and read in one statement; only a hold that is not open needs a second look.
    hold = conn.execute(
        "UPDATE holds SET status = ?, closed = ? WHERE id = ? AND status = 'open' "
        "RETURNING account_id, model, amount, bid, user, key_hash",
        ("settled" if close.charge is not None else "released", close.now, close.request_id),
    ).fetchone()
    if hold is None:
        row = conn.execute("SELECT status FROM holds WHERE id = ?", (close.request_id,)).fetchone()
        raise HoldClosed(close.request_id, None if row is None else row["status"])
    held: int = hold["amount"]
    account_id: int = hold["account_id"]
    model: str = close.model or hold["model"]  # the model that served it: a fallback's, not the hold's
    charged = 0
    if close.charge is not None:
        # The hold is the most the client agreed to pay; see fees.settle_amount.
        charged = min(close.charge, held)
        conn.execute(
            "INSERT INTO charges (hold_id, account_id, node, model, amount, prompt_tokens, completion_tokens, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                close.request_id,
                account_id,
                close.node,
                model,
                charged,
                close.prompt_tokens,
                close.completion_tokens,
                close.now,
            ),
        )
    balance: int = conn.execute(
        "UPDATE accounts SET balance = balance + ?1 - ?2, held = held - ?1, spent = spent + ?2, "
        "last_seen = MAX(COALESCE(last_seen, ?3), ?3) WHERE id = ?4 RETURNING balance",
        (held, charged, close.now, account_id),
    ).fetchone()[0]
    if hold["key_hash"] is not None:
        conn.execute(
            f"UPDATE api_keys SET held = held - :held, spent = spent + :charged, "
            f"spent_day = {_SPENT_DAY} + :charged, day = :day, spent_month = {_SPENT_MONTH} + :charged, "
            "month = :month WHERE key_hash = :key",
            {"held": held, "charged": charged, "key": hold["key_hash"], "day": day_of(close.now),
             "month": month_of(close.now)},
        )  # fmt: skip
    conn.execute(
        "INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, completion_tokens, "
        "cost, bid, held, latency_ms, queue_ms, error, created, user, key_prefix, credit_value, currency, "
        "http_status, overhead_ms, cached_tokens, cache_discount, passed_over) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?, ?, ?, ?, (SELECT prefix FROM api_keys WHERE key_hash = ?), ?, ?, ?, ?, ?, ?, ?)",
        (
            close.request_id,
            account_id,
            model,
            close.node,
            close.status,
            close.prompt_tokens,
            close.completion_tokens,
            charged,
            hold["bid"] if close.bid is None else close.bid,
            held,
            close.latency_ms,
            close.queue_ms,
            close.error,
            close.now,
            hold["user"],
            hold["key_hash"],
            *price_columns(close.money),
            close.http_status,
            close.overhead_ms,
            close.cached_tokens,
            close.cache_discount,
            close.passed_over,
        ),
    )
    if close.remember is not None:
        remember = close.remember
        conn.execute(
            "INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (account_id, remember.key, close.request_id, remember.fingerprint, remember.response, close.now),
        )
    _count_usage(conn, account_id, close.now, charged, refused=close.http_status is not None)
    if close.charge is not None:
        conn.execute(
            "INSERT INTO node_fees (node, charged) VALUES (?, ?) "
            "ON CONFLICT (node) DO UPDATE SET charged = charged + excluded.charged",
            (close.node or "", charged),
        )
    conn.execute(
        "UPDATE ledger_totals SET balances = balances + ?1 - ?2, holds = holds - ?1, charges = charges + ?2, "
        "requests = requests + 1, cached_tokens = cached_tokens + ?3, cache_discount = cache_discount + ?4",
        (held, charged, close.cached_tokens, close.cache_discount),
    )
    return Settlement(
        request_id=close.request_id,
        account_id=account_id,
        node=close.node,
        held=held,
        charged=charged,
        refunded=held - charged,
        balance=balance,
    )


def _count_usage(conn: sqlite3.Connection, account_id: int, now: float, spent: int, *, refused: bool) -> None:
    """One usage record of `account_id` at `now` that charged `spent`: its UTC day's and month's figures, the
    account's and the ledger's (an account's first record of a period counts it among the period's accounts)."""
    day, month = day_of(now), month_of(now)
    rows = conn.execute(
        "INSERT INTO account_periods (account_id, period, spent, requests, refusals) VALUES (?1, ?2, ?4, 1, ?5), "
        "(?1, ?3, ?4, 1, ?5) ON CONFLICT (account_id, period) DO UPDATE SET spent = spent + excluded.spent, "
        "requests = requests + 1, refusals = refusals + excluded.refusals RETURNING period, requests",
        (account_id, day, month, spent, int(refused)),
    ).fetchall()
    first = {period: int(requests == 1) for period, requests in rows}
    conn.execute(
        "INSERT INTO ledger_periods (period, spent, requests, refusals, accounts) VALUES (?1, ?3, 1, ?4, ?5), "
        "(?2, ?3, 1, ?4, ?6) ON CONFLICT (period) DO UPDATE SET spent = spent + excluded.spent, "
        "requests = requests + 1, refusals = refusals + excluded.refusals, accounts = accounts + excluded.accounts",
        (day, month, spent, int(refused), first.get(day, 0), first.get(month, 0)),
    )


class _SqliteAudit:
    """The audit's reads (see `_audit.AuditSession`), each on the ledger's connection for audits and archives."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger

    async def figures(self, periods: Periods) -> AuditFigures:
        return await self._ledger._read_aside(lambda conn: _audit_figures(conn, periods))

    async def sums(self, table: str, low: int, high: int, periods: Periods) -> list[tuple[Any, ...]]:
        query = _AUDIT_SUMS[table]
        args = {"low": low, "high": high, "ds": periods.day_start, "de": periods.day_end,
                "ms": periods.month_start, "me": periods.month_end}  # fmt: skip
        return await self._ledger._read_aside(lambda conn: [tuple(r) for r in conn.execute(query, args)])

    async def archive_mark(self) -> tuple[float | None, int]:
        return await self._ledger._read_aside(_archive_mark)


def _archive_mark(conn: sqlite3.Connection) -> tuple[float | None, int]:
    before, records = conn.execute(
        "SELECT archived_before, (SELECT COALESCE(SUM(records), 0) FROM archived_accounts) FROM ledger_totals"
    ).fetchone()
    return before, records


def _audit_figures(conn: sqlite3.Connection, periods: Periods) -> AuditFigures:
    def rows(query: str, *args: object) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(query, args)]

    names = ("deposits", "balances", "holds", "charges", "accounts", "requests", "cached_tokens", "cache_discount")
    totals = conn.execute(f"SELECT {', '.join(names)}, archived_before FROM ledger_totals").fetchone()
    return AuditFigures(
        totals=dict(zip(names, totals[: len(names)], strict=True)),
        archived_before=totals[len(names)],
        accounts=rows_to_dict(rows("SELECT id, name, balance, held, spent, deposited FROM accounts")),
        open_holds=rows_to_dict(rows(_OPEN_HOLDS_BY.format("account_id"))),
        keys_held={r[0]: (r[1], r[2]) for r in rows(_KEYS_HELD)},
        keys_open=rows_to_dict(rows(_OPEN_HOLDS_BY.format("key_hash"))),
        nodes=rows_to_dict(rows("SELECT node, charged FROM node_fees")),
        periods={
            (r[0], r[1]): (r[2], r[3], r[4])
            for r in rows(
                "SELECT account_id, period, spent, requests, refusals FROM account_periods WHERE period IN (?, ?)",
                periods.day,
                periods.month,
            )
        },
        ledger_periods=rows_to_dict(
            rows(
                "SELECT period, spent, requests, refusals, accounts FROM ledger_periods WHERE period IN (?, ?)",
                periods.day,
                periods.month,
            )
        ),
        archived_accounts=rows_to_dict(
            rows("SELECT account_id, charged, records, cached_tokens, cache_discount FROM archived_accounts")
        ),
        archived_nodes=rows_to_dict(rows("SELECT node, charged FROM archived_nodes")),
        max_ids={
            t: conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0]
            for t in ("deposits", "charges", "usage")
        },
        archive_mark=_archive_mark(conn),
    )


# Open holds summed by a column, from the partial index of open holds.
_OPEN_HOLDS_BY = "SELECT {0}, SUM(amount) FROM holds WHERE status = 'open' AND {0} IS NOT NULL GROUP BY {0}"
_KEYS_HELD = (
    "SELECT key_hash, prefix, held FROM api_keys WHERE held <> 0 "
    "OR key_hash IN (SELECT key_hash FROM holds WHERE status = 'open')"
)
_IN_DAY = "(created >= :ds AND created < :de)"
_IN_MONTH = "(created >= :ms AND created < :me)"
_AUDIT_SUMS = {
    "deposits": (
        "SELECT account_id, SUM(amount), COUNT(*) FROM deposits WHERE id > :low AND id <= :high GROUP BY account_id"
    ),
    "charges": (
        f"SELECT account_id, COALESCE(node, ''), SUM(amount), SUM(CASE WHEN {_IN_DAY} THEN amount ELSE 0 END), "
        f"SUM(CASE WHEN {_IN_MONTH} THEN amount ELSE 0 END), COUNT(*) FROM charges WHERE id > :low AND id <= :high "
        "GROUP BY account_id, COALESCE(node, '')"
    ),
    "usage": (
        f"SELECT account_id, COUNT(*), SUM(http_status IS NOT NULL), SUM({_IN_DAY}), "
        f"SUM({_IN_DAY} AND http_status IS NOT NULL), SUM({_IN_MONTH}), SUM({_IN_MONTH} AND http_status IS NOT NULL), "
        "SUM(cached_tokens), SUM(cache_discount) FROM usage WHERE id > :low AND id <= :high GROUP BY account_id"
    ),
}

# The oldest usage records before ?1, at most ?2, as archive rows (see _archive.ARCHIVE_COLUMNS).
_ARCHIVE_READ = (
    "SELECT u.id AS usage_id, u.request_id, u.account_id, a.name AS account, u.model, u.node, u.status, "
    "u.http_status, u.prompt_tokens, u.completion_tokens, u.cost AS cost_credits, u.bid, u.held, u.latency_ms, "
    "u.queue_ms, u.error, u.created, u.user, u.key_prefix, u.credit_value, u.currency, u.overhead_ms, "
    "u.cached_tokens, u.cache_discount, u.passed_over, h.created AS hold_created, "
    "h.closed AS hold_closed, h.status AS hold_status, c.amount AS charged, i.key AS idempotency_key, "
    "i.fingerprint AS idempotency_fingerprint, i.response AS idempotency_response "
    "FROM usage u JOIN accounts a ON a.id = u.account_id LEFT JOIN holds h ON h.id = u.request_id "
    "LEFT JOIN charges c ON c.hold_id = u.request_id LEFT JOIN idempotency i ON i.request_id = u.request_id "
    "WHERE u.created < ?1 ORDER BY u.created, u.id LIMIT ?2"
)
# The usage records ?1 (a JSON list of ids) out of the ledger, their charges and records carried per account and
# node first. A usage record never belongs to an open hold; the condition only makes sure.
_MOVED = "SELECT request_id FROM usage WHERE id IN (SELECT value FROM json_each(?1))"
_ARCHIVE_REMOVE = (
    "INSERT INTO archived_accounts (account_id, charged, records, cached_tokens, cache_discount) "
    "SELECT u.account_id, COALESCE(SUM(c.amount), 0), COUNT(*), SUM(u.cached_tokens), SUM(u.cache_discount) "
    "FROM usage u LEFT JOIN charges c ON c.hold_id = u.request_id WHERE u.id IN (SELECT value FROM json_each(?1)) "
    "GROUP BY u.account_id ON CONFLICT (account_id) DO UPDATE SET charged = charged + excluded.charged, "
    "records = records + excluded.records, cached_tokens = cached_tokens + excluded.cached_tokens, "
    "cache_discount = cache_discount + excluded.cache_discount",
    f"INSERT INTO archived_nodes (node, charged) SELECT COALESCE(node, ''), SUM(amount) FROM charges "
    f"WHERE hold_id IN ({_MOVED}) GROUP BY COALESCE(node, '') "
    "ON CONFLICT (node) DO UPDATE SET charged = charged + excluded.charged",
    f"DELETE FROM idempotency WHERE request_id IN ({_MOVED})",
    f"DELETE FROM charges WHERE hold_id IN ({_MOVED})",
    f"DELETE FROM holds WHERE id IN ({_MOVED}) AND status <> 'open'",
    "DELETE FROM usage WHERE id IN (SELECT value FROM json_each(?1))",
)


# The account's events older than its latest `?2` (none while it has fewer: the subquery is NULL).
_FORGET_OLD_EVENTS = (
    "DELETE FROM events WHERE account_id = ?1 AND id <= "
    "(SELECT id FROM events WHERE account_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)"
)


def _event_summary(conn: sqlite3.Connection) -> dict[str, EventSummary]:
    summary: dict[str, EventSummary] = {}
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
