"""The ledger in PostgreSQL (15 or later), through asyncpg's connection pool: nothing here blocks the event loop.

Commits do not wait for the WAL to reach the disk (`synchronous_commit = off`, unless the URL sets it): the
same bargain as the SQLite ledger's synchronous=NORMAL. A crash of the router loses nothing committed; a crash
of the database server may lose the last fraction of a second of transactions, whole ones, so the books
still balance (and holds it kept are released at the next start). It saves a disk flush per commit, which on
a small machine is most of a request's time in the ledger.

Holds, settlements and releases are group-committed: they queue up while a batch is in flight, and the next
batch goes as one call of `llamakit_apply` (migration 0003): one round trip, one transaction, each operation
in a subtransaction of its own so that one that fails is undone alone. A batch that loses a deadlock to
another router is tried again whole. Everything else is one statement, or one short transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import asyncpg

from llamakit.money.currency import CreditValue
from llamakit.router.ledger._api_keys import (
    HAS_LIMITS,
    KEY_LIMIT_FIELDS,
    KeyLimits,
    day_of,
    limit_columns,
    limits_from_row,
    month_of,
)
from llamakit.router.ledger._audit import AuditFigures, Periods, rows_to_dict
from llamakit.router.ledger._contract import (
    MAX_AMOUNT,
    RECOVERED_ERROR,
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
    SpendCapExceeded,
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
from llamakit.router.ledger._migrations import migrate_postgres
from llamakit.router.ledger._postgres_batches import PostgresBatches

__all__ = ["PostgresLedger"]

log = logging.getLogger(__name__)

MAX_BATCH: Final = 256
_RETRIES: Final = 5
# InternalClientError: asyncpg's word for a connection cut in the middle of an operation ("cannot switch to state …").
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
_FAST_COMMITS: Final = {"synchronous_commit": "off"}


class PostgresLedger(Ledger):
    """The ledger in the PostgreSQL database at `dsn` (`postgresql://user:password@host:port/dbname`).

    Query parameters of the URL other than libpq's connection options are server settings, so
    `?search_path=books` keeps the ledger in the schema `books`. `display` is the URL without its password.
    """

    def __init__(
        self,
        dsn: str,
        *,
        display: str | None = None,
        clock: Callable[[], float] = time.time,
        pool_size: int = 8,
        money: CreditValue | None = None,
    ) -> None:
        super().__init__(clock=clock, money=money)
        self.batch_store = PostgresBatches(self)
        self._dsn = dsn
        self.url = display or dsn
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        self._pending: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            settings = {} if "synchronous_commit" in parse_qs(urlsplit(self._dsn).query) else _FAST_COMMITS
            # No floor of connections (min_size=0): asyncpg would restore it in the background while the database
            # is away, logging a traceback at each try. Connections are made when asked for, and an outage is
            # said once (see router/ledger_gate.py).
            pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=self._pool_size, server_settings=settings, reset=_keep_session
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            raise LedgerError(f"cannot open the ledger at {self.url}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await migrate_postgres(conn)
        except _DATABASE_ERRORS as exc:
            await pool.close()
            doing = "open" if isinstance(_database_error(exc), LedgerUnavailable) else "migrate"
            raise LedgerError(f"cannot {doing} the ledger at {self.url}: {exc}") from exc
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._wake = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush(), name="ledger group commit")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._wake.set()  # the flusher finishes what is pending, then stops
            await self._flusher
        if self._pool is not None:
            await self._pool.close()

    def _db(self) -> asyncpg.Pool:
        if self._closed or self._pool is None:
            raise LedgerError("the ledger is closed" if self._closed else "the ledger is not open: await open()")
        return self._pool

    # -- group commit ----------------------------------------------------------------------------------

    async def _apply(self, op: dict[str, Any]) -> dict[str, Any]:
        """Queue one operation for the next batch and wait until its batch has committed."""
        return await self._enqueue(op)

    def _enqueue(self, op: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Queue one operation for the next batch; the future is its result once its batch has committed."""
        self._db()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake.set()
        return future

    async def _flush(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    await self._run(batch)
                except Exception as exc:  # a bug here must fail its batch, not stop every later commit
                    log.exception("ledger batch failed")
                    for _op, future in batch:
                        if not future.done():
                            future.set_exception(LedgerError(f"ledger batch failed: {exc!r}"))
            if self._closed:
                return

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        assert self._pool is not None
        self.batches += 1
        ops = json.dumps([op for op, _ in batch], separators=(",", ":"))
        outcome: list[dict[str, Any]] | BaseException
        for attempt in range(_RETRIES):
            try:
                outcome = json.loads(await self._pool.fetchval("SELECT llamakit_apply($1::jsonb)", ops))
                break
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                outcome = LedgerError(f"ledger database error after {attempt + 1} tries: {exc}")
                outcome.__cause__ = exc
            except Exception as exc:  # the flusher must outlive any failure; its callers get the error
                outcome = _database_error(exc)
                break
        for index, (_op, future) in enumerate(batch):
            if future.done():  # the caller stopped waiting; its operation was applied all the same
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome[index])

    # -- accounts and keys -----------------------------------------------------------------------------

    async def _create_account(self, name: str, kind: str, now: float) -> Account:
        row = await self._fetchrow(
            "WITH made AS (INSERT INTO accounts (name, kind, created) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO NOTHING RETURNING *), "
            "counted AS (UPDATE ledger_totals SET accounts = accounts + 1 WHERE EXISTS (SELECT 1 FROM made)) "
            "SELECT * FROM made",
            name,
            kind,
            now,
        )
        if row is None:
            raise AccountExists(name)
        return account_from(row)

    async def _get_account(self, account_id: int) -> Account:
        row = await self._fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        if row is None:
            raise UnknownAccount(account_id)
        return account_from(row)

    async def _account_by_name(self, name: str) -> Account:
        row = await self._fetchrow("SELECT * FROM accounts WHERE name = $1", name)
        if row is None:
            raise UnknownAccount(name)
        return account_from(row)

    async def _list_accounts(self) -> list[Account]:
        return [account_from(row) for row in await self._fetch("SELECT * FROM accounts ORDER BY id")]

    async def _create_key(
        self, account_id: int, key_hash: str, prefix: str, now: float, limits: KeyLimits, name: str | None
    ) -> None:
        row = await self._fetchrow(
            f"INSERT INTO api_keys (key_hash, prefix, account_id, created, name, {', '.join(KEY_LIMIT_FIELDS)}) "
            f"SELECT $1, $2, id, $4, $5, {', '.join(f'${i}' for i in range(6, 6 + len(KEY_LIMIT_FIELDS)))} "
            "FROM accounts WHERE id = $3 RETURNING account_id",
            key_hash,
            prefix,
            account_id,
            now,
            name,
            *limit_columns(limits),
        )
        if row is None:
            raise UnknownAccount(account_id)

    async def _list_keys(self, account_id: int, now: float) -> list[ApiKey]:
        await self._get_account(account_id)
        rows = await self._fetch("SELECT * FROM api_keys WHERE account_id = $1 ORDER BY created, prefix", account_id)
        return [key_from(r, now) for r in rows]

    async def _find_key(self, key_hash: str | None, prefix: str | None, now: float) -> ApiKey:
        if key_hash is not None:
            rows = await self._fetch("SELECT * FROM api_keys WHERE key_hash = $1", key_hash)
        else:
            rows = await self._fetch("SELECT * FROM api_keys WHERE prefix = $1", prefix)
        return key_from(pick_key(rows, prefix), now)

    async def _set_key_limits(
        self, key_hash: str | None, prefix: str | None, change: Callable[[KeyLimits], KeyLimits], now: float
    ) -> ApiKey:
        column, value = ("key_hash", key_hash) if key_hash is not None else ("prefix", prefix)
        try:
            async with self._db().acquire() as conn, conn.transaction():
                row = pick_key(
                    await conn.fetch(f"SELECT * FROM api_keys WHERE {column} = $1 FOR UPDATE", value), prefix
                )
                limits = change(limits_from_row(row))
                updated = await conn.fetchrow(
                    f"UPDATE api_keys SET {', '.join(f'{n} = ${i}' for i, n in enumerate(KEY_LIMIT_FIELDS, 2))} "
                    "WHERE key_hash = $1 RETURNING *",
                    row["key_hash"],
                    *limit_columns(limits),
                )
                return key_from(updated, now)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _rename_key(self, key_hash: str | None, prefix: str | None, name: str | None, now: float) -> ApiKey:
        column, value = ("key_hash", key_hash) if key_hash is not None else ("prefix", prefix)
        try:
            async with self._db().acquire() as conn, conn.transaction():
                row = pick_key(
                    await conn.fetch(f"SELECT * FROM api_keys WHERE {column} = $1 FOR UPDATE", value), prefix
                )
                renamed = await conn.fetchrow(
                    "UPDATE api_keys SET name = $2 WHERE key_hash = $1 RETURNING *", row["key_hash"], name
                )
                return key_from(renamed, now)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _limited_keys(
        self, now: float, accounts: Sequence[int] | None, limit: int | None, after: tuple[int, float, str] | None
    ) -> list[ApiKey]:
        where = [f"revoked IS NULL AND {HAS_LIMITS}"]  # the condition of the partial index api_keys_limited
        args: list[object] = []
        if accounts is not None:
            args.append(list(accounts))
            where.append(f"account_id = ANY(${len(args)}::bigint[])")
        if after is not None:
            args.extend(after)
            where.append(f"(account_id, created, prefix) > (${len(args) - 2}, ${len(args) - 1}, ${len(args)})")
        query = f"SELECT * FROM api_keys WHERE {' AND '.join(where)} ORDER BY account_id, created, prefix"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [key_from(row, now) for row in await self._fetch(query, *args)]

    async def _revoke_key(self, *, key_hash: str | None, prefix: str | None, now: float) -> int:
        if key_hash is not None:
            revoked = await self._fetchval(
                "WITH revoked AS (UPDATE api_keys SET revoked = $1 WHERE key_hash = $2 AND revoked IS NULL "
                "RETURNING 1) SELECT COUNT(*) FROM revoked",
                now,
                key_hash,
            )
            return int(revoked)
        try:
            async with self._db().acquire() as conn, conn.transaction():
                keys = await conn.fetch(
                    "SELECT key_hash FROM api_keys WHERE prefix = $1 AND revoked IS NULL FOR UPDATE", prefix
                )
                if len(keys) > 1:
                    raise ValueError(
                        f"the prefix {prefix!r} matches {len(keys)} active keys; revoke with the whole key"
                    )
                await conn.execute(
                    "UPDATE api_keys SET revoked = $1 WHERE prefix = $2 AND revoked IS NULL", now, prefix
                )
                return len(keys)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _authenticate(self, key_hash: str, now: float) -> tuple[Account, ApiKey] | None:
        key = await self._fetchrow("SELECT * FROM api_keys WHERE key_hash = $1 AND revoked IS NULL", key_hash)
        if key is None:
            return None
        return await self._get_account(key["account_id"]), key_from(key, now)

    # -- money -----------------------------------------------------------------------------------------

    async def _deposit(self, account_id: int, amount: int, note: str, now: float) -> int:
        try:
            async with self._db().acquire() as conn, conn.transaction():
                balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1 FOR UPDATE", account_id)
                if balance is None:
                    raise UnknownAccount(account_id)
                if balance + amount > MAX_AMOUNT:
                    raise ValueError(f"a balance can be at most {MAX_AMOUNT} credits; deposit less")
                await conn.execute(
                    "INSERT INTO deposits (account_id, amount, note, created) VALUES ($1, $2, $3, $4)",
                    account_id,
                    amount,
                    note,
                    now,
                )
                new: int = await conn.fetchval(
                    "UPDATE accounts SET balance = balance + $2, deposited = deposited + $2 WHERE id = $1 "
                    "RETURNING balance",
                    account_id,
                    amount,
                )
                await conn.execute(
                    "UPDATE ledger_totals SET deposits = deposits + $1, balances = balances + $1", amount
                )
                return new
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _hold(self, hold: Hold) -> None:
        result = await self._apply(
            {
                "op": "hold",
                "request_id": hold.request_id,
                "account_id": hold.account_id,
                "model": hold.model,
                "amount": hold.amount,
                "bid": hold.bid,
                "now": hold.created,
                "user": hold.user,
                "router_id": self.router_id,
                "key_hash": hold.key_hash,
                "day": day_of(hold.created),
                "month": month_of(hold.created),
            }
        )
        error = result.get("error")
        if error is None:
            return
        if error == "insufficient":
            raise InsufficientFunds(needed=hold.amount, balance=int(result["balance"]))
        if error == "spend_cap":
            raise SpendCapExceeded(
                needed=hold.amount, cap=int(result["cap"]), period=result["period"], available=int(result["available"])
            )
        if error == "unknown_account":
            raise UnknownAccount(hold.account_id)
        if error == "unknown_key":
            raise ValueError("the hold names an API key that does not exist")
        if error == "duplicate":
            raise ValueError(f"request id {hold.request_id!r} has already been used for a hold")
        raise LedgerError(f"ledger database error: {result.get('message', error)}")

    async def _find_hold(self, request_id: str) -> Hold | None:
        row = await self._fetchrow("SELECT * FROM holds WHERE id = $1", request_id)
        return None if row is None else hold_from(row)

    async def _close_hold(self, close: Close) -> Settlement:
        result = await self._apply(_close_op(close))
        return _settlement(close, result)

    async def _recall(self, account_id: int, key: str) -> Remembered | None:
        row = await self._fetchrow(
            "SELECT key, fingerprint, response FROM idempotency WHERE account_id = $1 AND key = $2", account_id, key
        )
        return None if row is None else Remembered(row["key"], row["fingerprint"], row["response"])

    async def _probe(self) -> None:
        await self._fetchval("UPDATE accounts SET balance = balance WHERE id = (SELECT min(id) FROM accounts)")

    def _checkpoint(self, request_id: str, delivered: Delivered) -> asyncio.Future[Any]:
        return self._enqueue(
            {
                "op": "checkpoint",
                "request_id": request_id,
                "prompt_tokens": delivered.prompt_tokens,
                "completion_tokens": delivered.completion_tokens,
                "charge": delivered.charge,
                "model": delivered.model,
                "node": delivered.node,
                "now": delivered.at,
                "cached_tokens": delivered.cached_tokens,
                "cache_discount": delivered.cache_discount,
            }
        )

    async def _recover(self, now: float) -> list[UsageRecord]:
        return await self._release_where("TRUE", [], "recovered", RECOVERED_ERROR, now)

    async def release_lost(self, *, me: str, error: str) -> list[UsageRecord]:
        """Close the open holds of every router that holds no live lease (see `llamakit.router.dispatch.cluster`).

        A hold counts as lost when it was made by no router (a router outside the cluster), by `me` (this
        router in an earlier life: its requests died with it), or by a router whose row in `routers` is gone
        or whose `lease_until` has passed by the database's clock. Each is closed as `recover` closes a hold: what
        its latest checkpoint says its stream delivered is charged (at most the hold), the rest refunded (all of
        it without a checkpoint), with a usage record of status 'router_lost' whose error is `error` and what was
        charged; returns those records, oldest hold first. LedgerError when the database fails (nothing is
        closed then).
        """
        where = (
            "(router_id IS NULL OR router_id = $1 OR NOT EXISTS (SELECT 1 FROM routers WHERE routers.id = "
            "holds.router_id AND routers.lease_until >= extract(epoch FROM clock_timestamp())::float8))"
        )
        return await self._release_where(where, [me], "router_lost", error, self._clock())

    async def _release_where(
        self, where: str, args: list[object], status: str, error: str, now: float
    ) -> list[UsageRecord]:
        """Close every open hold matching the SQL condition `where` (parameters `args`) as `recovery` says."""
        try:
            async with self._db().acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    f"SELECT * FROM holds WHERE status = 'open' AND {where} ORDER BY created, id FOR UPDATE", *args
                )
                if not rows:
                    return []
                holds = [row["id"] for row in rows]
                ops = [
                    _close_op(recovery(row["id"], delivered_from(row), now, self.money, status=status, error=error))
                    for row in rows
                ]
                results = json.loads(await conn.fetchval("SELECT llamakit_apply($1::jsonb)", json.dumps(ops)))
                for close, result in zip(ops, results, strict=True):
                    if "error" in result:
                        raise LedgerError(f"cannot release the hold {close['request_id']!r}: {result}")
                found = await conn.fetch("SELECT * FROM usage WHERE request_id = ANY($1::text[])", holds)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc
        by_id = {row["request_id"]: usage_from(row) for row in found}
        return [by_id[request_id] for request_id in holds]

    # -- reports ---------------------------------------------------------------------------------------

    async def _account_state(self, account_id: int) -> AccountState:
        row = await self._fetchrow("SELECT balance, held, spent, deposited FROM accounts WHERE id = $1", account_id)
        if row is None:
            raise UnknownAccount(account_id)
        return AccountState(balance=row["balance"], held=row["held"], spent=row["spent"], deposited=row["deposited"])

    async def _usage_records(
        self, account_id: int | None, limit: int, before: int | None, since: float | None, user: str | None
    ) -> list[UsageRecord]:
        if account_id is not None:
            await self._get_account(account_id)
        rows = await self._fetch(
            "SELECT * FROM usage WHERE ($1::bigint IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR id < $2) "
            'AND ($3::float8 IS NULL OR created >= $3) AND ($4::text IS NULL OR "user" = $4) '
            "ORDER BY id DESC LIMIT $5",
            account_id,
            before,
            since,
            user,
            limit,
        )
        return [usage_from(row) for row in rows]

    async def _refuse(self, refusal: Refusal) -> UsageRecord:
        day, month = day_of(refusal.now), month_of(refusal.now)
        try:
            async with self._db().acquire() as conn, conn.transaction():
                # The rows in the order every transaction takes them: the account's, its periods, the ledger's.
                seen = await conn.fetchval(
                    "UPDATE accounts SET last_seen = GREATEST(COALESCE(last_seen, $1), $1) WHERE id = $2 RETURNING 1",
                    refusal.now,
                    refusal.account_id,
                )
                if seen is None:
                    raise UnknownAccount(refusal.account_id)
                row = await conn.fetchrow(
                    "INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, "
                    'completion_tokens, cost, bid, held, error, created, "user", http_status, key_prefix, '
                    "credit_value, currency) "
                    "VALUES ($1, $2, $3, NULL, $4, 0, 0, 0, $12, 0, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
                    refusal.request_id,
                    refusal.account_id,
                    refusal.model,
                    refusal.status,
                    refusal.error,
                    refusal.now,
                    refusal.user,
                    refusal.http_status,
                    refusal.key_prefix,
                    *price_columns(refusal.money),
                    refusal.bid,
                )
                new = await conn.fetchrow(
                    "SELECT * FROM llamakit_count_usage($1, $2, $3, 0, true)", refusal.account_id, day, month
                )
                await conn.execute("UPDATE ledger_totals SET requests = requests + 1")
                for period, first in sorted(((day, new["new_in_day"]), (month, new["new_in_month"]))):
                    await conn.execute("SELECT llamakit_count_period($1, 0, 1, 1, $2)", period, first)
        except _DATABASE_ERRORS as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc
        assert row is not None
        return usage_from(row)

    async def _account_activity(self, since: float) -> list[AccountActivity]:
        rows = await self._fetch(
            "SELECT a.id, a.name, a.kind, a.balance, "
            "(SELECT COALESCE(SUM(amount), 0)::bigint FROM holds WHERE account_id = a.id AND status = 'open') AS held, "
            "(SELECT COALESCE(SUM(amount), 0)::bigint FROM charges WHERE account_id = a.id AND created >= $1) "
            "AS spent, "
            "(SELECT COUNT(*) FROM usage WHERE account_id = a.id AND created >= $1) AS requests, "
            "(SELECT COUNT(*) FROM usage WHERE account_id = a.id AND created >= $1 AND http_status IS NOT NULL) "
            "AS refusals, "
            "(SELECT MAX(created) FROM usage WHERE account_id = a.id) AS last_seen "
            "FROM accounts a ORDER BY a.name",
            since,
        )
        return [AccountActivity(**dict(row)) for row in rows]

    async def _find_usage(self, request_id: str) -> UsageRecord | None:
        row = await self._fetchrow("SELECT * FROM usage WHERE request_id = $1", request_id)
        return None if row is None else usage_from(row)

    async def _books(self) -> Books:
        row = await self._fetchrow("SELECT deposits, balances, holds, charges FROM ledger_totals")
        assert row is not None
        return Books(deposits=row["deposits"], balances=row["balances"], holds=row["holds"], charges=row["charges"])

    async def _totals(self, day: str, month: str) -> Totals:
        rows = await self._fetch(
            "SELECT 'totals' AS what, deposits, balances, holds, charges, accounts, requests, archived_before, "
            "NULL AS period, 0 AS spent, 0 AS refusals FROM ledger_totals UNION ALL "
            "SELECT 'period', 0, 0, 0, 0, accounts, requests, NULL, period, spent, refusals FROM ledger_periods "
            "WHERE period = ANY($1::text[])",
            [day, month],
        )
        totals = next(r for r in rows if r["what"] == "totals")
        periods = {
            r["period"]: PeriodTotals(r["period"], r["spent"], r["requests"], r["refusals"], r["accounts"])
            for r in rows
            if r["what"] == "period"
        }
        books = Books(totals["deposits"], totals["balances"], totals["holds"], totals["charges"])
        return Totals(books=books, accounts=totals["accounts"], requests=totals["requests"],
                      today=periods.get(day, PeriodTotals(day)), month=periods.get(month, PeriodTotals(month)),
                      archived_before=totals["archived_before"])  # fmt: skip

    async def _cache_savings(self) -> CacheSavings:
        row = await self._fetchrow("SELECT cached_tokens, cache_discount FROM ledger_totals")
        assert row is not None
        return CacheSavings(cached_tokens=row["cached_tokens"], discount=row["cache_discount"])

    async def _fees_by_node(self) -> dict[str, int]:
        rows = await self._fetch("SELECT node, charged FROM node_fees ORDER BY node")
        return {row["node"] or UNATTRIBUTED: row["charged"] for row in rows}

    async def _accounts_page(
        self, day: str, limit: int, order: str, after: str | None, search: str | None
    ) -> list[AccountActivity]:
        columns = (
            "a.id, a.name, a.kind, a.balance, a.held, COALESCE(p.spent, 0) AS spent, "
            "COALESCE(p.requests, 0) AS requests, COALESCE(p.refusals, 0) AS refusals, a.last_seen, "
            "a.spent AS spent_total, a.deposited"
        )
        found = "($3::text IS NULL OR strpos(lower(a.name), lower($3)) > 0)"
        if order == "name":
            rows = await self._fetch(
                f"SELECT {columns} FROM accounts a LEFT JOIN account_periods p ON p.account_id = a.id AND "
                f"p.period = $1 WHERE ($2::text IS NULL OR a.name > $2) AND {found} ORDER BY a.name LIMIT $4",
                day,
                after,
                search,
                limit,
            )
        else:
            spent, _, account = (after or "").partition(":")
            rows = await self._fetch(
                f"SELECT {columns} FROM account_periods p JOIN accounts a ON a.id = p.account_id WHERE p.period = $1 "
                "AND ($2::bigint IS NULL OR p.spent < $2 OR (p.spent = $2 AND p.account_id > $5)) "
                f"AND {found} ORDER BY p.spent DESC, p.account_id LIMIT $4",
                day,
                int(spent) if after else None,
                search,
                limit,
                int(account) if after else None,
            )
        return [AccountActivity(*row) for row in rows]

    async def _account_names(self, account_ids: list[int]) -> dict[int, str]:
        rows = await self._fetch("SELECT id, name FROM accounts WHERE id = ANY($1::bigint[])", account_ids)
        return {row["id"]: row["name"] for row in rows}

    # -- the audit and archives ------------------------------------------------------------------------

    @asynccontextmanager
    async def _audit_session(self) -> AsyncIterator[_PostgresAudit]:
        """One REPEATABLE READ snapshot for the whole audit: PostgreSQL hands out ids before commits, out of their
        order, so ids alone cannot bound what a snapshot holds."""
        try:
            async with (
                self._db().acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield _PostgresAudit(conn)
        except _DATABASE_ERRORS as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    async def _archive_read(self, before: float, limit: int) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_ARCHIVE_READ, before, limit)]

    async def _archive_remove(self, usage_ids: list[int]) -> None:
        try:
            async with self._db().acquire() as conn, conn.transaction():
                for statement in _ARCHIVE_REMOVE:
                    await conn.execute(statement, usage_ids)
        except _DATABASE_ERRORS as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    async def _archive_finish(self, before: float, day: str, month: str) -> None:
        try:
            async with self._db().acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE ledger_totals SET archived_before = GREATEST(COALESCE(archived_before, $1), $1)", before
                )
                for table in ("account_periods", "ledger_periods"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE (length(period) = 10 AND period < $1) OR "
                        "(length(period) = 7 AND period < $2)",
                        day,
                        month,
                    )
        except _DATABASE_ERRORS as exc:
            raise LedgerError(f"ledger database error: {exc}") from exc

    # -- agent events ----------------------------------------------------------------------------------

    async def _record_event(self, account_id: int, kind: str, data: str, now: float) -> int:
        # The DELETE sees the events before this one (a statement's CTEs share its snapshot): it keeps the latest
        # `events_kept` of those, and with the new one the account keeps one more than that.
        event_id = await self._fetchval(
            "WITH added AS (INSERT INTO events (account_id, kind, data, created) "
            "SELECT id, $2, $3::jsonb, $4 FROM accounts WHERE id = $1 RETURNING id), "
            "forgotten AS (DELETE FROM events WHERE account_id = $1 AND id <= "
            "(SELECT id FROM events WHERE account_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $5)) "
            "SELECT id FROM added",
            account_id,
            kind,
            data,
            now,
            self.events_kept,
        )
        if event_id is None:
            raise UnknownAccount(account_id)
        return int(event_id)

    async def _events(self, account_id: int, limit: int) -> list[Event]:
        await self._get_account(account_id)
        rows = await self._fetch(
            "SELECT id, account_id, kind, data::text AS data, created FROM events WHERE account_id = $1 "
            "ORDER BY id DESC LIMIT $2",
            account_id,
            limit,
        )
        return [Event(r["id"], r["account_id"], r["kind"], json.loads(r["data"]), r["created"]) for r in rows]

    async def _event_summary(self) -> dict[str, EventSummary]:
        summary: dict[str, EventSummary] = {}
        for row in await self._fetch(
            "SELECT accounts.name, events.kind, COUNT(*) AS count, MAX(events.created) AS last FROM events "
            "JOIN accounts ON accounts.id = events.account_id "
            "GROUP BY events.account_id, accounts.name, events.kind ORDER BY accounts.name, events.kind"
        ):
            name = row["name"]
            entry = summary.setdefault(
                name, EventSummary(counts={}, total=0, position=None, pnl=None, last=row["last"])
            )
            entry["counts"][row["kind"]] = row["count"]
            entry["total"] += row["count"]
            entry["last"] = max(entry["last"], row["last"])
        for field in ("position", "pnl"):
            for row in await self._fetch(
                "SELECT accounts.name, (events.data -> $1::text)::text AS value FROM events "
                "JOIN accounts ON accounts.id = events.account_id WHERE events.id IN ("
                "  SELECT MAX(id) FROM events WHERE jsonb_typeof(data -> $1::text) = 'number' GROUP BY account_id)",
                field,
            ):
                summary[row["name"]][field] = json.loads(row["value"])
        return summary

    # -- plumbing --------------------------------------------------------------------------------------

    async def _fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        try:
            return await self._db().fetchrow(query, *args)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await self._db().fetch(query, *args)
            return rows
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _fetchval(self, query: str, *args: object) -> Any:
        try:
            return await self._db().fetchval(query, *args)
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc


