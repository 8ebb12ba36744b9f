"""Files and batches in the SQLite ledger's file, on its one thread (see _batches.py for the contract)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

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
    from llamakit.router.ledger._sqlite import SqliteLedger

__all__ = ["SqliteBatches"]

_OPEN = "('in_progress', 'cancelling')"


class SqliteBatches(BatchStore):
    def __init__(self, ledger: SqliteLedger) -> None:
        super().__init__(ledger._clock)
        self._ledger = ledger

    # -- files -------------------------------------------------------------------------------------------

    async def create_file(
        self, account_id: int, *, purpose: str, filename: str, content: bytes, lines: int
    ) -> StoredFile:
        file = StoredFile(new_file_id(), account_id, purpose, filename, len(content), lines, self._clock())

        def run(conn: sqlite3.Connection) -> StoredFile:
            conn.execute(
                "INSERT INTO files (id, account_id, purpose, filename, bytes, lines, created, content) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (file.id, account_id, purpose, filename, file.bytes, lines, file.created, content),
            )
            return file

        return await self._ledger._call(run, write=True)

    async def find_file(self, account_id: int, file_id: str) -> StoredFile | None:
        def run(conn: sqlite3.Connection) -> StoredFile | None:
            row = conn.execute(f"SELECT {_FILE} FROM files WHERE id = ? AND account_id = ?", (file_id, account_id))
            found = row.fetchone()
            return None if found is None else file_from(found)

        return await self._ledger._call(run)

    async def files(
        self, account_id: int, *, after: str | None, limit: int, purpose: str | None, ascending: bool
    ) -> list[StoredFile]:
        def run(conn: sqlite3.Connection) -> list[StoredFile]:
            where, args = "account_id = ?", list[object]([account_id])
            if purpose is not None:
                where += " AND purpose = ?"
                args.append(purpose)
            if after is not None:
                where += f" AND seq {'>' if ascending else '<'} COALESCE((SELECT seq FROM files WHERE id = ?), ?)"
                args += [after, 0 if ascending else 2**62]
            order = "ASC" if ascending else "DESC"
            rows = conn.execute(f"SELECT {_FILE} FROM files WHERE {where} ORDER BY seq {order} LIMIT ?", (*args, limit))
            return [file_from(r) for r in rows]

        return await self._ledger._call(run)

    async def delete_file(self, account_id: int, file_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM files WHERE id = ? AND account_id = ?", (file_id, account_id)).rowcount > 0

        return await self._ledger._call(run, write=True)

    async def file_content(self, file: StoredFile) -> bytes:
        def run(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT content FROM files WHERE id = ?", (file.id,)).fetchone()
            return bytes(row["content"]) if row is not None and row["content"] is not None else b""

        return await self._ledger._call(run)

    async def output_lines(self, batch_id: str, kind: str, *, after: int, limit: int) -> list[tuple[int, str]]:
        status = "completed" if kind == "output" else "failed"

        def run(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = conn.execute(
                "SELECT line, output FROM batch_lines WHERE batch_id = ? AND status = ? AND line > ? "
                "ORDER BY line LIMIT ?",
                (batch_id, status, after, limit),
            )
            return [(r["line"], r["output"]) for r in rows]

        return await self._ledger._call(run)

    # -- batches -----------------------------------------------------------------------------------------

    async def _insert_batch(self, batch: StoredBatch, lines: Sequence[NewLine]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO batches (id, account_id, key_hash, endpoint, input_file_id, completion_window, model, "
                "metadata, discount, status, created, expires, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.id, batch.account_id, batch.key_hash, batch.endpoint, batch.input_file_id,
                 batch.completion_window, batch.model, metadata_text(batch.metadata), batch.discount, batch.status,
                 batch.created, batch.expires, batch.total),
            )  # fmt: skip
            conn.executemany(
                "INSERT INTO batch_lines (batch_id, line, model, request) VALUES (?, ?, ?, ?)",
                ((batch.id, number, line.model, line.request) for number, line in enumerate(lines)),
            )

        await self._ledger._call(run, write=True)

    async def find_batch(self, account_id: int, batch_id: str) -> StoredBatch | None:
        def run(conn: sqlite3.Connection) -> StoredBatch | None:
            row = conn.execute("SELECT * FROM batches WHERE id = ? AND account_id = ?", (batch_id, account_id))
            found = row.fetchone()
            return None if found is None else batch_from(found)

        return await self._ledger._call(run)

    async def batches(self, account_id: int, *, after: str | None, limit: int) -> list[StoredBatch]:
        def run(conn: sqlite3.Connection) -> list[StoredBatch]:
            where, args = "account_id = ?", list[object]([account_id])
            if after is not None:
                where += " AND seq < COALESCE((SELECT seq FROM batches WHERE id = ?), ?)"
                args += [after, 2**62]
            rows = conn.execute(f"SELECT * FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit))
            return [batch_from(r) for r in rows]

        return await self._ledger._call(run)

    async def cancel_batch(self, account_id: int, batch_id: str, render: Render) -> StoredBatch | None:
        now = self._clock()

        def run(conn: sqlite3.Connection) -> StoredBatch | None:
            row = conn.execute("SELECT * FROM batches WHERE id = ? AND account_id = ?", (batch_id, account_id))
            found = row.fetchone()
            if found is None:
                return None
            if found["status"] == "in_progress":
                conn.execute(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?", (now, batch_id)
                )
                _fail_pending(conn, batch_id, render)
                _finish_if_done(conn, batch_id, now)
            return batch_from(conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())

        return await self._ledger._call(run, write=True)

    async def stop_batch(self, batch_id: str, stopped: dict[str, str], render: Render) -> None:
        now = self._clock()

        def run(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE batches SET stopped = ? WHERE id = ? AND status = 'in_progress' AND stopped IS NULL",
                (json.dumps(stopped), batch_id),
            ).rowcount
            if changed:
                _fail_pending(conn, batch_id, render)
                _finish_if_done(conn, batch_id, now)

        await self._ledger._call(run, write=True)

    async def expire_batches(self, stopped: dict[str, str], render: Render) -> list[str]:
        now = self._clock()
        reason = json.dumps(stopped)

        def run(conn: sqlite3.Connection) -> list[str]:
            ids = [
                r["id"]
                for r in conn.execute(
                    f"SELECT id, status FROM batches WHERE status IN {_OPEN} AND expires < ? ORDER BY seq", (now,)
                )
                if r["status"] == "in_progress"
            ]
            for batch_id in ids:
                conn.execute("UPDATE batches SET stopped = COALESCE(stopped, ?) WHERE id = ?", (reason, batch_id))
                _fail_pending(conn, batch_id, render)
                _finish_if_done(conn, batch_id, now)
            return ids

        return await self._ledger._call(run, write=True)

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

        def run(conn: sqlite3.Connection) -> list[ClaimedLine]:
            claimed: list[ClaimedLine] = []
            keys_left = dict(per_key or {})
            if not wanted:
                return claimed
            batches = [
                b
                for b in conn.execute(f"SELECT * FROM batches WHERE status IN {_OPEN} ORDER BY seq")  # batches_open
                if b["status"] == "in_progress" and b["id"] not in skip
            ]
            for model, limit in wanted.items():
                for batch in batches:
                    if limit <= 0:
                        break
                    most = min(limit, keys_left.get(batch["key_hash"], limit))
                    if most <= 0:
                        continue
                    rows = conn.execute(
                        "UPDATE batch_lines SET status = 'running', router_id = ?, attempt = attempt + 1 "
                        "WHERE batch_id = ? AND line IN (SELECT line FROM batch_lines INDEXED BY batch_lines_pending "
                        "WHERE model = ? AND batch_id = ? AND status = 'pending' ORDER BY line LIMIT ?) "
                        "RETURNING line, model, request, attempt",
                        (router_id, batch["id"], model, batch["id"], most),
                    ).fetchall()
                    limit -= len(rows)
                    if batch["key_hash"] in keys_left:
                        keys_left[batch["key_hash"]] -= len(rows)
                    claimed += [_claimed(batch, r) for r in sorted(rows, key=lambda r: int(r["line"]))]
            return claimed

        return await self._ledger._call(run, write=True)

    async def finish_line(self, line: ClaimedLine, router_id: str, outcome: LineOutcome) -> bool:
        now = self._clock()

        def run(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE batch_lines SET status = ?, output = ?, router_id = NULL WHERE batch_id = ? AND line = ? "
                "AND status = 'running' AND router_id = ? AND attempt = ?",
                (outcome.status, outcome.output, line.batch_id, line.line, router_id, line.attempt),
            ).rowcount
            if not changed:
                return False
            done = outcome.status == "completed"
            conn.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ?, prompt_tokens = prompt_tokens + ?, "
                "completion_tokens = completion_tokens + ?, cached_tokens = cached_tokens + ?, cost = cost + ? "
                "WHERE id = ?",
                (int(done), int(not done), outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens,
                 outcome.cost, line.batch_id),
            )  # fmt: skip
            _finish_if_done(conn, line.batch_id, now)
            return True

        return await self._ledger._call(run, write=True)

    async def return_line(self, line: ClaimedLine, router_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE batch_lines SET status = 'pending', router_id = NULL WHERE batch_id = ? AND line = ? "
                    "AND status = 'running' AND router_id = ? AND attempt = ?",
                    (line.batch_id, line.line, router_id, line.attempt),
                ).rowcount
                > 0
            )

        return await self._ledger._call(run, write=True)

    async def requeue_lost(self, router_id: str, *, cluster: bool, start: bool) -> int:
        # One router per SQLite ledger (ledger._owner): at its start every running line is an earlier run's.
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE batch_lines SET status = 'pending', router_id = NULL WHERE status = 'running'"
            ).rowcount

        return await self._ledger._call(run, write=True)

    async def statuses(self, batch_ids: Sequence[str]) -> dict[str, str]:
        ids = list(batch_ids)

        def run(conn: sqlite3.Connection) -> dict[str, str]:
            marks = ", ".join("?" * len(ids))
            return {r["id"]: r["status"] for r in conn.execute(f"SELECT id, status FROM batches WHERE id IN ({marks})",
                                                               ids)}  # fmt: skip

        return await self._ledger._call(run) if ids else {}

    async def running_lines(self, batch_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND status = 'running'", (batch_id,)
            ).fetchone()
            return int(row[0])

        return await self._ledger._call(run)

    async def overview(self, *, limit: int) -> BatchOverview:
        def run(conn: sqlite3.Connection) -> BatchOverview:
            counts = {
                r["status"]: r["n"]
                for r in conn.execute(f"SELECT status, count(*) AS n FROM batches WHERE status IN {_OPEN} GROUP BY 1")
            }
            left = conn.execute(
                f"SELECT COALESCE(sum(total - completed - failed), 0) FROM batches WHERE status IN {_OPEN}"
            ).fetchone()[0]
            running = conn.execute("SELECT count(*) FROM batch_lines WHERE status = 'running'").fetchone()[0]
            shown = [
                (batch_from(r), r["account_name"])
                for r in conn.execute(
                    f"SELECT b.*, a.name AS account_name FROM batches b JOIN accounts a ON a.id = b.account_id "
                    f"WHERE b.status IN {_OPEN} ORDER BY b.seq LIMIT ?",
                    (limit,),
                )
            ]
            return BatchOverview(
                open={s: counts.get(s, 0) for s in OPEN_STATUSES}, pending=int(left) - int(running),
                running=int(running), shown=shown,
            )  # fmt: skip

        return await self._ledger._call(run)


_FILE = "id, account_id, purpose, filename, bytes, lines, created, batch_id, kind"


def _claimed(batch: sqlite3.Row, row: sqlite3.Row) -> ClaimedLine:
    return ClaimedLine(
        batch_id=batch["id"], line=row["line"], model=row["model"], request=row["request"], attempt=row["attempt"],
        account_id=batch["account_id"], key_hash=batch["key_hash"], endpoint=batch["endpoint"],
        discount=batch["discount"], expires=batch["expires"],
    )  # fmt: skip


def _fail_pending(conn: sqlite3.Connection, batch_id: str, render: Render) -> None:
    """Fail the batch's pending lines, each with `render(request)` as its output."""
    pending = conn.execute(
        "SELECT line, request FROM batch_lines WHERE batch_id = ? AND status = 'pending'", (batch_id,)
    ).fetchall()
    conn.executemany(
        "UPDATE batch_lines SET status = 'failed', output = ? WHERE batch_id = ? AND line = ?",
        ((render(r["request"]), batch_id, r["line"]) for r in pending),
    )
    conn.execute("UPDATE batches SET failed = failed + ? WHERE id = ?", (len(pending), batch_id))


