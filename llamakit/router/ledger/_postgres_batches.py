"""Files and batches in the PostgreSQL ledger's database, through its pool (see _batches.py for the contract).

Several routers may share the database (`--cluster`): a line is claimed with `FOR UPDATE SKIP LOCKED`, so two
routers never claim the same one, and whatever changes a batch's figures or status locks its row first, so that
its last line finishes it once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg

from llamakit.router.ledger._batches import (
    OPEN_STATUSES,
    BatchOverview,
    BatchStore,
    ClaimedLine,
    LineOutcome,
    NewLine,
    Render,
    StoredBatch,
    StoredFile,
    batch_from,
    file_from,
    final_status,
    metadata_text,
    new_file_id,
)

if TYPE_CHECKING:
    from llamakit.router.ledger._postgres import PostgresLedger

__all__ = ["PostgresBatches"]

_FILE = "id, account_id, purpose, filename, bytes, lines, created, batch_id, kind"
_OPEN = "('in_progress', 'cancelling')"
_DB_NOW = "extract(epoch FROM clock_timestamp())::float8"


class PostgresBatches(BatchStore):
    def __init__(self, ledger: PostgresLedger) -> None:
        super().__init__(ledger._clock)
        self._ledger = ledger

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        from llamakit.router.ledger._postgres import _DATABASE_ERRORS, _database_error

        try:
            async with self._ledger._db().acquire() as conn, conn.transaction():
                yield conn
        except _DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc

    async def _rows(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self._ledger._fetch(query, *args)

    # -- files -------------------------------------------------------------------------------------------

    async def create_file(
        self, account_id: int, *, purpose: str, filename: str, content: bytes, lines: int
    ) -> StoredFile:
        file = StoredFile(new_file_id(), account_id, purpose, filename, len(content), lines, self._clock())
        await self._ledger._fetchval(
            "INSERT INTO files (id, account_id, purpose, filename, bytes, lines, created, content) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            file.id, account_id, purpose, filename, file.bytes, lines, file.created, content,
        )  # fmt: skip
        return file

    async def find_file(self, account_id: int, file_id: str) -> StoredFile | None:
        row = await self._ledger._fetchrow(
            f"SELECT {_FILE} FROM files WHERE id = $1 AND account_id = $2", file_id, account_id
        )
        return None if row is None else file_from(row)

    async def files(
        self, account_id: int, *, after: str | None, limit: int, purpose: str | None, ascending: bool
    ) -> list[StoredFile]:
        where, args = "account_id = $1", list[object]([account_id])
        if purpose is not None:
            args.append(purpose)
            where += f" AND purpose = ${len(args)}"
        if after is not None:
            args += [after, 0 if ascending else 2**62]
            where += (
                f" AND seq {'>' if ascending else '<'} COALESCE((SELECT seq FROM files WHERE id = ${len(args) - 1}), "
                f"${len(args)})"
            )
        args.append(limit)
        order = "ASC" if ascending else "DESC"
        rows = await self._rows(
            f"SELECT {_FILE} FROM files WHERE {where} ORDER BY seq {order} LIMIT ${len(args)}", *args
        )
        return [file_from(r) for r in rows]

    async def delete_file(self, account_id: int, file_id: str) -> bool:
        gone = await self._ledger._fetchval(
            "WITH gone AS (DELETE FROM files WHERE id = $1 AND account_id = $2 RETURNING 1) SELECT count(*) FROM gone",
            file_id,
            account_id,
        )
        return bool(gone)

    async def file_content(self, file: StoredFile) -> bytes:
        content = await self._ledger._fetchval("SELECT content FROM files WHERE id = $1", file.id)
        return bytes(content) if content is not None else b""

    async def output_lines(self, batch_id: str, kind: str, *, after: int, limit: int) -> list[tuple[int, str]]:
        rows = await self._rows(
            "SELECT line, output FROM batch_lines WHERE batch_id = $1 AND status = $2 AND line > $3 ORDER BY line "
            "LIMIT $4",
            batch_id, "completed" if kind == "output" else "failed", after, limit,
        )  # fmt: skip
        return [(r["line"], r["output"]) for r in rows]

    # -- batches -----------------------------------------------------------------------------------------

    async def _insert_batch(self, batch: StoredBatch, lines: Sequence[NewLine]) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO batches (id, account_id, key_hash, endpoint, input_file_id, completion_window, model, "
                "metadata, discount, status, created, expires, total) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                batch.id, batch.account_id, batch.key_hash, batch.endpoint, batch.input_file_id,
                batch.completion_window, batch.model, metadata_text(batch.metadata), batch.discount, batch.status,
                batch.created, batch.expires, batch.total,
            )  # fmt: skip
            await conn.copy_records_to_table(
                "batch_lines",
                records=[(batch.id, number, line.model, line.request) for number, line in enumerate(lines)],
                columns=["batch_id", "line", "model", "request"],
            )

    async def find_batch(self, account_id: int, batch_id: str) -> StoredBatch | None:
        row = await self._ledger._fetchrow(
            "SELECT * FROM batches WHERE id = $1 AND account_id = $2", batch_id, account_id
        )
        return None if row is None else batch_from(row)

    async def batches(self, account_id: int, *, after: str | None, limit: int) -> list[StoredBatch]:
        if after is None:
            rows = await self._rows(
                "SELECT * FROM batches WHERE account_id = $1 ORDER BY seq DESC LIMIT $2", account_id, limit
            )
        else:
            rows = await self._rows(
                "SELECT * FROM batches WHERE account_id = $1 AND seq < COALESCE((SELECT seq FROM batches WHERE "
                "id = $2), $3) ORDER BY seq DESC LIMIT $4",
                account_id, after, 2**62, limit,
            )  # fmt: skip
        return [batch_from(r) for r in rows]

    async def cancel_batch(self, account_id: int, batch_id: str, render: Render) -> StoredBatch | None:
        now = self._clock()
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM batches WHERE id = $1 AND account_id = $2 FOR UPDATE", batch_id, account_id
            )
            if row is None:
                return None
            if row["status"] == "in_progress":
                await conn.execute(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = $1 WHERE id = $2", now, batch_id
                )
                await _fail_pending(conn, batch_id, render)
                await _finish_if_done(conn, batch_id, now)
            found = await conn.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
        return batch_from(found)

    async def stop_batch(self, batch_id: str, stopped: dict[str, str], render: Render) -> None:
        now = self._clock()
        async with self._transaction() as conn:
            changed = await conn.fetchval(
                "WITH stop AS (UPDATE batches SET stopped = $1 WHERE id = $2 AND status = 'in_progress' AND "
                "stopped IS NULL RETURNING 1) SELECT count(*) FROM stop",
                json.dumps(stopped),
                batch_id,
            )
            if changed:
                await _fail_pending(conn, batch_id, render)
                await _finish_if_done(conn, batch_id, now)

    async def expire_batches(self, stopped: dict[str, str], render: Render) -> list[str]:
        now = self._clock()
        reason = json.dumps(stopped)
        async with self._transaction() as conn:
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM batches WHERE status = 'in_progress' AND expires < $1 ORDER BY seq FOR UPDATE "
                    "SKIP LOCKED",
                    now,
                )
            ]
            for batch_id in ids:
                await conn.execute("UPDATE batches SET stopped = COALESCE(stopped, $1) WHERE id = $2", reason, batch_id)
                await _fail_pending(conn, batch_id, render)
                await _finish_if_done(conn, batch_id, now)
        return ids

    # -- lines -------------------------------------------------------------------------------------------

    async def claim_lines(
        self,
        router_id: str,
        room: Mapping[str, int],
        *,
        skip: Collection[str] = (),
        per_key: Mapping[str, int] | None = None,
    ) -> list[ClaimedLine]:
        wanted = {model: n for model, n in room.items() if n > 0}
        keys_left = dict(per_key or {})
        claimed: list[ClaimedLine] = []
        if not wanted:
            return claimed
        async with self._transaction() as conn:
            batches = [
                b
                for b in await conn.fetch(f"SELECT * FROM batches WHERE status IN {_OPEN} ORDER BY seq")
                if b["status"] == "in_progress" and b["id"] not in skip
            ]
            for model, limit in wanted.items():
                for batch in batches:
                    if limit <= 0:
                        break
                    most = min(limit, keys_left.get(batch["key_hash"], limit))
                    if most <= 0:
                        continue
                    rows = await conn.fetch(
                        "WITH picked AS (SELECT line FROM batch_lines WHERE model = $1 AND batch_id = $2 AND "
                        "status = 'pending' ORDER BY line LIMIT $3 FOR UPDATE SKIP LOCKED) "
                        "UPDATE batch_lines l SET status = 'running', router_id = $4, attempt = l.attempt + 1 "
                        "FROM picked WHERE l.batch_id = $2 AND l.line = picked.line "
                        "RETURNING l.line, l.model, l.request, l.attempt",
                        model, batch["id"], most, router_id,
                    )  # fmt: skip
                    limit -= len(rows)
                    if batch["key_hash"] in keys_left:
                        keys_left[batch["key_hash"]] -= len(rows)
                    claimed += [_claimed(batch, r) for r in sorted(rows, key=lambda r: int(r["line"]))]
        return claimed

    async def finish_line(self, line: ClaimedLine, router_id: str, outcome: LineOutcome) -> bool:
        now = self._clock()
        done = outcome.status == "completed"
        async with self._transaction() as conn:
            # The batch's row first, as every change of its figures and status takes it: no deadlock between two.
            await conn.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", line.batch_id)
            changed = await conn.fetchval(
                "WITH done AS (UPDATE batch_lines SET status = $1, output = $2, router_id = NULL WHERE batch_id = $3 "
                "AND line = $4 AND status = 'running' AND router_id = $5 AND attempt = $6 RETURNING 1) "
                "SELECT count(*) FROM done",
                outcome.status, outcome.output, line.batch_id, line.line, router_id, line.attempt,
            )  # fmt: skip
            if not changed:
                return False
            await conn.execute(
                "UPDATE batches SET completed = completed + $1, failed = failed + $2, "
                "prompt_tokens = prompt_tokens + $3, completion_tokens = completion_tokens + $4, "
                "cached_tokens = cached_tokens + $5, cost = cost + $6 WHERE id = $7",
                int(done), int(not done), outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens,
                outcome.cost, line.batch_id,
            )  # fmt: skip
            await _finish_if_done(conn, line.batch_id, now)
        return True

    async def return_line(self, line: ClaimedLine, router_id: str) -> bool:
        changed = await self._ledger._fetchval(
            "WITH back AS (UPDATE batch_lines SET status = 'pending', router_id = NULL WHERE batch_id = $1 AND "
            "line = $2 AND status = 'running' AND router_id = $3 AND attempt = $4 RETURNING 1) "
            "SELECT count(*) FROM back",
            line.batch_id, line.line, router_id, line.attempt,
        )  # fmt: skip
        return bool(changed)

    async def requeue_lost(self, router_id: str, *, cluster: bool, start: bool) -> int:
        where = "TRUE"
        args: list[Any] = []
        if cluster:
            # Those of routers whose lease ran out (or that left the table), and at its start its own from an
            # earlier life; never those it runs now.
            live = f"SELECT 1 FROM routers r WHERE r.id = batch_lines.router_id AND r.lease_until >= {_DB_NOW}"
            dead = f"NOT EXISTS ({live})"
            mine = "router_id = $1" if start else "FALSE"
            where = f"(router_id IS NULL OR {mine} OR (router_id <> $1 AND {dead}))"
            args = [router_id]
        count = await self._ledger._fetchval(
            f"WITH back AS (UPDATE batch_lines SET status = 'pending', router_id = NULL WHERE status = 'running' "
            f"AND {where} RETURNING 1) SELECT count(*) FROM back",
            *args,
        )
        return int(count)

    async def statuses(self, batch_ids: Sequence[str]) -> dict[str, str]:
        if not batch_ids:
            return {}
        rows = await self._rows("SELECT id, status FROM batches WHERE id = ANY($1::text[])", list(batch_ids))
        return {r["id"]: r["status"] for r in rows}

    async def running_lines(self, batch_id: str) -> int:
        count = await self._ledger._fetchval(
            "SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND status = 'running'", batch_id
        )
        return int(count)

    async def overview(self, *, limit: int) -> BatchOverview:
        counts = {
            r["status"]: r["n"]
            for r in await self._rows(f"SELECT status, count(*) AS n FROM batches WHERE status IN {_OPEN} GROUP BY 1")
        }
        left = await self._ledger._fetchval(
            f"SELECT COALESCE(sum(total - completed - failed), 0) FROM batches WHERE status IN {_OPEN}"
        )
        running = await self._ledger._fetchval("SELECT count(*) FROM batch_lines WHERE status = 'running'")
        rows = await self._rows(
            f"SELECT b.*, a.name AS account_name FROM batches b JOIN accounts a ON a.id = b.account_id "
            f"WHERE b.status IN {_OPEN} ORDER BY b.seq LIMIT $1",
            limit,
        )
        return BatchOverview(
            open={s: counts.get(s, 0) for s in OPEN_STATUSES}, pending=int(left) - int(running), running=int(running),
            shown=[(batch_from(r), r["account_name"]) for r in rows],
        )  # fmt: skip


def _claimed(batch: asyncpg.Record, row: asyncpg.Record) -> ClaimedLine:
    return ClaimedLine(
        batch_id=batch["id"], line=row["line"], model=row["model"], request=row["request"], attempt=row["attempt"],
        account_id=batch["account_id"], key_hash=batch["key_hash"], endpoint=batch["endpoint"],
        discount=batch["discount"], expires=batch["expires"],
    )  # fmt: skip


async def _fail_pending(conn: asyncpg.Connection, batch_id: str, render: Render) -> None:
    """Fail the batch's pending lines, each with `render(request)` as its output."""
    pending = await conn.fetch(
        "SELECT line, request FROM batch_lines WHERE batch_id = $1 AND status = 'pending' FOR UPDATE", batch_id
    )
    if not pending:
        return
    await conn.execute(
        "UPDATE batch_lines l SET status = 'failed', output = f.output FROM unnest($2::int[], $3::text[]) "
        "AS f(line, output) WHERE l.batch_id = $1 AND l.line = f.line",
        batch_id, [r["line"] for r in pending], [render(r["request"]) for r in pending],
    )  # fmt: skip
    await conn.execute("UPDATE batches SET failed = failed + $1 WHERE id = $2", len(pending), batch_id)