def _database_error(exc: BaseException) -> LedgerError:
    """The LedgerError for a failed database call: LedgerUnavailable when the database cannot be reached or
    written now (the connection failed or was lost; SQLSTATE classes 08 connection, 53 insufficient resources
    such as a full disk, 57 operator intervention such as a shutdown, 58 system error; 25006 read-only)."""
    unavailable = isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError))
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        unavailable = state[:2] in ("08", "53", "57", "58") or state == "25006"
    error = (LedgerUnavailable if unavailable else LedgerError)(f"ledger database error: {exc}")
    error.__cause__ = exc
    return error


class _PostgresAudit:
    """The audit's reads (see `_audit.AuditSession`), in one REPEATABLE READ transaction on `conn`."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def figures(self, periods: Periods) -> AuditFigures:
        conn = self._conn

        async def rows(query: str, *args: object) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in await conn.fetch(query, *args)]

        names = ("deposits", "balances", "holds", "charges", "accounts", "requests", "cached_tokens", "cache_discount")
        totals = await conn.fetchrow(f"SELECT {', '.join(names)}, archived_before FROM ledger_totals")
        in_periods = [periods.day, periods.month]
        return AuditFigures(
            totals={name: int(totals[name]) for name in names},
            archived_before=totals["archived_before"],
            accounts=rows_to_dict(await rows("SELECT id, name, balance, held, spent, deposited FROM accounts")),
            open_holds=rows_to_dict(await rows(_OPEN_HOLDS_BY.format("account_id"))),
            keys_held={r[0]: (r[1], r[2]) for r in await rows(_KEYS_HELD)},
            keys_open=rows_to_dict(await rows(_OPEN_HOLDS_BY.format("key_hash"))),
            nodes=rows_to_dict(await rows("SELECT node, charged FROM node_fees")),
            periods={
                (r[0], r[1]): (r[2], r[3], r[4])
                for r in await rows(
                    "SELECT account_id, period, spent, requests, refusals FROM account_periods "
                    "WHERE period = ANY($1::text[])",
                    in_periods,
                )
            },
            ledger_periods=rows_to_dict(
                await rows(
                    "SELECT period, spent, requests, refusals, accounts FROM ledger_periods "
                    "WHERE period = ANY($1::text[])",
                    in_periods,
                )
            ),
            archived_accounts=rows_to_dict(
                await rows("SELECT account_id, charged, records, cached_tokens, cache_discount FROM archived_accounts")
            ),
            archived_nodes=rows_to_dict(await rows("SELECT node, charged FROM archived_nodes")),
            max_ids={
                t: int(await conn.fetchval(f"SELECT COALESCE(MAX(id), 0) FROM {t}"))
                for t in ("deposits", "charges", "usage")
            },
            archive_mark=await self.archive_mark(),
        )

    async def sums(self, table: str, low: int, high: int, periods: Periods) -> list[tuple[Any, ...]]:
        bounds = () if table == "deposits" else (periods.day_start, periods.day_end, periods.month_start,
                                                    periods.month_end)  # fmt: skip
        rows = await self._conn.fetch(_AUDIT_SUMS[table], low, high, *bounds)
        return [tuple(r) for r in rows]

    async def archive_mark(self) -> tuple[float | None, int]:
        row = await self._conn.fetchrow(
            "SELECT archived_before, (SELECT COALESCE(SUM(records), 0)::bigint FROM archived_accounts) AS records "
            "FROM ledger_totals"
        )
        return row["archived_before"], int(row["records"])


_OPEN_HOLDS_BY = "SELECT {0}, SUM(amount)::bigint FROM holds WHERE status = 'open' AND {0} IS NOT NULL GROUP BY {0}"
_KEYS_HELD = (
    "SELECT key_hash, prefix, held FROM api_keys WHERE held <> 0 "
    "OR key_hash IN (SELECT key_hash FROM holds WHERE status = 'open')"
)
_IN_DAY = "(created >= $3 AND created < $4)"
_IN_MONTH = "(created >= $5 AND created < $6)"
_AUDIT_SUMS = {
    "deposits": (
        "SELECT account_id, SUM(amount)::bigint, COUNT(*) FROM deposits WHERE id > $1 AND id <= $2 GROUP BY account_id"
    ),
    "charges": (
        f"SELECT account_id, COALESCE(node, ''), SUM(amount)::bigint, "
        f"SUM(CASE WHEN {_IN_DAY} THEN amount ELSE 0 END)::bigint, "
        f"SUM(CASE WHEN {_IN_MONTH} THEN amount ELSE 0 END)::bigint, COUNT(*) FROM charges WHERE id > $1 AND id <= $2 "
        "GROUP BY account_id, COALESCE(node, '')"
    ),
    "usage": (
        "SELECT account_id, COUNT(*), COUNT(http_status), "
        f"COUNT(*) FILTER (WHERE {_IN_DAY}), COUNT(http_status) FILTER (WHERE {_IN_DAY}), "
        f"COUNT(*) FILTER (WHERE {_IN_MONTH}), COUNT(http_status) FILTER (WHERE {_IN_MONTH}), "
        "SUM(cached_tokens)::bigint, SUM(cache_discount)::bigint FROM usage WHERE id > $1 AND id <= $2 "
        "GROUP BY account_id"
    ),
}

# As SQLite's (see _sqlite._ARCHIVE_READ).
_ARCHIVE_READ = (
    "SELECT u.id AS usage_id, u.request_id, u.account_id, a.name AS account, u.model, u.node, u.status, "
    "u.http_status, u.prompt_tokens, u.completion_tokens, u.cost AS cost_credits, u.bid, u.held, u.latency_ms, "
    'u.queue_ms, u.error, u.created, u."user", u.key_prefix, u.credit_value, u.currency, u.overhead_ms, '
    "u.cached_tokens, u.cache_discount, u.passed_over, h.created AS hold_created, "
    "h.closed AS hold_closed, h.status AS hold_status, c.amount AS charged, i.key AS idempotency_key, "
    "i.fingerprint AS idempotency_fingerprint, i.response AS idempotency_response "
    "FROM usage u JOIN accounts a ON a.id = u.account_id LEFT JOIN holds h ON h.id = u.request_id "
    "LEFT JOIN charges c ON c.hold_id = u.request_id LEFT JOIN idempotency i ON i.request_id = u.request_id "
    "WHERE u.created < $1 ORDER BY u.created, u.id LIMIT $2"
)
_MOVED = "SELECT request_id FROM usage WHERE id = ANY($1::bigint[])"
_ARCHIVE_REMOVE = (
    "INSERT INTO archived_accounts AS a (account_id, charged, records, cached_tokens, cache_discount) "
    "SELECT u.account_id, COALESCE(SUM(c.amount), 0), COUNT(*), SUM(u.cached_tokens), SUM(u.cache_discount) "
    "FROM usage u LEFT JOIN charges c ON c.hold_id = u.request_id WHERE u.id = ANY($1::bigint[]) "
    "GROUP BY u.account_id ON CONFLICT (account_id) DO UPDATE SET charged = a.charged + excluded.charged, "
    "records = a.records + excluded.records, cached_tokens = a.cached_tokens + excluded.cached_tokens, "
    "cache_discount = a.cache_discount + excluded.cache_discount",
    f"INSERT INTO archived_nodes AS n (node, charged) SELECT COALESCE(node, ''), SUM(amount) FROM charges "
    f"WHERE hold_id IN ({_MOVED}) GROUP BY COALESCE(node, '') "
    "ON CONFLICT (node) DO UPDATE SET charged = n.charged + excluded.charged",
    f"DELETE FROM idempotency WHERE request_id IN ({_MOVED})",
    f"DELETE FROM charges WHERE hold_id IN ({_MOVED})",
    f"DELETE FROM holds WHERE id IN ({_MOVED}) AND status <> 'open'",
    "DELETE FROM usage WHERE id = ANY($1::bigint[])",
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection back in the pool needs no reset query (a round trip on every call): the ledger never leaves
    session state behind (no LISTEN, no session locks, no SET), and asyncpg rolls back an open transaction."""