def _finish_if_done(conn: sqlite3.Connection, batch_id: str, now: float) -> None:
    """Finish an open batch that has no pending or running line left: its last status, its output and error files."""
    batch = conn.execute(f"SELECT * FROM batches WHERE id = ? AND status IN {_OPEN}", (batch_id,)).fetchone()
    if batch is None:
        return
    if batch["completed"] + batch["failed"] < batch["total"]:  # each line that ends is counted in its transaction
        return
    files: dict[str, str | None] = {"output": None, "errors": None}
    for kind, status in (("output", "completed"), ("errors", "failed")):
        lines, size = conn.execute(
            "SELECT count(*), COALESCE(sum(length(CAST(output AS BLOB)) + 1), 0) FROM batch_lines "
            "WHERE batch_id = ? AND status = ?",
            (batch_id, status),
        ).fetchone()
        if lines:
            files[kind] = file_id = new_file_id()
            name = f"{batch_id}_{'output' if kind == 'output' else 'error'}.jsonl"
            conn.execute(
                "INSERT INTO files (id, account_id, purpose, filename, bytes, lines, created, batch_id, kind) "
                "VALUES (?, ?, 'batch_output', ?, ?, ?, ?, ?, ?)",
                (file_id, batch["account_id"], name, size, lines, now, batch_id, kind),
            )
    stopped = json.loads(batch["stopped"]) if batch["stopped"] else None
    conn.execute(
        "UPDATE batches SET status = ?, finished = ?, output_file_id = ?, error_file_id = ? WHERE id = ?",
        (final_status(batch["status"], stopped), now, files["output"], files["errors"], batch_id),
    )