async def _finish_if_done(conn: asyncpg.Connection, batch_id: str, now: float) -> None:
    """Finish an open batch that has no pending or running line left: its last status, its output and error files.
    The caller holds the batch's row (FOR UPDATE)."""
    batch = await conn.fetchrow(f"SELECT * FROM batches WHERE id = $1 AND status IN {_OPEN} FOR UPDATE", batch_id)
    if batch is None:
        return
    if batch["completed"] + batch["failed"] < batch["total"]:  # each line that ends is counted in its transaction
        return
    files: dict[str, str | None] = {"output": None, "errors": None}
    for kind, status in (("output", "completed"), ("errors", "failed")):
        row = await conn.fetchrow(
            "SELECT count(*) AS lines, COALESCE(sum(octet_length(output) + 1), 0) AS size FROM batch_lines "
            "WHERE batch_id = $1 AND status = $2",
            batch_id,
            status,
        )
        if row["lines"]:
            files[kind] = file_id = new_file_id()
            name = f"{batch_id}_{'output' if kind == 'output' else 'error'}.jsonl"
            await conn.execute(
                "INSERT INTO files (id, account_id, purpose, filename, bytes, lines, created, batch_id, kind) "
                "VALUES ($1, $2, 'batch_output', $3, $4, $5, $6, $7, $8)",
                file_id, batch["account_id"], name, int(row["size"]), row["lines"], now, batch_id, kind,
            )  # fmt: skip
    stopped = json.loads(batch["stopped"]) if batch["stopped"] else None
    await conn.execute(
        "UPDATE batches SET status = $1, finished = $2, output_file_id = $3, error_file_id = $4 WHERE id = $5",
        final_status(batch["status"], stopped), now, files["output"], files["errors"], batch_id,
    )  # fmt: skip