def _close_op(close: Close) -> dict[str, Any]:
    remember = close.remember
    credit_value, currency = price_columns(close.money)
    return {
        "op": "close",
        "request_id": close.request_id,
        "charge": close.charge,
        "node": close.node,
        "status": close.status,
        "prompt_tokens": close.prompt_tokens,
        "completion_tokens": close.completion_tokens,
        "bid": close.bid,
        "latency_ms": close.latency_ms,
        "queue_ms": close.queue_ms,
        "error": close.error,
        "remember": None
        if remember is None
        else {"key": remember.key, "fingerprint": remember.fingerprint, "response": remember.response},
        "now": close.now,
        "day": day_of(close.now),
        "month": month_of(close.now),
        "credit_value": credit_value,
        "currency": currency,
        "http_status": close.http_status,
        "model": close.model,
        "cached_tokens": close.cached_tokens,
        "cache_discount": close.cache_discount,
        "passed_over": close.passed_over,
        "overhead_ms": close.overhead_ms,
    }


def _settlement(close: Close, result: dict[str, Any]) -> Settlement:
    error = result.get("error")
    if error == "closed":
        raise HoldClosed(close.request_id, result.get("status"))
    if error is not None:
        raise LedgerError(f"ledger database error: {result.get('message', error)}")
    held, charged = int(result["held"]), int(result["charged"])
    return Settlement(
        request_id=close.request_id,
        account_id=int(result["account_id"]),
        node=close.node,
        held=held,
        charged=charged,
        refunded=held - charged,
        balance=int(result["balance"]),
    )
